"""ResNet weight import into `msd_jax.models.scorer.ResNet`.

Two sources, one target naming (torchvision's):
- a torchvision state dict (`.pth` read with `torch.load(weights_only=True)`, or `.safetensors`),
  whose keys map onto the Flax tree by the shared rules of `common.py` unchanged;
- a transformers `ResNetModel` / `ResNetForImageClassification` folder (safetensors), whose keys
  are first rewritten to torchvision names by `transformers_to_torchvision_key`:

    embedder.embedder.convolution                  -> conv1
    embedder.embedder.normalization                -> bn1
    encoder.stages.{i}.layers.{j}.shortcut.convolution    -> layer{i+1}.{j}.downsample.0
    encoder.stages.{i}.layers.{j}.shortcut.normalization  -> layer{i+1}.{j}.downsample.1
    encoder.stages.{i}.layers.{j}.layer.{k}.convolution   -> layer{i+1}.{j}.conv{k+1}
    encoder.stages.{i}.layers.{j}.layer.{k}.normalization -> layer{i+1}.{j}.bn{k+1}

The classifier (`fc.*`, `classifier.*`) is dropped; anything else that does not fit is an error.
"""
import re

import jax
import jax.numpy as jnp

from msd_jax.convert import common

_STAGE = re.compile(r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.(shortcut|layer)\.(?:(\d+)\.)?"
                    r"(convolution|normalization)\.(\w+)$")
_STEM = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.(\w+)$")


def transformers_to_torchvision_key(key: str) -> str:
  """Rewrites a transformers ResNet key to its torchvision name; other keys pass unchanged."""
  key = key.removeprefix("resnet.")
  if m := _STEM.match(key):
    return f"{'conv1' if m[1] == 'convolution' else 'bn1'}.{m[2]}"
  if m := _STAGE.match(key):
    stage, block, branch, k, kind, leaf = m.groups()
    prefix = f"layer{int(stage) + 1}.{block}"
    if branch == "shortcut":
      return f"{prefix}.downsample.{0 if kind == 'convolution' else 1}.{leaf}"
    return f"{prefix}.{'conv' if kind == 'convolution' else 'bn'}{int(k) + 1}.{leaf}"
  return key


def _rename(key: str) -> str | None:
  if key.startswith(("fc.", "classifier.")):
    return None
  return transformers_to_torchvision_key(key)


def convert_resnet(state_dict, module) -> dict:
  """torchvision- or transformers-named state dict -> variables of the Flax `module`."""
  target = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  return common.convert_state_dict(state_dict, target, rename=_rename)


def load_resnet(module, path: str) -> dict:
  """Reads a torchvision file or a transformers folder and converts it for `module`."""
  return convert_resnet(common.load_state_dict(path), module)
