"""diffusers folder import: the CLI round trip through Orbax, sharded/.bin/legacy-name folders,
and errors that name the offending tensor or config option."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from configs.msd import get_config
from msd_jax.convert import diffusers as convert
from msd_jax.convert.common import ConversionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  from diffusers import AutoencoderKL
  c = get_config("tiny").model.vae
  torch.manual_seed(0)
  ref = AutoencoderKL(layers_per_block=c.layers_per_block, block_out_channels=tuple(c.block_out_channels),
                      down_block_types=tuple(c.down_block_types), up_block_types=tuple(c.up_block_types),
                      norm_num_groups=c.norm_num_groups, latent_channels=c.latent_channels).eval()
  src = str(tmp_path_factory.mktemp("vae_src"))
  ref.save_pretrained(src)
  return ref, src


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
  from diffusers import UNet2DConditionModel
  c = get_config("tiny").model.unet
  torch.manual_seed(0)
  ref = UNet2DConditionModel(block_out_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
                             down_block_types=tuple(c.down_block_types), up_block_types=tuple(c.up_block_types),
                             cross_attention_dim=c.cross_attention_dim, attention_head_dim=c.attention_head_dim,
                             norm_num_groups=c.norm_num_groups, sample_size=8).eval()
  return ref


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_params(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_cli_round_trip_vae(vae_dir, tmp_path):
  ref, src = vae_dir
  out = str(tmp_path / "vae_out")
  proc = subprocess.run([sys.executable, "-m", "msd_jax.convert.diffusers", "--src", src, "--out", out],
                        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  assert "AutoencoderKL" in proc.stdout
  model, params = convert.load_converted(out)
  _, direct = convert.load_pretrained(src)
  _assert_same_params(params, direct["params"])
  assert model.scaling_factor == ref.config.scaling_factor
  z = np.random.default_rng(0).standard_normal((1, 2, 2, 4)).astype(np.float32)
  ours = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, z)
  with torch.no_grad():
    expected = ref.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_in_process_round_trip_unet_sharded_and_bin(unet_dir, tmp_path):
  ref = unet_dir
  sharded, pickled = str(tmp_path / "sharded"), str(tmp_path / "bin")
  ref.save_pretrained(sharded, max_shard_size="100KB")
  ref.save_pretrained(pickled, safe_serialization=False)
  assert any(n.endswith(".safetensors.index.json") for n in os.listdir(sharded))
  assert any(n.endswith(".bin") for n in os.listdir(pickled))
  convert.main(["--src", sharded, "--out", str(tmp_path / "out")])
  model, params = convert.load_converted(str(tmp_path / "out"))
  _, from_bin = convert.load_pretrained(pickled)
  _assert_same_params(params, from_bin["params"])
  assert model.attention_head_dim == ref.config.attention_head_dim
  assert model.block_out_channels == tuple(ref.config.block_out_channels)


def _edited_copy(src, dst, edit):
  shutil.copytree(src, dst)
  (path,) = [os.path.join(dst, n) for n in os.listdir(dst) if n.endswith(".safetensors")]
  sd = load_file(path)
  edit(sd)
  save_file(sd, path)
  return dst


def test_missing_tensor_is_named(vae_dir, tmp_path):
  src = _edited_copy(vae_dir[1], str(tmp_path / "m"), lambda sd: sd.pop("decoder.up_blocks.1.resnets.0.conv2.weight"))
  with pytest.raises(ConversionError, match=r"missing in checkpoint: .*decoder/up_blocks_1/resnets_0/conv2/kernel"):
    convert.load_pretrained(src)


def test_mis_shaped_tensor_is_named(vae_dir, tmp_path):
  def edit(sd):
    sd["encoder.conv_in.weight"] = torch.zeros(8, 3, 5, 5)
  src = _edited_copy(vae_dir[1], str(tmp_path / "s"), edit)
  with pytest.raises(ConversionError, match=r"shape mismatches: encoder\.conv_in\.weight"):
    convert.load_pretrained(src)


def test_unused_tensor_is_named(vae_dir, tmp_path):
  def edit(sd):
    sd["encoder.extra.weight"] = torch.zeros(3)
  src = _edited_copy(vae_dir[1], str(tmp_path / "u"), edit)
  with pytest.raises(ConversionError, match=r"unused checkpoint tensors: encoder\.extra\.weight"):
    convert.load_pretrained(src)


def test_legacy_vae_attention_names_load(vae_dir, tmp_path):
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

  def edit(sd):
    for k in [k for k in sd if ".attentions." in k]:
      for new, old in legacy.items():
        if f".{new}." in k:
          sd[k.replace(f".{new}.", f".{old}.")] = sd.pop(k)
  src = _edited_copy(vae_dir[1], str(tmp_path / "legacy"), edit)
  assert any(".query." in k for k in load_file(os.path.join(src, "diffusion_pytorch_model.safetensors")))
  _, a = convert.load_pretrained(src)
  _, b = convert.load_pretrained(vae_dir[1])
  _assert_same_params(a, b)


def test_unsupported_config_option_is_named(vae_dir, tmp_path):
  dst = str(tmp_path / "c")
  shutil.copytree(vae_dir[1], dst)
  with open(os.path.join(dst, "config.json")) as f:
    cfg = json.load(f)
  cfg["use_quant_conv"] = False
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ConversionError, match="use_quant_conv=False"):
    convert.load_pretrained(dst)
