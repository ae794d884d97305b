"""Shared PyTorch -> Flax weight import rules.

A PyTorch key `down_blocks.0.resnets.1.conv1.weight` maps mechanically to the Flax path
`down_blocks_0/resnets_1/conv1/kernel`: numeric segments join the name before them (linen names
list-held submodules `name_i`), `weight` becomes `kernel`, `scale` or `embedding` depending on what
the target module has, conv kernels go OIHW -> HWIO and linear kernels are transposed. BatchNorm
running statistics go to the `batch_stats` collection. Every key and shape is checked against the
target tree (from `jax.eval_shape`), and any missing, unused or mismatched tensor is an error that
names it.
"""
import json
import os
from typing import Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

_IGNORED_SUFFIXES = ("num_batches_tracked",)


class ConversionError(ValueError):
  """A checkpoint does not fit the target model."""


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict as float32 numpy arrays.

  `path` is a file (`.safetensors`, `.bin`, `.pth`, `.pt`) or a folder holding
  `*.safetensors`, a sharded `*.safetensors.index.json`, or `*.bin`. Pickles are read with
  `torch.load(weights_only=True)` only, so untrusted files cannot run code.
  """
  if os.path.isdir(path):
    names = sorted(os.listdir(path))
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
      with open(os.path.join(path, index[0])) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      files = [os.path.join(path, s) for s in shards]
    else:
      files = [os.path.join(path, n) for n in names if n.endswith(".safetensors")]
      if not files:
        files = [os.path.join(path, n) for n in names if n.endswith((".bin", ".pth", ".pt"))]
    if not files:
      raise FileNotFoundError(f"{path}: no .safetensors, .bin or .pth weights in this folder")
    out = {}
    for f in files:
      out.update(load_state_dict(f))
    return out
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such weights file")
  if path.endswith(".safetensors"):
    from safetensors import safe_open
    out = {}
    with safe_open(path, framework="pt") as f:
      for k in f.keys():
        out[k] = f.get_tensor(k).float().numpy()
    return out
  import torch
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
    sd = sd["state_dict"]
  return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}


def torch_key_to_path(key: str) -> tuple[str, ...]:
  """`a.b.0.c.weight` -> (`a`, `b_0`, `c`, `weight`)."""
  path = []
  for seg in key.split("."):
    if seg.isdigit() and path:
      path[-1] = f"{path[-1]}_{seg}"
    else:
      path.append(seg)
  return tuple(path)


_LEAF_CANDIDATES = {
    "weight": ("kernel", "scale", "embedding"),
    "bias": ("bias",),
    "running_mean": ("mean",),
    "running_var": ("var",),
}


def _transform(value: np.ndarray, leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
  if leaf == "kernel" and value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  elif leaf == "kernel" and value.ndim == 2:
    value = value.T
  if value.shape != tuple(target_shape) and value.size == int(np.prod(target_shape)) and value.ndim <= 1:
    value = value.reshape(target_shape)
  return value


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    target: Mapping,
    rename: Callable[[str], str | None] = lambda k: k,
    ignore: Iterable[str] = (),
) -> dict:
  """Maps a PyTorch state dict onto a Flax variables tree.

  Args:
    state_dict: torch key -> array.
    target: the Flax variables (`{"params": ..., "batch_stats": ...}`), arrays or ShapeDtypeStructs.
    rename: model-specific key rewrite applied first; returning None drops the key.
    ignore: torch key suffixes that are expected and unused (for example a classifier head).

  Returns:
    A variables dict with the structure of `target`, as float32 numpy arrays.

  Raises:
    ConversionError naming every missing, unused and mis-shaped tensor.
  """
  flat_target = traverse_util.flatten_dict(dict(target))
  by_module: dict[tuple[str, ...], dict[str, tuple]] = {}
  for full_path in flat_target:
    col, *module, leaf = full_path
    by_module.setdefault(tuple(module), {})[leaf] = full_path

  ignore = tuple(ignore) + _IGNORED_SUFFIXES
  out, unused, mismatched = {}, [], []
  for key, value in state_dict.items():
    if key.endswith(ignore):
      continue
    new_key = rename(key)
    if new_key is None:
      continue
    *module, leaf = torch_key_to_path(new_key)
    leaves = by_module.get(tuple(module), {})
    match = next((leaves[c] for c in _LEAF_CANDIDATES.get(leaf, (leaf,)) if c in leaves), None)
    if match is None:
      unused.append(key)
      continue
    target_shape = tuple(flat_target[match].shape)
    arr = _transform(np.asarray(value, np.float32), match[-1], target_shape)
    if arr.shape != target_shape:
      mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {target_shape} at {'/'.join(match)}")
      continue
    out[match] = arr
  missing = ["/".join(p) for p in flat_target if p not in out]
  problems = []
  if missing:
    problems.append("missing in checkpoint: " + ", ".join(missing))
  if unused:
    problems.append("unused checkpoint tensors: " + ", ".join(unused))
  if mismatched:
    problems.append("shape mismatches: " + "; ".join(mismatched))
  if problems:
    raise ConversionError("\n".join(problems))
  return traverse_util.unflatten_dict(out)
