"""SAM automatic mask generation (AMG) and the per-pixel mask grid G.

Follows `segment_anything.SamAutomaticMaskGenerator` for a single full-image crop: a regular grid of
single-point foreground prompts, three masks per point, keep masks whose predicted IoU is
> `pred_iou_thresh` and whose stability score is >= `stability_score_thresh`, then greedy box NMS at
`box_nms_thresh` ranked by predicted IoU. Our choice: masks are judged on the decoder's low-resolution
logits (4x the embedding grid, 256 x 256 for ViT-B) instead of being upsampled to the image first;
for the square images used here that grid covers the whole image. Decoding is jitted with static
batch shapes (the last batch is padded); NMS runs on the host.

`mask_grid` turns any set of binary masks (SAM's or SLIC superpixels) into G: the fraction of each
output cell covered by mask interiors (a mask minus its one-pixel boundary), so segmented regions
weigh 1, and region boundaries and unsegmented pixels weigh 0.
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from msd_jax.models import sam


def build_point_grid(n_per_side: int) -> np.ndarray:
  """(n*n, 2) cell-centre points (x, y) in [0, 1], x fastest."""
  offset = 1.0 / (2 * n_per_side)
  side = np.linspace(offset, 1 - offset, n_per_side)
  xs, ys = np.meshgrid(side, side)
  return np.stack([xs.ravel(), ys.ravel()], axis=-1).astype(np.float32)


def stability_score(logits: jax.Array, mask_threshold: float, offset: float) -> jax.Array:
  """IoU of the masks thresholded at mask_threshold +- offset, over the last two axes."""
  inter = jnp.sum(logits > mask_threshold + offset, axis=(-1, -2), dtype=jnp.int32)
  union = jnp.sum(logits > mask_threshold - offset, axis=(-1, -2), dtype=jnp.int32)
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 0.0)


def mask_to_box(masks: np.ndarray) -> np.ndarray:
  """(K, H, W) bool -> (K, 4) inclusive pixel boxes x0, y0, x1, y1; empty masks give zeros."""
  boxes = np.zeros((len(masks), 4), np.float32)
  for i, m in enumerate(masks):
    ys, xs = np.nonzero(m)
    if len(xs):
      boxes[i] = xs.min(), ys.min(), xs.max(), ys.max()
  return boxes


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
  """Greedy NMS (torchvision semantics): indices kept, by decreasing score."""
  order = np.argsort(-scores, kind="stable")
  iou = box_iou(boxes, boxes)
  suppressed = np.zeros(len(boxes), bool)
  keep = []
  for i in order:
    if suppressed[i]:
      continue
    keep.append(i)
    suppressed |= iou[i] > iou_threshold
  return np.asarray(keep, np.int64)


def point_decoder(model: sam.SamModel) -> Callable:
  """Jitted `decode(variables, image_embeddings (1, h, w, C), points (P, 2))` -> (logits (P, 3, 4h, 4w),
  iou (P, 3)); points are pixel coordinates (x, y) of the S x S model input, one prompt each."""
  @jax.jit
  def decode(variables, image_embeddings, points):
    masks, iou = model.apply(variables, image_embeddings, points[None, :, None, :],
                             jnp.ones((1, points.shape[0], 1), jnp.int32), method=sam.SamModel.decode)
    return masks[0], iou[0]
  return decode


@functools.partial(jax.jit, static_argnames=("pred_iou_thresh", "stability_score_thresh",
                                              "stability_score_offset", "mask_threshold"))
def _keep(logits, iou, *, pred_iou_thresh, stability_score_thresh, stability_score_offset, mask_threshold):
  stab = stability_score(logits, mask_threshold, stability_score_offset)
  return (iou > pred_iou_thresh) & (stab >= stability_score_thresh), stab


def generate_masks(predict: Callable, points: np.ndarray, *, points_per_batch: int = 64,
                   pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                   stability_score_offset: float = 1.0, box_nms_thresh: float = 0.7,
                   mask_threshold: float = 0.0) -> dict[str, np.ndarray]:
  """Runs `predict` over `points` in fixed-size batches, filters and de-duplicates the masks.

  Returns a dict of host arrays: `masks` (K, h, w) bool, `iou_preds`, `stability_scores` (K,),
  `boxes` (K, 4), `points` (K, 2) (the prompt behind each mask), by decreasing predicted IoU.
  """
  n = len(points)
  padded = np.concatenate([points, np.repeat(points[-1:], -n % points_per_batch, axis=0)])
  kept = {"masks": [], "iou_preds": [], "stability_scores": [], "points": []}
  for start in range(0, n, points_per_batch):
    batch = padded[start:start + points_per_batch]
    logits, iou = predict(jnp.asarray(batch))
    keep, stab = _keep(logits, iou, pred_iou_thresh=pred_iou_thresh,
                       stability_score_thresh=stability_score_thresh,
                       stability_score_offset=stability_score_offset, mask_threshold=mask_threshold)
    keep = np.array(keep)
    keep[max(0, n - start):] = False  # padding points
    p_idx, m_idx = np.nonzero(keep)
    kept["masks"].append(np.asarray(logits)[p_idx, m_idx] > mask_threshold)
    kept["iou_preds"].append(np.asarray(iou)[p_idx, m_idx])
    kept["stability_scores"].append(np.asarray(stab)[p_idx, m_idx])
    kept["points"].append(batch[p_idx])
  out = {k: np.concatenate(v) for k, v in kept.items()}
  out["boxes"] = mask_to_box(out["masks"])
  keep = box_nms(out["boxes"], out["iou_preds"], box_nms_thresh)
  return {k: v[keep] for k, v in out.items()}


def automatic_masks(decode: Callable, variables, image_embeddings: jax.Array, image_size: int, *,
                    points_per_side: int = 32, **thresholds) -> dict[str, np.ndarray]:
  """AMG for one image from its (1, h, w, C) embeddings; `decode` from `point_decoder`;
  `image_size` is SAM's input size S. Masks are (K, 4h, 4w) bool."""
  points = build_point_grid(points_per_side) * image_size
  return generate_masks(lambda p: decode(variables, image_embeddings, p), points, **thresholds)


def mask_interiors(masks: np.ndarray) -> np.ndarray:
  """(K, H, W) bool -> union over masks of pixels whose 4 neighbours lie in the same mask."""
  m = np.pad(np.asarray(masks, bool), ((0, 0), (1, 1), (1, 1)), mode="edge")
  inner = m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] & m[:, 1:-1, 2:]
  return inner.any(axis=0)


def mask_grid(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """(K, H, W) bool masks -> (h, w) float32 G in [0, 1]: interior coverage per output cell.

  H and W must be multiples of h and w (cells are H/h x W/w pixel blocks); K = 0 gives zeros.
  """
  masks = np.asarray(masks, bool)
  big_h, big_w = masks.shape[-2:]
  h, w = shape
  if big_h % h or big_w % w:
    raise ValueError(f"mask size {(big_h, big_w)} is not a multiple of the grid {shape}")
  if len(masks) == 0:
    return np.zeros(shape, np.float32)
  inner = mask_interiors(masks).astype(np.float32)
  return inner.reshape(h, big_h // h, w, big_w // w).mean(axis=(1, 3))
