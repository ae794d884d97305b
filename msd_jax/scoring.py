"""Anomaly maps and image scores: the paper's equations (1) and (2).

  M = sum_n upsample(1 - cos(Psi_n(x), Psi_n(x_hat)))   (cosine over channels, per position)
  M <- Gaussian(M, sigma);   image score = max(avg_pool(M, pool_size))

Choices the paper leaves open:
- `1 - cos(a, b)` is computed as `0.5 * |a/|a| - b/|b||^2` (equal whenever both norms are
  non-zero), so identical features give exactly 0, also where a feature vector vanishes.
- Upsampling is bilinear with half-pixel centres (torch `align_corners=False`).
- Smoothing matches `scipy.ndimage.gaussian_filter` (truncate 4, mode "reflect").
- Average pooling has stride 1 and no padding (windows lie inside the map).
- Borders: backbones with zero-padded convolutions respond to the image edge, which shows up as
  spurious map peaks there. Two switches, both off by default (the paper's behaviour) and meant to
  be chosen on the validation split: `input_pad` pads the scorer input by that many pixels
  (`pad_mode`, reflect by default) and crops the features back, and `border_margin` leaves that
  many pixels at each edge out of the image score (the map itself is kept whole).
- Scale: ImageNet backbones see objects at about 224 px; at small model resolutions (64 px) their
  stride-16 map is 4 x 4. `input_scale` > 1 bilinearly enlarges x and x_hat before the backbone
  (the map is still returned at the input's size), so each layer resolves finer detail.
"""
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def cosine_distance(a, b, eps: float = 1e-8):
  """1 - cos over the last axis, as half the squared distance of the unit vectors."""
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
  return 0.5 * jnp.sum(jnp.square(a - b), axis=-1)


def anomaly_map(feats_x: Mapping[str, jax.Array], feats_xhat: Mapping[str, jax.Array],
                layers: Sequence[str], out_hw: tuple[int, int]) -> jax.Array:
  """Sum over `layers` of the bilinearly upsampled per-position cosine distance -> [B, H, W]."""
  total = 0.0
  for name in layers:
    d = cosine_distance(feats_x[name].astype(jnp.float32), feats_xhat[name].astype(jnp.float32))
    total = total + jax.image.resize(d, (d.shape[0], *out_hw), "bilinear")
  return total


def pixel_difference_map(x, x_hat) -> jax.Array:
  """Mean absolute difference over channels, [B, H, W, C] -> [B, H, W] (ablation baseline)."""
  return jnp.mean(jnp.abs(x.astype(jnp.float32) - x_hat.astype(jnp.float32)), axis=-1)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
  radius = int(truncate * sigma + 0.5)
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def smooth(m, sigma: float) -> jax.Array:
  """Separable Gaussian blur of [B, H, W] maps, as `scipy.ndimage.gaussian_filter` (reflect)."""
  if sigma <= 0:
    return m
  k = jnp.asarray(gaussian_kernel(sigma))
  r = (k.shape[0] - 1) // 2
  x = jnp.pad(m[..., None], ((0, 0), (r, r), (r, r), (0, 0)), mode="symmetric")
  dn = ("NHWC", "HWIO", "NHWC")
  x = jax.lax.conv_general_dilated(x, k.reshape(-1, 1, 1, 1), (1, 1), "VALID", dimension_numbers=dn)
  x = jax.lax.conv_general_dilated(x, k.reshape(1, -1, 1, 1), (1, 1), "VALID", dimension_numbers=dn)
  return x[..., 0]


def image_score(m, pool_size: int, border_margin: int = 0) -> jax.Array:
  """Max of the stride-1 average-pooled map, ignoring `border_margin` pixels per edge -> [B]."""
  if border_margin:
    m = m[:, border_margin:-border_margin, border_margin:-border_margin]
  if pool_size > 1:
    m = jax.lax.reduce_window(m, 0.0, jax.lax.add, (1, pool_size, pool_size), (1, 1, 1), "VALID")
    m = m / (pool_size * pool_size)
  return jnp.max(m, axis=(1, 2))


def extract_features(module, variables, x, layers: Sequence[str], input_pad: int = 0,
                     pad_mode: str = "reflect") -> dict[str, jax.Array]:
  """Backbone features of [-1, 1] images, optionally computed on a padded copy and cropped back."""
  x = module.preprocess(x)
  if input_pad:
    x = jnp.pad(x, ((0, 0), (input_pad, input_pad), (input_pad, input_pad), (0, 0)), mode=pad_mode)
  feats = module.apply(variables, x)
  out = {}
  for name in layers:
    f = feats[name]
    if input_pad:
      stride = int(name[1:])
      if input_pad % stride:
        raise ValueError(f"input_pad={input_pad} is not a multiple of the stride of layer {name}")
      c = input_pad // stride
      f = f[:, c:f.shape[1] - c, c:f.shape[2] - c]
    out[name] = f
  return out


def make_score_fn(module, variables, config):
  """Jitted `f(x, x_hat) -> (maps [B, H, W], scores [B])` for `config.model.scorer`.

  x and x_hat are [B, H, W, 3] in [-1, 1]; both go through the backbone in one batch.
  """
  layers = tuple(config.layers)

  @jax.jit
  def score(variables, x, x_hat):
    hw = x.shape[1:3]
    if config.map_type == "pixel":
      m = pixel_difference_map(x, x_hat)
    elif config.map_type == "feature":
      both = jnp.concatenate([x, x_hat])
      scale = config.get("input_scale", 1)
      if scale != 1:
        both = jax.image.resize(both, (both.shape[0], round(hw[0] * scale), round(hw[1] * scale),
                                       both.shape[3]), "bilinear")
      feats = extract_features(module, variables, both, layers, config.input_pad, config.pad_mode)
      b = x.shape[0]
      m = anomaly_map({k: v[:b] for k, v in feats.items()}, {k: v[b:] for k, v in feats.items()},
                      layers, hw)
    else:
      raise ValueError(f"unknown map_type {config.map_type!r}; use 'feature' or 'pixel'")
    m = smooth(m, config.sigma)
    return m, image_score(m, config.pool_size, config.border_margin)

  return functools.partial(score, variables)
