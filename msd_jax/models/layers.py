"""Building blocks of the Stable Diffusion VAE and UNet, in NHWC.

Module and parameter names mirror diffusers (`resnets_0/conv1`, `attn1/to_q`, `to_out_0`,
`ff/net_0/proj`, `downsamplers_0/conv`), so a diffusers state dict maps onto them key by key.
Every module takes `dtype` (activations) and keeps float32 parameters. Group and layer norms
use the two-pass variance, as PyTorch does.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def get_timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> jax.Array:
  """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32, as diffusers' `Timesteps`."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
  emb = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """MLP on the sinusoidal embedding: linear_1, SiLU, linear_2."""
  time_embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, emb):
    emb = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(emb)
    return nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(nn.silu(emb))


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1, padding=None) -> nn.Conv:
  """PyTorch-style conv: symmetric `kernel // 2` padding unless given."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, with an optional timestep projection and a 1x1 shortcut
  when the width changes (`conv_shortcut`)."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
    h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
    if temb is not None:
      t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
    h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    return x + h


class Downsample2D(nn.Module):
  """3x3 stride-2 conv. `padding=0` is the VAE's variant: pad right and bottom by one."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding, self.padding),) * 2
    return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self.out_channels, 3, self.dtype, "conv")(x)


def attend(q, k, v, heads: int):
  """Multi-head scaled dot-product attention on (B, T, heads * head_dim) tokens."""
  b, tq, _ = q.shape
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, t.shape[2] // heads)
  out = jax.nn.dot_product_attention(split(q), split(k), split(v))
  return out.reshape(b, tq, -1)


class Attention(nn.Module):
  """diffusers `Attention` on tokens: to_q/to_k/to_v (no bias, as in the SD UNet), to_out_0.
  Self-attention when `context` is None, cross-attention otherwise."""
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    inner = self.heads * self.dim_head
    context = x if context is None else context
    q = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
    k = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
    v = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(attend(q, k, v, self.heads))


class SpatialSelfAttention(nn.Module):
  """The VAE mid-block attention (diffusers `Attention` with `group_norm` and a residual):
  GroupNorm, single-head-by-default self-attention over all pixels with biased projections."""
  heads: int = 1
  groups: int = 32
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    t = group_norm(self.groups, self.eps, self.dtype, "group_norm")(x).reshape(b, h * w, c)
    q = nn.Dense(c, dtype=self.dtype, name="to_q")(t)
    k = nn.Dense(c, dtype=self.dtype, name="to_k")(t)
    v = nn.Dense(c, dtype=self.dtype, name="to_v")(t)
    out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(attend(q, k, v, self.heads))
    return x + out.reshape(b, h, w, c)


class GEGLU(nn.Module):
  """`proj` to 2 x inner, then hidden * GELU(gate) (exact GELU)."""
  inner_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden, gate = jnp.split(nn.Dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """GEGLU (`net_0`) then a linear layer back to the width (`net_2`); inner width 4 x dim."""
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = GEGLU(self.mult * x.shape[-1], dtype=self.dtype, name="net_0")(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-norm self-attention, cross-attention to the context, and GEGLU feed-forward."""
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name=name)
    x = x + Attention(self.heads, self.dim_head, self.dtype, name="attn1")(ln("norm1")(x))
    x = x + Attention(self.heads, self.dim_head, self.dtype, name="attn2")(ln("norm2")(x), context)
    return x + FeedForward(dtype=self.dtype, name="ff")(ln("norm3")(x))


class Transformer2DModel(nn.Module):
  """GroupNorm, `proj_in` (1x1 conv, or linear with `use_linear_projection` as in SD 2),
  transformer blocks over the pixels, `proj_out`, plus the input."""
  heads: int
  dim_head: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    b, h, w, c = x.shape
    inner = self.heads * self.dim_head
    t = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
    if self.use_linear_projection:
      t = nn.Dense(inner, dtype=self.dtype, name="proj_in")(t.reshape(b, h * w, c))
    else:
      t = conv(inner, 1, self.dtype, "proj_in")(t).reshape(b, h * w, inner)
    for i in range(self.num_layers):
      t = BasicTransformerBlock(self.heads, self.dim_head, self.dtype, name=f"transformer_blocks_{i}")(t, context)
    if self.use_linear_projection:
      t = nn.Dense(c, dtype=self.dtype, name="proj_out")(t).reshape(b, h, w, c)
    else:
      t = conv(c, 1, self.dtype, "proj_out")(t.reshape(b, h, w, inner))
    return x + t


def maybe_remat(cls, remat: bool):
  """`nn.remat(cls)` (recompute activations in the backward pass) when `remat`, else `cls`;
  parameter names are unchanged either way."""
  return nn.remat(cls) if remat else cls
