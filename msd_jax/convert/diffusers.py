"""Import of diffusers `AutoencoderKL` and `UNet2DConditionModel` folders.

A diffusers folder holds `config.json` and weights (`.safetensors`, sharded safetensors or
`.bin`, read without unpickling code). `load_pretrained(src)` builds our model from the config
and maps every tensor onto it, failing with the names of any missing, unused or mis-shaped
tensor and of any config option we do not implement.

CLI: `python -m msd_jax.convert.diffusers --src DIR --out DIR` writes `DIR/config.json` (our
model's fields plus `_class_name`) and an Orbax checkpoint of the params in `DIR/params`;
`load_converted(DIR)` gives the model and params back.
"""
import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from msd_jax.convert.common import ConversionError, convert_state_dict, load_state_dict
from msd_jax.models import unet as unet_lib
from msd_jax.models import vae as vae_lib

_UNET_FIELDS = ("in_channels", "out_channels", "layers_per_block", "block_out_channels", "down_block_types",
                "up_block_types", "cross_attention_dim", "attention_head_dim", "transformer_layers_per_block",
                "use_linear_projection", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift",
                "downsample_padding")
_UNET_FIXED = {  # diffusers options we implement only at these values (absent keys are fine)
    "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None,
    "time_embedding_type": "positional", "resnet_time_scale_shift": "default", "only_cross_attention": False,
    "dual_cross_attention": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu",
    "encoder_hid_dim": None, "num_attention_heads": None, "mid_block_scale_factor": 1, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "time_cond_proj_dim": None, "attention_type": "default", "cross_attention_norm": None,
    "num_class_embeds": None, "timestep_post_act": None, "reverse_transformer_layers_per_block": None,
}
_VAE_FIELDS = ("in_channels", "out_channels", "latent_channels", "layers_per_block", "block_out_channels",
               "down_block_types", "up_block_types", "norm_num_groups", "scaling_factor")
_VAE_FIXED = {"act_fn": "silu", "shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True,
              "mid_block_add_attention": True}
_VAE_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _check_fixed(cfg: dict, fixed: dict, where: str):
  bad = [f"{k}={cfg[k]!r} (supported: {v!r})" for k, v in fixed.items() if k in cfg and cfg[k] != v]
  if isinstance(cfg.get("transformer_layers_per_block", 1), (list, tuple)):
    bad.append(f"transformer_layers_per_block={cfg['transformer_layers_per_block']!r} (supported: an int)")
  if bad:
    raise ConversionError(f"{where}: unsupported config options: " + ", ".join(bad))


def _tuples(d: dict) -> dict:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def unet_fields(cfg: dict, where: str = "config.json") -> dict:
  """Our `UNet2DConditionModel` fields from a diffusers UNet config dict."""
  _check_fixed(cfg, _UNET_FIXED, where)
  return _tuples({k: cfg[k] for k in _UNET_FIELDS if k in cfg})


def vae_fields(cfg: dict, where: str = "config.json") -> dict:
  """Our `AutoencoderKL` fields from a diffusers AutoencoderKL config dict."""
  _check_fixed(cfg, _VAE_FIXED, where)
  return _tuples({k: cfg[k] for k in _VAE_FIELDS if k in cfg})


def _vae_rename(key: str) -> str:
  """Pre-0.14 diffusers VAE checkpoints name the attention `query/key/value/proj_attn`."""
  head, _, leaf = key.rpartition(".")
  module, _, last = head.rpartition(".")
  if last in _VAE_LEGACY and ".attentions." in key:
    return f"{module}.{_VAE_LEGACY[last]}.{leaf}"
  return key


def build(class_name: str, fields: dict):
  """(model, variables shapes) for our model of `class_name` with `fields`."""
  if class_name == "UNet2DConditionModel":
    model = unet_lib.UNet2DConditionModel(**fields)
    s = 2 ** (len(model.block_out_channels) - 1)
    args = (jnp.zeros((1, s, s, model.in_channels)), jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 1, model.cross_attention_dim)))
  elif class_name == "AutoencoderKL":
    model = vae_lib.AutoencoderKL(**fields)
    s = 2 ** (len(model.block_out_channels) - 1)
    args = (jnp.zeros((1, s, s, model.in_channels)),)
  else:
    raise ConversionError(f"unsupported model class {class_name!r}; expected UNet2DConditionModel or AutoencoderKL")
  return model, jax.eval_shape(model.init, jax.random.key(0), *args)


def load_pretrained(src: str):
  """(model, {"params": ...} as numpy) from a diffusers model folder."""
  config_path = os.path.join(src, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path}: no diffusers config.json in this folder")
  with open(config_path) as f:
    cfg = json.load(f)
  class_name = cfg.get("_class_name")
  if class_name == "UNet2DConditionModel":
    fields, rename = unet_fields(cfg, config_path), lambda k: k
  elif class_name == "AutoencoderKL":
    fields, rename = vae_fields(cfg, config_path), _vae_rename
  else:
    raise ConversionError(f"{config_path}: unsupported _class_name {class_name!r}; "
                          "expected UNet2DConditionModel or AutoencoderKL")
  model, target = build(class_name, fields)
  try:
    variables = convert_state_dict(load_state_dict(src), target, rename=rename)
  except ConversionError as e:
    raise ConversionError(f"{src} ({class_name}):\n{e}") from None
  return model, variables


def _fields_of(model) -> dict:
  names = _UNET_FIELDS if isinstance(model, unet_lib.UNet2DConditionModel) else _VAE_FIELDS
  return {k: getattr(model, k) for k in names}


def save_converted(out: str, model, params) -> None:
  """Writes `out/config.json` and the Orbax checkpoint `out/params`."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({"_class_name": type(model).__name__, **_fields_of(model)}, f, indent=2)
  ocp.PyTreeCheckpointer().save(os.path.abspath(os.path.join(out, "params")), params, force=True)


def load_converted(out: str):
  """(model, params) from a folder written by `save_converted` / the CLI."""
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  model, target = build(cfg.pop("_class_name"), _tuples(cfg))
  restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray), target["params"])
  params = ocp.PyTreeCheckpointer().restore(os.path.abspath(os.path.join(out, "params")),
                                            args=ocp.args.PyTreeRestore(item=target["params"],
                                                                        restore_args=restore_args))
  return model, params


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--src", required=True, help="diffusers model folder (config.json + weights)")
  parser.add_argument("--out", required=True, help="output folder (config.json + Orbax params)")
  args = parser.parse_args(argv)
  model, variables = load_pretrained(args.src)
  save_converted(args.out, model, variables["params"])
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
  print(f"{type(model).__name__}: {n:,} parameters from {args.src} -> {args.out}")


if __name__ == "__main__":
  main()
