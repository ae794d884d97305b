"""Synthetic anomalies on defect-free images, for restoration training (`MSD.msd_loss`).

A model trained only to denoise defect-free images, with SGEN reading the image itself, learns
the identity: at inference it copies a defect from the image and from the partially noised
latent into the reconstruction, and the anomaly map stays flat. Restoration training shows it
corrupted inputs and asks for the clean image, as DRAEM's reconstructive network and
DiffusionAD's noise-to-norm training do. The corruptions are generic, not the defect types of
any dataset:

- shapes: blobs (a smooth random field above a per-image quantile covering 5-30% of the image)
  at three sizes (fields drawn on 4, 8 and 16 cells a side), or thin curved strokes (the 3-8% of
  pixels where |field| is smallest); either kept inside one coarse window (20-50% of the
  image), so the damage is local;
- fills: another image of the batch (turned), a random flat colour with a little texture, or the
  image itself darkened or brightened;
- a blend weight between 0.5 and 1.

Everything is jittable and per sample; an image is corrupted with probability `prob`.
"""
import jax
import jax.numpy as jnp
import numpy as np

BLOB_CELLS = (4, 8, 16)


def _smooth_upsample(coarse, size: int):
  """(B, c, c) -> (B, size, size): separable interpolation with smoothstep weights, as gathers
  and elementwise sums, so each sample's field is bitwise the same however the batch is split
  over devices (the masks threshold it, and a flipped pixel would change the loss)."""
  c = coarse.shape[1]
  pos = (np.arange(size) + 0.5) * (c - 1) / size
  i0 = np.floor(pos).astype(np.int32)
  i1 = np.minimum(i0 + 1, c - 1)
  w = pos - i0
  w = jnp.asarray(w * w * (3 - 2 * w), coarse.dtype)
  rows = coarse[:, i0] * (1 - w)[None, :, None] + coarse[:, i1] * w[None, :, None]
  return rows[:, :, i0] * (1 - w) + rows[:, :, i1] * w


def smooth_field(key, batch: int, size: int, cells: int) -> jax.Array:
  """(batch, size, size) smooth random field with unit-variance cell values, varying over
  size / cells pixels."""
  return _smooth_upsample(jax.random.normal(key, (batch, cells + 1, cells + 1)), size)


def _quantile_mask(field, coverage):
  """field > its per-image (1 - coverage) quantile."""
  flat = field.reshape(field.shape[0], -1)
  threshold = jax.vmap(jnp.quantile)(flat, 1.0 - coverage)
  return field > threshold[:, None, None]


def random_masks(key, batch: int, size: int) -> jax.Array:
  """(batch, size, size) float masks in {0, 1}: blobs of one of `BLOB_CELLS` sizes, or strokes."""
  n = len(BLOB_CELLS)
  keys = jax.random.split(key, n + 6)
  coverage = jax.random.uniform(keys[0], (batch,), minval=0.05, maxval=0.3)
  blobs = jnp.stack([_quantile_mask(smooth_field(k, batch, size, c), coverage)
                     for k, c in zip(keys[6:], BLOB_CELLS)], axis=1)
  width = jax.random.uniform(keys[1], (batch,), minval=0.03, maxval=0.08)
  lines = ~_quantile_mask(-jnp.abs(smooth_field(keys[2], batch, size, 8)), 1.0 - width)
  window = _quantile_mask(smooth_field(keys[3], batch, size, 4),
                          jax.random.uniform(keys[4], (batch,), minval=0.2, maxval=0.5))
  shapes = jnp.concatenate([blobs, lines[:, None]], axis=1) & window[:, None]  # (B, n + 1, S, S)
  pick = jax.random.randint(keys[5], (batch,), 0, shapes.shape[1])
  return jnp.take_along_axis(shapes, pick[:, None, None, None], axis=1)[:, 0].astype(jnp.float32)


def random_fills(key, images: jax.Array) -> jax.Array:
  """(B, S, S, 3) in [-1, 1]: per image, another image of the batch, a colour, or itself
  darkened / brightened."""
  batch, size = images.shape[0], images.shape[1]
  keys = jax.random.split(key, 5)
  other = jnp.rot90(jnp.roll(images, 1, axis=0), 1, axes=(1, 2))
  texture = 0.1 * smooth_field(keys[0], batch, size, 16)[..., None]
  colour = jax.random.uniform(keys[1], (batch, 1, 1, 3), minval=-1.0, maxval=1.0) + texture
  gain = jax.random.uniform(keys[2], (batch, 1, 1, 1), minval=0.3, maxval=1.6)
  shift = jax.random.uniform(keys[3], (batch, 1, 1, 1), minval=-0.3, maxval=0.3)
  shaded = (images + 1.0) * gain - 1.0 + shift
  fills = jnp.stack([other, colour, shaded], axis=1)
  pick = jax.random.randint(keys[4], (batch,), 0, 3)
  chosen = jnp.take_along_axis(fills, pick[:, None, None, None, None], axis=1)[:, 0]
  return jnp.clip(chosen, -1.0, 1.0)


def corrupt(key, images: jax.Array, prob: float):
  """(corrupted images, masks (B, S, S)): each image corrupted with probability `prob`."""
  batch, size = images.shape[0], images.shape[1]
  k_mask, k_fill, k_alpha, k_on = jax.random.split(key, 4)
  on = jax.random.bernoulli(k_on, prob, (batch, 1, 1))
  masks = random_masks(k_mask, batch, size) * on
  alpha = jax.random.uniform(k_alpha, (batch, 1, 1), minval=0.5, maxval=1.0)
  weight = (masks * alpha)[..., None].astype(images.dtype)
  fills = random_fills(k_fill, images).astype(images.dtype)
  return images * (1 - weight) + fills * weight, masks
