"""The Stable Diffusion v1 KL autoencoder (diffusers `AutoencoderKL`), NHWC.

Images in [-1, 1], (B, H, W, 3) -> latents (B, H/f, W/f, latent_channels) with
f = 2 ** (len(block_out_channels) - 1). `encode` gives the diagonal Gaussian posterior;
multiply its sample by `scaling_factor` before diffusion and divide by it before `decode`.
"""
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from msd_jax.models import layers

Dtype = Any
_RESNET_EPS = 1e-6


@flax.struct.dataclass
class DiagonalGaussian:
  """Posterior N(mean, exp(logvar)); logvar clipped to [-30, 20] as in diffusers."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments):
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key):
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self):
    return self.mean

  def kl(self):
    """KL to N(0, I), summed over H, W, C: shape (B,)."""
    return 0.5 * jnp.sum(self.mean**2 + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3))


def space_to_depth(x, f: int):
  """(B, H, W, C) -> (B, H/f, W/f, f*f*C): each f x f patch as one vector."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // f, w // f, f * f * c)


def depth_to_space(x, f: int):
  """The inverse of `space_to_depth`."""
  b, h, w, fc = x.shape
  c = fc // (f * f)
  x = x.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * f, w * f, c)


class UNetMidBlock2D(nn.Module):
  """resnet, spatial self-attention, resnet (no time embedding)."""
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = layers.ResnetBlock2D(c, self.groups, _RESNET_EPS, self.dtype, name="resnets_0")(x)
    x = layers.SpatialSelfAttention(1, self.groups, _RESNET_EPS, self.dtype, name="attentions_0")(x)
    return layers.ResnetBlock2D(c, self.groups, _RESNET_EPS, self.dtype, name="resnets_1")(x)


class EncoderBlock(nn.Module):
  """diffusers `DownEncoderBlock2D`: resnets, then an optional right/bottom-padded stride-2 conv."""
  out_channels: int
  num_layers: int
  add_downsample: bool
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = layers.ResnetBlock2D(self.out_channels, self.groups, _RESNET_EPS, self.dtype, name=f"resnets_{i}")(x)
    if self.add_downsample:
      x = layers.Downsample2D(self.out_channels, 0, self.dtype, name="downsamplers_0")(x)
    return x


class DecoderBlock(nn.Module):
  """diffusers `UpDecoderBlock2D`: resnets, then an optional 2x upsampler."""
  out_channels: int
  num_layers: int
  add_upsample: bool
  groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = layers.ResnetBlock2D(self.out_channels, self.groups, _RESNET_EPS, self.dtype, name=f"resnets_{i}")(x)
    if self.add_upsample:
      x = layers.Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  out_channels: int  # 2 x latent channels (mean and logvar)
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.conv(self.block_out_channels[0], 3, self.dtype, "conv_in")(x)
    n = len(self.block_out_channels)
    for i, c in enumerate(self.block_out_channels):
      x = EncoderBlock(c, self.layers_per_block, i < n - 1, self.groups, self.dtype, name=f"down_blocks_{i}")(x)
    x = UNetMidBlock2D(self.groups, self.dtype, name="mid_block")(x)
    x = nn.silu(layers.group_norm(self.groups, _RESNET_EPS, self.dtype, "conv_norm_out")(x))
    return layers.conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    rev = tuple(self.block_out_channels)[::-1]
    x = layers.conv(rev[0], 3, self.dtype, "conv_in")(z)
    x = UNetMidBlock2D(self.groups, self.dtype, name="mid_block")(x)
    for i, c in enumerate(rev):
      x = DecoderBlock(c, self.layers_per_block + 1, i < len(rev) - 1, self.groups, self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(layers.group_norm(self.groups, _RESNET_EPS, self.dtype, "conv_norm_out")(x))
    return layers.conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """KL autoencoder. `model.apply(v, x, method="encode")` -> `DiagonalGaussian`;
  `model.apply(v, z, method="decode")` -> image; `__call__(x, key)` -> (reconstruction,
  posterior), decoding a posterior sample (the mode when `key` is None)."""
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  layers_per_block: int = 2
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  down_block_types: Sequence[str] = ("DownEncoderBlock2D",) * 4
  up_block_types: Sequence[str] = ("UpDecoderBlock2D",) * 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215  # latents = scaling_factor * posterior sample
  dtype: Dtype = jnp.float32  # activations; parameters stay float32
  # Not in diffusers: a linear autoencoder of f x f patches beside the deep one (its 1x1 convs
  # on `space_to_depth(x)` and to `depth_to_space`), so the deep path learns the residual.
  # On fine texture such as granite at 64 px a linear patch code of 16 channels is nearly
  # lossless, while the deep path alone, trained for minutes, learns little beyond local mean
  # colour (cf. DC-AE's space-to-channel shortcuts). Off for converted SD checkpoints.
  patch_shortcut: bool = False
  # False: the linear patch autoencoder alone (needs `patch_shortcut`; `block_out_channels` then
  # only sets f), with a learnt per-channel posterior log-variance. After a short training run
  # on the demo's data the deep paths carried 0.3% of the latent and left the L1 error where the
  # patch code alone has it (0.0146), while costing a third of each diffusion training step.
  deep: bool = True

  def setup(self):
    if set(self.down_block_types) != {"DownEncoderBlock2D"} or set(self.up_block_types) != {"UpDecoderBlock2D"}:
      raise ValueError(f"unsupported VAE block types {self.down_block_types} / {self.up_block_types}")
    if not (self.deep or self.patch_shortcut):
      raise ValueError("an autoencoder without deep paths (deep=False) needs patch_shortcut=True")
    if self.deep:
      self.encoder = Encoder(2 * self.latent_channels, self.block_out_channels,
                             self.layers_per_block, self.norm_num_groups, self.dtype)
      self.quant_conv = layers.conv(2 * self.latent_channels, 1, self.dtype, None)
      self.post_quant_conv = layers.conv(self.latent_channels, 1, self.dtype, None)
      self.decoder = Decoder(self.out_channels, self.block_out_channels, self.layers_per_block,
                             self.norm_num_groups, self.dtype)
    if self.patch_shortcut:
      f = self.downsample_factor
      self.patch_encoder = layers.conv(self.latent_channels, 1, self.dtype, None)
      self.patch_decoder = layers.conv(f * f * self.out_channels, 1, self.dtype, None)
    if not self.deep:
      self.patch_logvar = self.param("patch_logvar", nn.initializers.zeros, (self.latent_channels,))

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, x) -> DiagonalGaussian:
    x = x.astype(self.dtype)
    if not self.deep:
      mean = self.patch_encoder(space_to_depth(x, self.downsample_factor))
      logvar = jnp.broadcast_to(self.patch_logvar.astype(mean.dtype), mean.shape)
      return DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], axis=-1))
    moments = self.quant_conv(self.encoder(x))
    if self.patch_shortcut:
      mean, logvar = jnp.split(moments, 2, axis=-1)
      mean = mean + self.patch_encoder(space_to_depth(x, self.downsample_factor))
      moments = jnp.concatenate([mean, logvar], axis=-1)
    return DiagonalGaussian.from_moments(moments)

  def decode(self, z):
    z = z.astype(self.dtype)
    x = self.decoder(self.post_quant_conv(z)) if self.deep else 0.0
    if self.patch_shortcut:
      x = x + depth_to_space(self.patch_decoder(z), self.downsample_factor)
    return x.astype(jnp.float32)

  def __call__(self, x, key=None):
    posterior = self.encode(x)
    z = posterior.mode() if key is None else posterior.sample(key)
    return self.decode(z), posterior


def from_config(vae_cfg, **overrides) -> AutoencoderKL:
  """Builds the model from a config section (`config.model.vae`) or a plain dict."""
  kwargs = dict(vae_cfg.items() if hasattr(vae_cfg, "items") else vae_cfg)
  kwargs.update(overrides)
  for key in ("block_out_channels", "down_block_types", "up_block_types"):
    if isinstance(kwargs.get(key), list):
      kwargs[key] = tuple(kwargs[key])
  if isinstance(kwargs.get("dtype"), str):
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return AutoencoderKL(**kwargs)


def with_posterior_logvar(params, logvar: float):
  """`params` whose posterior starts with log-variance `logvar` everywhere (the bias of the
  logvar half of `quant_conv`; its kernel is zeroed there). diffusers' initialisation starts the
  posterior std near 1, as large as the latent itself; with LDM's KL weight (1e-6) the encoder
  shrinks it only over thousands of steps, and until then the decoder learns from latents
  swamped by sampling noise. A short run converges only from a near-deterministic start.
  Without deep paths, `patch_logvar` is set instead."""
  if "quant_conv" not in params:
    return dict(params, patch_logvar=jnp.full_like(params["patch_logvar"], logvar))
  quant = params["quant_conv"]
  half = quant["bias"].shape[-1] // 2
  kernel = jnp.asarray(quant["kernel"]).at[..., half:].set(0.0)
  bias = jnp.asarray(quant["bias"]).at[half:].set(logvar)
  return dict(params, quant_conv=dict(quant, kernel=kernel, bias=bias))


def with_patch_pca(params, images, factor: int):
  """`params` (with `patch_shortcut`) starting as the best linear patch autoencoder of `images`
  (principal components of their factor x factor patches, orthonormal, so latent distances are
  patch distances), with the deep encoder's mean and the deep decoder's output (if any) zeroed: training
  starts from the linear code and the deep paths learn what it misses. Gradient descent finds
  that linear code only slowly (its patch covariance is badly conditioned); PCA gives it in
  closed form."""
  patches = space_to_depth(jnp.asarray(images, jnp.float32), factor)
  patches = patches.reshape(-1, patches.shape[-1])
  mean = patches.mean(axis=0)
  _, _, vt = jnp.linalg.svd(patches - mean, full_matrices=False)
  k = params["patch_encoder"]["bias"].shape[-1]
  basis = vt[:k]  # (k, f*f*C)
  params = dict(params, patch_encoder={"kernel": basis.T[None, None], "bias": -mean @ basis.T},
                patch_decoder={"kernel": basis[None, None], "bias": mean})
  if "quant_conv" not in params:  # no deep paths
    return params
  quant = params["quant_conv"]
  conv_out = params["decoder"]["conv_out"]
  return dict(
      params,
      quant_conv=dict(quant, kernel=jnp.asarray(quant["kernel"]).at[..., :k].set(0.0),
                      bias=jnp.asarray(quant["bias"]).at[:k].set(0.0)),
      decoder=dict(params["decoder"], conv_out=jax.tree.map(jnp.zeros_like, conv_out)))
