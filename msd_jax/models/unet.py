"""The Stable Diffusion `UNet2DConditionModel`, NHWC, with ControlNet-style residual inputs.

Fields mirror the diffusers config keys, so a diffusers `config.json` maps onto them. As in
diffusers, `attention_head_dim` is the number of heads per block when given as in SD 1.x
(diffusers' historical naming); it may be an int or one value per block.

`UNetEncoder` holds the time embedding, `conv_in`, the down blocks and the mid block;
`UNet2DConditionModel` adds the up blocks and the output head. The SGEN control encoder
subclasses `UNetEncoder`, so its parameters have the same names as the UNet's encoder and can
be copied into it. Spatial sizes must be divisible by 2 ** (len(block_out_channels) - 1).
"""
from typing import Any, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from msd_jax.models import layers

Dtype = Any


def _per_block(value, n):
  return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


class DownBlock2D(nn.Module):
  """`layers_per_block` resnets, each followed by a transformer when `cross_attention`, then an
  optional stride-2 conv. Returns the output and every intermediate (the skips)."""
  out_channels: int
  num_layers: int
  add_downsample: bool
  cross_attention: bool
  heads: int = 8
  transformer_layers: int = 1
  use_linear_projection: bool = False
  groups: int = 32
  eps: float = 1e-5
  downsample_padding: int = 1
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context):
    resnet = layers.maybe_remat(layers.ResnetBlock2D, self.remat)
    transformer = layers.maybe_remat(layers.Transformer2DModel, self.remat)
    skips = []
    for i in range(self.num_layers):
      x = resnet(self.out_channels, self.groups, self.eps, self.dtype, name=f"resnets_{i}")(x, temb)
      if self.cross_attention:
        x = transformer(self.heads, self.out_channels // self.heads, self.transformer_layers, self.groups,
                        self.use_linear_projection, self.dtype, name=f"attentions_{i}")(x, context)
      skips.append(x)
    if self.add_downsample:
      x = layers.Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0")(x)
      skips.append(x)
    return x, tuple(skips)


class UpBlock2D(nn.Module):
  """`layers_per_block + 1` resnets on [x, skip] concatenations (skips consumed last first),
  each followed by a transformer when `cross_attention`, then an optional 2x upsampler."""
  out_channels: int
  num_layers: int
  add_upsample: bool
  cross_attention: bool
  heads: int = 8
  transformer_layers: int = 1
  use_linear_projection: bool = False
  groups: int = 32
  eps: float = 1e-5
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skips, temb, context):
    resnet = layers.maybe_remat(layers.ResnetBlock2D, self.remat)
    transformer = layers.maybe_remat(layers.Transformer2DModel, self.remat)
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - i].astype(x.dtype)], axis=-1)
      x = resnet(self.out_channels, self.groups, self.eps, self.dtype, name=f"resnets_{i}")(x, temb)
      if self.cross_attention:
        x = transformer(self.heads, self.out_channels // self.heads, self.transformer_layers, self.groups,
                        self.use_linear_projection, self.dtype, name=f"attentions_{i}")(x, context)
    if self.add_upsample:
      x = layers.Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
    return x


class UNetMidBlock2DCrossAttn(nn.Module):
  """resnet, transformer, resnet at the lowest resolution."""
  heads: int = 8
  transformer_layers: int = 1
  use_linear_projection: bool = False
  groups: int = 32
  eps: float = 1e-5
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context):
    resnet = layers.maybe_remat(layers.ResnetBlock2D, self.remat)
    transformer = layers.maybe_remat(layers.Transformer2DModel, self.remat)
    c = x.shape[-1]
    x = resnet(c, self.groups, self.eps, self.dtype, name="resnets_0")(x, temb)
    x = transformer(self.heads, c // self.heads, self.transformer_layers, self.groups,
                    self.use_linear_projection, self.dtype, name="attentions_0")(x, context)
    return resnet(c, self.groups, self.eps, self.dtype, name="resnets_1")(x, temb)


_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


class UNetEncoder(nn.Module):
  """Time embedding, `conv_in`, down blocks and mid block of the SD UNet.

  `encode` returns `(mid_out, skips, temb)`: the mid-block output (before any residual), the
  skip tensors in diffusers order (conv_in output first; one per ControlNet residual), and the
  time embedding. `hint`, shaped like the conv_in output, is added right after `conv_in`
  (where ControlNet adds its conditioning embedding).
  """
  in_channels: int = 4  # latent channels in
  out_channels: int = 4  # eps channels out
  layers_per_block: int = 2
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  down_block_types: Sequence[str] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: Sequence[str] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  cross_attention_dim: int = 768  # context width (Dense layers infer it; kept for the config)
  attention_head_dim: Union[int, Sequence[int]] = 8  # heads per block, diffusers' naming
  transformer_layers_per_block: int = 1
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  downsample_padding: int = 1
  dtype: Dtype = jnp.float32  # activations; parameters stay float32
  remat: bool = False  # recompute each resnet / transformer in the backward pass

  def _heads(self):
    return _per_block(self.attention_head_dim, len(self.block_out_channels))

  def _block_kwargs(self):
    return dict(transformer_layers=self.transformer_layers_per_block, use_linear_projection=self.use_linear_projection,
                groups=self.norm_num_groups, eps=self.norm_eps, remat=self.remat, dtype=self.dtype)

  def setup(self):
    for t in self.down_block_types:
      if t not in _DOWN_TYPES:
        raise ValueError(f"unsupported down block type {t!r}; expected one of {tuple(_DOWN_TYPES)}")
    c0 = self.block_out_channels[0]
    self.time_embedding = layers.TimestepEmbedding(4 * c0, dtype=self.dtype)
    self.conv_in = layers.conv(c0, 3, self.dtype, None)
    heads, n = self._heads(), len(self.block_out_channels)
    self.down_blocks = [
        DownBlock2D(c, self.layers_per_block, add_downsample=i < n - 1, cross_attention=_DOWN_TYPES[t],
                    heads=heads[i], downsample_padding=self.downsample_padding, **self._block_kwargs())
        for i, (c, t) in enumerate(zip(self.block_out_channels, self.down_block_types))
    ]
    self.mid_block = UNetMidBlock2DCrossAttn(heads=heads[-1], **self._block_kwargs())

  def time_proj(self, timesteps, batch):
    t = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))
    return layers.get_timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos, self.freq_shift)

  def encode(self, sample, timesteps, encoder_hidden_states, hint=None):
    temb = self.time_embedding(self.time_proj(timesteps, sample.shape[0]).astype(self.dtype))
    context = encoder_hidden_states.astype(self.dtype)
    x = self.conv_in(sample.astype(self.dtype))
    if hint is not None:
      x = x + hint.astype(x.dtype)
    skips = [x]
    for block in self.down_blocks:
      x, block_skips = block(x, temb, context)
      skips.extend(block_skips)
    return self.mid_block(x, temb, context), tuple(skips), temb

  def __call__(self, sample, timesteps, encoder_hidden_states, hint=None):
    return self.encode(sample, timesteps, encoder_hidden_states, hint)


class UNet2DConditionModel(UNetEncoder):
  """The full SD UNet: `eps = unet(z_t (B,H,W,C), t (B,) or scalar, context (B,L,D))`.

  `down_residuals` (one per skip, shapes from `skip_shapes`) and `mid_residual` are added to the
  skips and to the mid-block output, as diffusers' `down_block_additional_residuals` and
  `mid_block_additional_residual`. The output is float32 whatever `dtype`.
  """

  def setup(self):
    super().setup()
    for t in self.up_block_types:
      if t not in _UP_TYPES:
        raise ValueError(f"unsupported up block type {t!r}; expected one of {tuple(_UP_TYPES)}")
    rev, heads, n = self.block_out_channels[::-1], self._heads()[::-1], len(self.block_out_channels)
    self.up_blocks = [
        UpBlock2D(c, self.layers_per_block + 1, add_upsample=i < n - 1, cross_attention=_UP_TYPES[t],
                  heads=heads[i], **self._block_kwargs())
        for i, (c, t) in enumerate(zip(rev, self.up_block_types))
    ]
    self.conv_norm_out = layers.group_norm(self.norm_num_groups, self.norm_eps, self.dtype, None)
    self.conv_out = layers.conv(self.out_channels, 3, self.dtype, None)

  def __call__(self, sample, timesteps, encoder_hidden_states, down_residuals=None, mid_residual=None):
    x, skips, temb = self.encode(sample, timesteps, encoder_hidden_states)
    context = encoder_hidden_states.astype(self.dtype)
    if down_residuals is not None:
      if len(down_residuals) != len(skips):
        raise ValueError(f"expected {len(skips)} down residuals, got {len(down_residuals)}")
      skips = tuple(s + r.astype(s.dtype) for s, r in zip(skips, down_residuals))
    if mid_residual is not None:
      x = x + mid_residual.astype(x.dtype)
    for block in self.up_blocks:
      k = self.layers_per_block + 1
      x = block(x, skips[-k:], temb, context)
      skips = skips[:-k]
    x = self.conv_out(nn.silu(self.conv_norm_out(x)))
    return x.astype(jnp.float32)


def skip_shapes(unet_cfg, latent_hw):
  """Shapes (H, W, C), without batch, of the skips `encode` returns and of the mid output.

  `unet_cfg` is a config with `block_out_channels` and `layers_per_block` (a ConfigDict or a
  module). Returns `(skips, mid)`.
  """
  h, w = latent_hw
  channels = tuple(unet_cfg.block_out_channels)
  skips = [(h, w, channels[0])]
  for i, c in enumerate(channels):
    skips += [(h, w, c)] * unet_cfg.layers_per_block
    if i < len(channels) - 1:
      h, w = (h + 1) // 2, (w + 1) // 2
      skips.append((h, w, c))
  return tuple(skips), (h, w, channels[-1])


def from_config(unet_cfg, cls=UNet2DConditionModel, **overrides):
  """Builds `cls` (the UNet, or `UNetEncoder` and its subclasses) from a config section
  (`config.model.unet`) or a plain dict; `overrides` replace or add fields."""
  kwargs = dict(unet_cfg.items() if hasattr(unet_cfg, "items") else unet_cfg)
  kwargs.update(overrides)
  for key in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim"):
    if isinstance(kwargs.get(key), list):
      kwargs[key] = tuple(kwargs[key])
  if isinstance(kwargs.get("dtype"), str):
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return cls(**kwargs)
