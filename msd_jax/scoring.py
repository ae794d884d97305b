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

Beyond the paper, `distance="whitened"` replaces 1 - cos by the Mahalanobis length of the feature
residual r = Psi_n(x) - Psi_n(x_hat), with the mean and covariance of r fitted on defect-free
training images and their reconstructions (`fit_whitening`). A model that reconstructs texture
imperfectly leaves residuals of a typical direction and size on every image; whitening measures
a residual against those, so a defect's atypical residual stands out from the texture's. Each
layer's distance is divided by its root mean square on the fitted images, so layers add with
equal weight. The covariance is shrunk towards `shrinkage` times its mean variance.

Two more switches beyond the paper, for reconstructions that are faithful in texture but not in
overall tone: `match_mean` shifts x_hat by the per-image, per-channel mean of x - x_hat before
scoring (a brightness or colour offset of the whole reconstruction is not a defect; a defect
covering a tenth of the image loses a tenth of its residual), and the layer name `pixels` in
`layers` adds the images themselves as a stride-1 layer, so defects of one or two pixels, which
a stride-4 backbone map barely resolves, count. `feature_loss` uses the backbone layers only.

`local_contrast` > 0 adds a second image score, that of the map minus its Gaussian background of
that many pixels (the map's local peaks): a small defect is a peak over its own surroundings,
while the residual of a texture the model does not reproduce exactly is high all over the
image. Each score is z-scored on defect-free training images (`fit_score_norm`) and the image
score is the larger z.
"""
import functools
from typing import Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def cosine_distance(a, b, eps: float = 1e-8):
  """1 - cos over the last axis, as half the squared distance of the unit vectors."""
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
  return 0.5 * jnp.sum(jnp.square(a - b), axis=-1)


def whitened_distance(a, b, whitening: Mapping[str, jax.Array]):
  """|(a - b - mean) @ whiten| / scale over the last axis (one layer's `fit_whitening` entry)."""
  r = (a - b - whitening["mean"]) @ whitening["whiten"]
  return jnp.sqrt(jnp.sum(jnp.square(r), axis=-1)) / whitening["scale"]


def anomaly_map(feats_x: Mapping[str, jax.Array], feats_xhat: Mapping[str, jax.Array],
                layers: Sequence[str], out_hw: tuple[int, int],
                whitening: Optional[Mapping[str, Mapping[str, jax.Array]]] = None) -> jax.Array:
  """Sum over `layers` of the bilinearly upsampled per-position distance -> [B, H, W]: 1 - cos,
  or with `whitening` (per layer, from `fit_whitening`) the whitened residual length."""
  total = 0.0
  for name in layers:
    a, b = feats_x[name].astype(jnp.float32), feats_xhat[name].astype(jnp.float32)
    d = cosine_distance(a, b) if whitening is None else whitened_distance(a, b, whitening[name])
    total = total + jax.image.resize(d, (d.shape[0], *out_hw), "bilinear")
  return total


def residual_moments(feats_x, feats_xhat, layers: Sequence[str], valid) -> dict:
  """Per layer, over the positions of the `valid` images: count, sum of r and sum of r r^T,
  r = feats_x - feats_xhat (float32; summed across batches by `fit_whitening`)."""
  out = {}
  for name in layers:
    r = (feats_x[name].astype(jnp.float32) - feats_xhat[name].astype(jnp.float32))
    w = jnp.broadcast_to(valid.astype(jnp.float32)[:, None, None], r.shape[:3]).reshape(-1)
    r = r.reshape(-1, r.shape[-1])
    out[name] = {"count": jnp.sum(w), "sum": w @ r, "outer": (r * w[:, None]).T @ r}
  return out


def whitening_from_moments(moments: Mapping[str, Mapping[str, np.ndarray]],
                           shrinkage: float) -> dict:
  """Per layer {"mean" [C], "whiten" [C, C], "scale"}: whiten @ whiten.T is the inverse of the
  residual covariance shrunk towards `shrinkage` x its mean variance; scale is the root mean
  square whitened length of the fitted residuals, sqrt(trace(P Cov))."""
  out = {}
  for name, m in moments.items():
    n = float(m["count"])
    if n < 2:
      raise ValueError(f"whitening layer {name}: needs at least 2 feature positions, got {n}")
    mean = np.asarray(m["sum"], np.float64) / n
    cov = np.asarray(m["outer"], np.float64) / n - np.outer(mean, mean)
    cov = (cov + cov.T) / 2
    shrunk = cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    precision = np.linalg.inv(shrunk)
    whiten = np.linalg.cholesky((precision + precision.T) / 2)
    scale = np.sqrt(max(float(np.trace(precision @ cov)), 1e-12))
    out[name] = {"mean": mean.astype(np.float32), "whiten": whiten.astype(np.float32),
                 "scale": np.float32(scale)}
  return out


def fit_whitening(moments_fn: Callable, batches: Iterable, shrinkage: float) -> dict:
  """`whitening_from_moments` of the moments summed (in float64) over `moments_fn(*batch)`."""
  total = None
  for batch in batches:
    m = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.device_get(moments_fn(*batch)))
    total = m if total is None else jax.tree.map(np.add, total, m)
  if total is None:
    raise ValueError("fit_whitening: no batches")
  return whitening_from_moments(total, shrinkage)


def whitening_to_json(whitening: Mapping) -> dict:
  return {k: {"mean": np.asarray(v["mean"]).tolist(), "whiten": np.asarray(v["whiten"]).tolist(),
              "scale": float(v["scale"])} for k, v in whitening.items()}


def whitening_from_json(data: Mapping) -> dict:
  return {k: {"mean": np.asarray(v["mean"], np.float32),
              "whiten": np.asarray(v["whiten"], np.float32),
              "scale": np.float32(v["scale"])} for k, v in data.items()}


def matched_mean(x, x_hat):
  """x_hat shifted by the per-image, per-channel mean of x - x_hat ([B, H, W, C])."""
  offset = jnp.mean(x.astype(jnp.float32) - x_hat.astype(jnp.float32), axis=(1, 2), keepdims=True)
  return (x_hat + offset).astype(x_hat.dtype)


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


def uses_score_norm(config) -> bool:
  """Whether `config.model.scorer` combines several image scores (and so needs `fit_score_norm`)."""
  return config.get("local_contrast", 0.0) > 0


def score_parts(m, config) -> jax.Array:
  """[B, k] image scores of smoothed maps [B, H, W]: the map's, and with `local_contrast` > 0 that
  of the map minus its Gaussian background."""
  parts = [image_score(m, config.pool_size, config.border_margin)]
  if uses_score_norm(config):
    peaks = m - smooth(m, config.local_contrast)
    parts.append(image_score(peaks, config.pool_size, config.border_margin))
  return jnp.stack(parts, axis=-1)


def combine_scores(parts, score_norm: Mapping[str, jax.Array]) -> jax.Array:
  """[B, k] -> [B]: the largest part after z-scoring with `fit_score_norm`'s mean and std."""
  return jnp.max((parts - score_norm["mean"]) / score_norm["std"], axis=-1)


def image_scores(parts, config, score_norm: Optional[Mapping[str, jax.Array]] = None):
  """[B, k] `score_parts` -> [B] image scores: the map's alone, or with `local_contrast` > 0 the
  parts combined with `score_norm` (required then)."""
  if not uses_score_norm(config):
    return parts[:, 0]
  if score_norm is None:
    raise ValueError("the scorer combines image scores (local_contrast > 0) but no score_norm "
                     "was given; fit it with scoring.fit_score_norm on defect-free training "
                     "images")
  return combine_scores(parts, score_norm)


def fit_score_norm(parts_fn: Callable, batches: Iterable) -> dict:
  """Mean and std of each image-score part over the valid images of `parts_fn(*batch) ->
  (parts [B, k], valid [B])`, for `combine_scores`."""
  rows = []
  for batch in batches:
    parts, valid = jax.device_get(parts_fn(*batch))
    rows.append(np.asarray(parts, np.float64)[np.asarray(valid, bool)])
  parts = np.concatenate(rows) if rows else np.zeros((0, 0))
  if len(parts) < 2:
    raise ValueError(f"fit_score_norm: needs at least 2 images, got {len(parts)}")
  return {"mean": parts.mean(0).astype(np.float32),
          "std": np.maximum(parts.std(0), 1e-12).astype(np.float32)}


def score_norm_to_json(score_norm: Mapping) -> dict:
  return {k: np.asarray(v).tolist() for k, v in score_norm.items()}


def score_norm_from_json(data: Mapping) -> dict:
  return {k: np.asarray(data[k], np.float32) for k in ("mean", "std")}


PIXELS = "pixels"  # the layer name of the (preprocessed) images themselves, stride 1


def extract_features(module, variables, x, layers: Sequence[str], input_pad: int = 0,
                     pad_mode: str = "reflect") -> dict[str, jax.Array]:
  """Backbone features of [-1, 1] images, optionally computed on a padded copy and cropped back;
  the layer `PIXELS` is the preprocessed images."""
  x = module.preprocess(x)
  if input_pad:
    x = jnp.pad(x, ((0, 0), (input_pad, input_pad), (input_pad, input_pad), (0, 0)), mode=pad_mode)
  feats = dict(module.apply(variables, x)) if set(layers) - {PIXELS} else {}
  feats[PIXELS] = x
  out = {}
  for name in layers:
    f = feats[name]
    if input_pad:
      stride = 1 if name == PIXELS else int(name[1:])
      if input_pad % stride:
        raise ValueError(f"input_pad={input_pad} is not a multiple of the stride of layer {name}")
      c = input_pad // stride
      f = f[:, c:f.shape[1] - c, c:f.shape[2] - c]
    out[name] = f
  return out


def paired_features(module, variables, x, x_hat, config, layers=None):
  """Scorer features of x and of x_hat (one backbone batch), after `input_scale`, for `layers`
  (default `config.layers`)."""
  both = jnp.concatenate([x, x_hat])
  scale = config.get("input_scale", 1)
  if scale != 1:
    hw = x.shape[1:3]
    both = jax.image.resize(both, (both.shape[0], round(hw[0] * scale), round(hw[1] * scale),
                                   both.shape[3]), "bilinear")
  layers = tuple(config.layers if layers is None else layers)
  feats = extract_features(module, variables, both, layers, config.input_pad,
                           config.pad_mode)
  b = x.shape[0]
  return {k: v[:b] for k, v in feats.items()}, {k: v[b:] for k, v in feats.items()}


def feature_loss(module, variables, x, x_hat, config) -> jax.Array:
  """The scorer's own measure as a training loss: 1 - cos between the features of x (held
  fixed) and x_hat, averaged over positions, images and `config.layers` (the paper's map before
  upsampling and smoothing). Differentiable in x_hat; the `perceptual_weight` terms."""
  layers = tuple(n for n in config.layers if n != PIXELS)
  if not layers:
    raise ValueError(f"the perceptual term needs a backbone layer; the scorer has {config.layers}")
  fx, fh = paired_features(module, variables, jax.lax.stop_gradient(x), x_hat, config, layers)
  return sum(jnp.mean(cosine_distance(fx[n], fh[n])) for n in layers) / len(layers)


def uses_whitening(config) -> bool:
  """Whether `config.model.scorer` scores whitened residuals (and so needs `fit_whitening`)."""
  distance = config.get("distance", "cosine")
  if distance not in ("cosine", "whitened"):
    raise ValueError(f"unknown scorer distance {distance!r}; use 'cosine' or 'whitened'")
  return config.map_type == "feature" and distance == "whitened"


def make_moments_fn(module, variables, config):
  """Jitted `f(x, x_hat, valid) -> residual_moments` of the scorer layers."""

  @jax.jit
  def moments(variables, x, x_hat, valid):
    if config.get("match_mean", False):
      x_hat = matched_mean(x, x_hat)
    fx, fh = paired_features(module, variables, x, x_hat, config)
    return residual_moments(fx, fh, tuple(config.layers), valid)

  return functools.partial(moments, variables)


def make_score_fn(module, variables, config, parts: bool = False):
  """Jitted `f(x, x_hat, whitening=None, score_norm=None) -> (maps [B, H, W], scores [B])` for
  `config.model.scorer`.

  x and x_hat are [B, H, W, 3] in [-1, 1]; both go through the backbone in one batch.
  `whitening` (from `fit_whitening`) is required when the scorer's distance is "whitened",
  `score_norm` (from `fit_score_norm`) when it combines image scores (`local_contrast`). With
  `parts`, the scores are the uncombined `score_parts` [B, k] instead.
  """
  layers = tuple(config.layers)
  whitened = uses_whitening(config)

  @jax.jit
  def score(variables, x, x_hat, whitening=None, score_norm=None):
    hw = x.shape[1:3]
    if config.get("match_mean", False):
      x_hat = matched_mean(x, x_hat)
    if config.map_type == "pixel":
      m = pixel_difference_map(x, x_hat)
    elif config.map_type == "feature":
      if whitened and whitening is None:
        raise ValueError("the scorer's distance is 'whitened' but no whitening was given; fit "
                         "it with scoring.fit_whitening on defect-free training images")
      fx, fh = paired_features(module, variables, x, x_hat, config)
      m = anomaly_map(fx, fh, layers, hw, whitening if whitened else None)
    else:
      raise ValueError(f"unknown map_type {config.map_type!r}; use 'feature' or 'pixel'")
    m = smooth(m, config.sigma)
    scores = score_parts(m, config)
    return m, scores if parts else image_scores(scores, config, score_norm)

  return functools.partial(score, variables)
