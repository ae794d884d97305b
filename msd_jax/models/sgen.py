"""SGEN: the Semantic-Guided Enhancement Network that steers the UNet (MSD, section SGEN).

    image --BPNet--> pyramid (strides 4, 8, 16, 32) --semantic modules--> hint (latent res, width
    block_out_channels[0]) --+ after conv_in of the control encoder (a trainable copy of the UNet
    encoder, fed z_t, t, c) --> skips + mid --SFF--> zero 1x1 convs --> one residual per UNet skip
    and one for the mid block.

Choices where the paper is silent (all sizes in `config.model.sgen`):
- BPNet is a ResNet-18-style network (7x7 stem, max-pool, BasicBlock stages at strides 4..32)
  with GroupNorm instead of BatchNorm, so SGEN carries no batch statistics and does not depend on
  the batch size. After each new stage i >= 1 the levels 0..i are fused twice: a top-down cascade
  (deepest level resized up into every shallower level, deepest to finest) and then a bottom-up
  path (finest level resized down into every deeper level); the next stage starts from the fused
  deepest level. Each fusion is `s + t + conv(s * t)`, with `t` bilinearly resized to `s` and
  projected to its width by a 1x1 conv and a GroupNorm. On a 256x256 image with widths
  (w0, w1, w2, w3) the levels are 64x64xw0, 32x32xw1, 16x16xw2 and 8x8xw3.
- The semantic modules refine each level (3x3 conv, GroupNorm, SiLU; `semantic_depth` times),
  project it to the control encoder's input width with a 1x1 conv and resize it to the latent
  resolution; the hint is their sum (a Panoptic-FPN-style merge). The hint enters only after
  conv_in: the deeper levels reach the deeper control blocks through the encoder itself, which
  keeps the control encoder an exact copy of the UNet encoder.
- The hint is not zero-initialised (ControlNet's conditioning embedding is): the zero 1x1 output
  convs already leave the UNet unchanged at initialisation, and a second zero layer in series
  would hold every BPNet gradient at zero for the first two optimiser steps.
- SFF fuses the deepest control outputs (every skip at the lowest resolution, and the mid block)
  with the skips one resolution up: `out_k <- SiLU(out_k + sum_j down(out_j))`, `down` = 3x3
  stride-2 conv, GroupNorm, SiLU. The `down` convs are shared by all targets of the same width.
- `latent_hint=True` (not in the paper) adds a 1x1 projection of the input image's own latent z0
  to the hint. Without it the control branch must learn the image-to-latent mapping that the
  frozen VAE encoder already computes before it can tell the denoiser what the input's normal
  regions were; a model trained from scratch in minutes (the demo) does not get there. With it,
  normal regions are a copy and the training signal goes to repairing what is abnormal.
- `use_bpnet=False` swaps BPNet and the semantic modules for DiAD's plain hint encoder (diffusers'
  `ControlNetConditioningEmbedding`); `use_sff=False` feeds the control outputs straight to the
  zero convs.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze

from msd_jax.models import layers
from msd_jax.models.unet import UNetEncoder, skip_shapes

Dtype = Any


def _resize(x, hw):
  """Bilinear resize of an NHWC map to spatial size `hw` (antialiased when shrinking)."""
  if x.shape[1:3] == tuple(hw):
    return x
  return jax.image.resize(x, (x.shape[0], *hw, x.shape[-1]), "bilinear")


class BasicBlock(nn.Module):
  """torchvision ResNet BasicBlock, GroupNorm in place of BatchNorm."""
  features: int
  strides: int = 1
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    norm = lambda name: layers.group_norm(self.norm_num_groups, 1e-5, self.dtype, name)
    h = nn.Conv(self.features, (3, 3), self.strides, padding=1, use_bias=False, dtype=self.dtype,
                name="conv1")(x)
    h = nn.relu(norm("norm1")(h))
    h = nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype, name="conv2")(h)
    h = norm("norm2")(h)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False, dtype=self.dtype,
                  name="downsample_0")(x)
      x = norm("downsample_1")(x)
    return nn.relu(h + x)


class AddMultiplyFusion(nn.Module):
  """BPNet fusion of `t` into `s`: `s + t' + conv(s * t')`, `t' = norm(proj(resize(t)))`.

  The GroupNorm on the projected `t` keeps the product term at the scale of `s`; without it the
  products compound over the cascades and the deepest level grows by orders of magnitude.
  """
  features: int
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, s, t):
    t = layers.conv(self.features, 1, self.dtype, "proj")(_resize(t, s.shape[1:3]))
    t = layers.group_norm(self.norm_num_groups, 1e-5, self.dtype, "norm")(t)
    return s + t + layers.conv(self.features, 3, self.dtype, "conv")(s * t)


class BPNet(nn.Module):
  """Bidirectional pyramid network; returns the fused levels at strides 4, 8, 16, 32."""
  widths: Sequence[int] = (64, 128, 256, 512)  # stage widths
  depths: Sequence[int] = (2, 2, 2, 2)  # BasicBlocks per stage
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image):
    x = nn.Conv(self.widths[0], (7, 7), 2, padding=3, use_bias=False, dtype=self.dtype,
                name="conv1")(image.astype(self.dtype))
    x = nn.relu(layers.group_norm(self.norm_num_groups, 1e-5, self.dtype, "norm1")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    levels = []
    for i, (width, depth) in enumerate(zip(self.widths, self.depths)):
      for j in range(depth):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(width, strides, self.norm_num_groups, self.dtype, name=f"layer{i + 1}_{j}")(x)
      levels.append(x)
      if i > 0:
        levels = self._bidirectional(levels, i)
        x = levels[-1]
    return levels

  def _bidirectional(self, levels, stage):
    """Top-down cascade from the deepest level, then bottom-up from the finest."""
    fusion = lambda l, name: AddMultiplyFusion(self.widths[l], self.norm_num_groups, self.dtype,
                                               name=f"{name}_{stage}_{l}")
    top_down = list(levels)
    for l in range(stage - 1, -1, -1):
      top_down[l] = fusion(l, "top_down")(levels[l], top_down[l + 1])
    out = list(top_down)
    for l in range(1, stage + 1):
      out[l] = fusion(l, "bottom_up")(top_down[l], out[l - 1])
    return out


class SemanticModule(nn.Module):
  """Refines one pyramid level and projects it to `features` channels."""
  features: int
  depth: int = 1  # 3x3 conv + GroupNorm + SiLU blocks before the projection
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    for d in range(self.depth):
      x = layers.conv(width, 3, self.dtype, f"convs_{d}")(x)
      x = nn.silu(layers.group_norm(self.norm_num_groups, 1e-5, self.dtype, f"norms_{d}")(x))
    return layers.conv(self.features, 1, self.dtype, "proj")(x)


class ControlNetConditioningEmbedding(nn.Module):
  """DiAD's plain hint encoder (diffusers `ControlNetConditioningEmbedding`, same names)."""
  conditioning_embedding_channels: int
  block_out_channels: Sequence[int] = (16, 32, 96, 256)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image):
    ch = self.block_out_channels
    x = nn.silu(layers.conv(ch[0], 3, self.dtype, "conv_in")(image.astype(self.dtype)))
    for i in range(len(ch) - 1):
      x = nn.silu(layers.conv(ch[i], 3, self.dtype, f"blocks_{2 * i}")(x))
      x = nn.silu(layers.conv(ch[i + 1], 3, self.dtype, f"blocks_{2 * i + 1}", stride=2)(x))
    return layers.conv(self.conditioning_embedding_channels, 3, self.dtype, "conv_out")(x)


class SFFDown(nn.Module):
  """SFF `down`: 3x3 stride-2 conv, GroupNorm, SiLU."""
  features: int
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.conv(self.features, 3, self.dtype, "conv", stride=2)(x)
    return nn.silu(layers.group_norm(self.norm_num_groups, 1e-5, self.dtype, "norm")(x))


class SFF(nn.Module):
  """Spatial-aware feature fusion of the deepest control outputs with the next shallower ones.

  `features` are the control outputs (skips, then mid); those at the lowest spatial resolution
  are the targets, those at the next resolution up the sources. Returns the list with every
  target replaced by `SiLU(target + sum_j down_j(source_j))`.
  """
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    sizes = sorted({f.shape[1] for f in features})
    if len(sizes) < 2:
      return list(features)
    sources = [f for f in features if f.shape[1] == sizes[1]]
    out, fused = list(features), {}
    for k, f in enumerate(features):
      if f.shape[1] != sizes[0]:
        continue
      width = f.shape[-1]
      if width not in fused:
        fused[width] = sum(
            SFFDown(width, self.norm_num_groups, self.dtype, name=f"down_{j}_to_{width}")(s)
            for j, s in enumerate(sources))
      out[k] = nn.silu(f + fused[width])
    return out


def _zero_conv(features, dtype):
  """Zero-initialised 1x1 conv (ControlNet's `zero_module`)."""
  return nn.Conv(features, (1, 1), dtype=dtype, kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.zeros)


class SGEN(UNetEncoder):
  """`(down_residuals, mid_residual) = SGEN(image, z_t, t, context)`.

  The UNet-encoder fields (inherited) must equal the UNet's; the parameters `conv_in`,
  `time_embedding`, `down_blocks_*` and `mid_block` have the UNet's names
  (`init_control_from_unet`). The rest mirror diffusers' `ControlNetModel`
  (`controlnet_cond_embedding`, `controlnet_down_blocks_i`, `controlnet_mid_block`) plus
  `bpnet`, `semantic_l` and `sff`. `image` is the raw input (B, H, W, 3) in [-1, 1].
  """
  use_bpnet: bool = True  # False: DiAD's plain hint encoder
  use_sff: bool = True
  bpnet_widths: Sequence[int] = (64, 128, 256, 512)
  bpnet_depths: Sequence[int] = (2, 2, 2, 2)
  semantic_depth: int = 1
  bpnet_norm_num_groups: int = 32  # BPNet and semantic modules
  hint_block_out_channels: Sequence[int] = (16, 32, 96, 256)  # plain hint encoder
  latent_hint: bool = False  # add a 1x1 projection of the image's latent z0 to the hint

  def setup(self):
    super().setup()
    c0 = self.block_out_channels[0]
    if self.use_bpnet:
      self.bpnet = BPNet(self.bpnet_widths, self.bpnet_depths, self.bpnet_norm_num_groups, self.dtype)
      self.semantic = [SemanticModule(c0, self.semantic_depth, self.bpnet_norm_num_groups, self.dtype)
                       for _ in self.bpnet_widths]
    else:
      self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
          c0, self.hint_block_out_channels, self.dtype)
    if self.latent_hint:
      self.latent_proj = nn.Conv(c0, (1, 1), dtype=self.dtype)
    if self.use_sff:
      self.sff = SFF(self.norm_num_groups, self.dtype)
    skips, _ = skip_shapes(self, (1, 1))
    self.controlnet_down_blocks = [_zero_conv(c, self.dtype) for _, _, c in skips]
    self.controlnet_mid_block = _zero_conv(self.block_out_channels[-1], self.dtype)

  def hint(self, image, latent_hw, latent=None):
    """The conditioning added after conv_in, at the latent resolution with width c0. `latent` is
    the image's z0, used (and required) with `latent_hint`."""
    if not self.use_bpnet:
      hint = self.controlnet_cond_embedding(image)
      if hint.shape[1:3] != tuple(latent_hw):
        raise ValueError(f"plain hint encoder gives {hint.shape[1:3]} maps for a {latent_hw} latent: "
                         f"the image must be 2**{len(self.hint_block_out_channels) - 1} times larger")
    else:
      hint = sum(_resize(semantic(level), latent_hw)
                 for semantic, level in zip(self.semantic, self.bpnet(image)))
    if self.latent_hint:
      if latent is None:
        raise ValueError("SGEN with latent_hint needs the image's latent z0")
      hint = hint + self.latent_proj(latent.astype(self.dtype))
    return hint

  def __call__(self, image, sample, timesteps, encoder_hidden_states, hint=None, latent=None):
    """`hint`, when given, is `hint(image, latent_hw, latent)` computed beforehand
    (`method=SGEN.hint`): it depends only on the image, so a sampling loop computes it once
    instead of every step."""
    if hint is None:
      hint = self.hint(image, sample.shape[1:3], latent)
    mid, skips, _ = self.encode(sample, timesteps, encoder_hidden_states, hint)
    features = list(skips) + [mid]
    if self.use_sff:
      features = self.sff(features)
    down = tuple(conv(f) for conv, f in zip(self.controlnet_down_blocks, features[:-1]))
    return down, self.controlnet_mid_block(features[-1])


def from_config(unet_cfg, sgen_cfg, **overrides) -> SGEN:
  """Builds SGEN from `config.model.unet` and `config.model.sgen` (ConfigDicts or dicts)."""
  kwargs = {}
  for cfg in (unet_cfg, sgen_cfg):
    kwargs.update(cfg.items() if hasattr(cfg, "items") else cfg)
  kwargs.update(overrides)
  for key, value in kwargs.items():
    if isinstance(value, list):
      kwargs[key] = tuple(value)
  if isinstance(kwargs.get("dtype"), str):
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return SGEN(**kwargs)


def init_control_from_unet(unet_params, control_params):
  """Returns `control_params` with the UNet encoder's weights copied in (ControlNet's `from_unet`).

  Copies `conv_in`, `time_embedding`, `down_blocks_*` and `mid_block`; every other SGEN parameter
  is kept. Either both arguments are `{"params": ...}` variable dicts or both are param trees.
  """
  if "params" in control_params:
    return {**control_params, "params": init_control_from_unet(unet_params["params"],
                                                               control_params["params"])}
  out = dict(unfreeze(control_params))
  shared = [k for k in out if k in unet_params]
  for required in ("conv_in", "time_embedding", "mid_block", "down_blocks_0"):
    if required not in shared:
      raise KeyError(f"{required!r} missing from the UNet or the control parameters")
  for key in shared:
    src, dst = unet_params[key], out[key]
    if jax.tree.structure(src) != jax.tree.structure(dst):
      raise ValueError(f"{key}: UNet and control encoder parameters differ in structure")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(src), jax.tree.leaves(dst)):
      if a.shape != b.shape:
        raise ValueError(f"{key}{jax.tree_util.keystr(path)}: UNet {a.shape} vs control {b.shape}")
    out[key] = jax.tree.map(jnp.asarray, src)
  return out
