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


class GroupNorm(nn.Module):
  """`nn.GroupNorm` (two-pass variance, statistics in float32; same `scale` and `bias`), computed
  from per-channel sums over the spatial axes, grouped afterwards, and applied as one per-channel
  multiply-add. Reducing over the (..., groups, channels / groups) view as linen does runs 3-9x
  slower forward and 1.6-2x slower forward + backward on XLA:CPU at UNet and VAE shapes."""
  num_groups: int
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, c, g = x.shape[0], x.shape[-1], self.num_groups
    if c % g:
      raise ValueError(f"{c} channels are not divisible into {g} groups")
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    axes = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * (c // g)

    def per_group(channel_sums):  # (B, C) -> each channel's group mean, broadcastable to x
      means = channel_sums.reshape(b, g, c // g).sum(-1) / count
      return jnp.repeat(means, c // g, axis=-1).reshape((b,) + (1,) * len(axes) + (c,))

    x = x.astype(jnp.float32)
    mean = per_group(jnp.sum(x, axes))
    var = per_group(jnp.sum(jnp.square(x - mean), axes))
    a = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x * a + (bias - mean * a)).astype(self.dtype)


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> GroupNorm:
  return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


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


# Nearest 2x upsampling followed by a 3x3 conv, per output phase a (row or column parity): the
# three taps fall on two input pixels, offsets (-1, 0) for a = 0 and (0, +1) for a = 1, with
# these tap sums.
_PHASE_TAPS = jnp.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], jnp.float32)


class UpsampleConv(nn.Module):
  """`conv3x3(nearest_2x(x))` with a 3x3 kernel (diffusers' `Upsample2D.conv`), computed as one
  2x2 conv on x giving the four output phases, then interleaved: 2.25x fewer FLOPs than the
  conv on the upsampled map, and no gradient through the upsampling. Same result up to float
  rounding (the taps that land on the same input pixel are summed first)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    # 3x3 kernel -> 2x2 kernel (p, q, in, row phase a, column phase b, out): the phases as outputs.
    phases = jnp.einsum("apu,bqv,uvio->pqiabo", _PHASE_TAPS.astype(kernel.dtype), _PHASE_TAPS.astype(kernel.dtype), kernel)
    b, h, w, _ = x.shape
    # Explicit pad + VALID: XLA:CPU's kernel gradient of a 2x2 conv padded on both sides is
    # about 100x slower.
    y = jax.lax.conv_general_dilated(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))),
                                     phases.reshape(2, 2, x.shape[-1], 4 * self.features), (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y.reshape(b, h + 1, w + 1, 2, 2, self.features)
    # Phase (a, b) of output pixel (2i + a, 2j + b) is y[i + a, j + b, a, b].
    rows = [jnp.stack([y[:, a:a + h, c:c + w, a, c] for c in (0, 1)], axis=3) for a in (0, 1)]
    out = jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, self.features)
    return out + bias


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv (fused: `UpsampleConv`)."""
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return UpsampleConv(self.out_channels, self.dtype, name="conv")(x)


_SCORES_PER_CHUNK = 2**20  # attention scores held at once (4 MiB in float32)


def _attention_chunk(q, k, v):
  """Softmax attention of one head's pre-scaled q (T, D) on k, v (S, D), float32 scores.
  Returns the output (T, D) and the row log-sum-exp (T,)."""
  s = jnp.einsum("td,sd->ts", q, k, preferred_element_type=jnp.float32)
  m = jnp.max(s, -1, keepdims=True)
  e = jnp.exp(s - m)
  l = jnp.sum(e, -1, keepdims=True)
  out = jnp.einsum("ts,sd->td", e, v.astype(jnp.float32)) / l
  return out, (m + jnp.log(l))[..., 0]


def _row_block(rows: int, cols: int) -> int:
  """Query rows attended at once so that one block's scores stay near 2 x `_SCORES_PER_CHUNK`
  entries: all of them for short sequences, a divisor of `rows` for long ones. (One head of
  4096 tokens, head_dim 8: 512-row blocks 530 ms, 256-row 610 ms, 1024-row 710 ms per 64 heads;
  fewer loop iterations against blocks that outgrow the caches.)"""
  block = min(rows, max(1, 2 * _SCORES_PER_CHUNK // cols))
  while rows % block:
    block -= 1
  return block


def _attention_rows(q, k, v):
  """`_attention_chunk` of one head, over blocks of query rows when its scores would not fit
  the chunk (e.g. 4096 tokens: 16 M scores); each block sees every key, so no rescaling."""
  rows, dim = q.shape
  block = _row_block(rows, k.shape[0])
  if block == rows:
    return _attention_chunk(q, k, v)
  out, lse = jax.lax.map(lambda qb: _attention_chunk(qb, k, v), q.reshape(-1, block, dim))
  return out.reshape(rows, dim), lse.reshape(rows)


def _attention_rows_bwd(q, k, v, d_out, lse, delta):
  """Gradients of one head from the saved log-sum-exp, accumulated over the same row blocks."""
  f32 = lambda t: t.astype(jnp.float32)

  def block_grads(q, d_out, lse, delta):
    p = jnp.exp(jnp.einsum("td,sd->ts", q, k, preferred_element_type=jnp.float32) - lse[..., None])
    dv = jnp.einsum("ts,td->sd", p, f32(d_out))
    dp = jnp.einsum("td,sd->ts", f32(d_out), f32(v))
    ds = p * (dp - delta[..., None])
    return jnp.einsum("ts,sd->td", ds, f32(k)), jnp.einsum("ts,td->sd", ds, f32(q)), dv

  rows = q.shape[0]
  block = _row_block(rows, k.shape[0])
  if block == rows:
    dq, dk, dv = block_grads(q, d_out, lse, delta)
  else:
    split = lambda t: t.reshape((-1, block) + t.shape[1:])

    def step(acc, xs):
      dq, dk, dv = block_grads(*xs)
      return (acc[0] + dk, acc[1] + dv), dq

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(step, zeros, tuple(map(split, (q, d_out, lse, delta))))
    dq = dq.reshape(q.shape)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _chunked(fn, args, tokens: int):
  """Per-head `fn` mapped over the leading (batch x heads) axis, as many heads at a time as keep
  the score matrices near `_SCORES_PER_CHUNK` entries (cache-sized)."""
  per_chunk = max(1, _SCORES_PER_CHUNK // tokens)
  if per_chunk >= args[0].shape[0]:
    return jax.vmap(fn)(*args)
  return jax.lax.map(lambda a: fn(*a), args, batch_size=per_chunk)


@jax.custom_vjp
def _flash_attention(q, k, v):
  """Memory-efficient attention on (N, T, D) heads: the scores are never held for all heads at
  once (nor, for long sequences, for all rows of one head), and the backward pass recomputes
  them from the saved log-sum-exp (as FlashAttention)."""
  return _flash_attention_fwd(q, k, v)[0]


def _flash_attention_fwd(q, k, v):
  out, lse = _chunked(_attention_rows, (q, k, v), q.shape[1] * k.shape[1])
  out = out.astype(q.dtype)
  return out, (q, k, v, out, lse)


def _flash_attention_bwd(residuals, d_out):
  q, k, v, out, lse = residuals
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
  return _chunked(_attention_rows_bwd, (q, k, v, d_out, lse, delta), q.shape[1] * k.shape[1])


_flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd)


def attend(q, k, v, heads: int):
  """Multi-head scaled dot-product attention on (B, T, heads * head_dim) tokens.

  Heads are moved to the batch axis and attended a few at a time with a hand-written backward
  pass (`_flash_attention`): on CPU this runs several times faster than materialising every
  head's scores, and keeps only q, k, v, the output and the log-sum-exp for the backward pass.
  """
  b, tq, _ = q.shape
  head_dim = q.shape[-1] // heads
  split = lambda t: t.reshape(b, t.shape[1], heads, head_dim).transpose(0, 2, 1, 3).reshape(b * heads, t.shape[1], head_dim)
  out = _flash_attention(split(q * (1.0 / math.sqrt(head_dim))), split(k), split(v))
  return out.reshape(b, heads, tq, head_dim).transpose(0, 2, 1, 3).reshape(b, tq, heads * head_dim)


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
