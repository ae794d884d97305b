"""transformers `SamModel` folder (config.json + safetensors or .bin) -> Flax `msd_jax.models.sam`.

Keys map mechanically (common.py). Two SAM-specific rules: the prompt encoder's copy of the tied
positional embedding is dropped (the Flax prompt encoder reads `shared_image_embedding`), and the
mask decoder's ConvTranspose2d weights (in, out, kh, kw) are reordered to (out, in, kh, kw) so the
shared OIHW -> HWIO rule yields the (kh, kw, in, out) kernel of `SamUpscaleConv`.
"""
import json
import os

import numpy as np

from msd_jax.convert import common
from msd_jax.models import sam

_TIED = "prompt_encoder.shared_embedding.positional_embedding"
_CONV_TRANSPOSE = ("mask_decoder.upscale_conv1.weight", "mask_decoder.upscale_conv2.weight")


def _rename(key: str) -> str | None:
  key = key.removeprefix("sam.")
  return None if key == _TIED else key


def convert_sam_state_dict(state_dict: dict[str, np.ndarray], config: sam.SamConfig) -> dict:
  """PyTorch SamModel state dict -> Flax variables for `sam.SamModel(config)`."""
  sd = dict(state_dict)
  for k in list(sd):
    if k.removeprefix("sam.") in _CONV_TRANSPOSE:
      sd[k] = np.asarray(sd[k]).transpose(1, 0, 2, 3)
  return common.convert_state_dict(sd, sam.init_shapes(config), rename=_rename)


def load_sam(path: str) -> tuple[sam.SamModel, dict]:
  """Reads a transformers `SamModel.save_pretrained` folder -> (module, variables)."""
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path}: a transformers SamModel folder needs its config.json")
  with open(config_path) as f:
    config = sam.SamConfig.from_dict(json.load(f))
  variables = convert_sam_state_dict(common.load_state_dict(path), config)
  return sam.SamModel(config), variables
