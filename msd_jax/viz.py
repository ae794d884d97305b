"""Pictures of results: heatmap overlays, per-defect-type grids, ROC/PR curves, score histograms.

Figures are drawn on matplotlib's Agg canvas through `Figure` objects (no pyplot state), so they
work headless and in threads. Heatmaps use the `jet` colormap over a fixed [vmin, vmax] shared by
every image in a figure, so colours compare across images; the caller picks the range (eval.py:
`map_range` of all test maps; detect.py: [0, 2 x pixel threshold], putting the threshold at the
middle colour).
"""
from typing import Optional, Sequence, Tuple

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage
from sklearn import metrics as skm

OUTLINE_COLOR = (0, 255, 0)
GT_COLOR = (255, 255, 255)


def map_range(maps: np.ndarray, pixel_threshold: Optional[float] = None) -> Tuple[float, float]:
  """Colour range for a set of maps: 1st to 99.9th percentile, widened to include the threshold."""
  flat = np.asarray(maps, np.float32).ravel()
  if flat.size > 4_000_000:
    flat = flat[:: flat.size // 4_000_000 + 1]
  lo, hi = (float(v) for v in np.percentile(flat, [1.0, 99.9]))
  if pixel_threshold is not None:
    lo, hi = min(lo, pixel_threshold), max(hi, pixel_threshold)
  return lo, hi if hi > lo else lo + 1e-6


def heatmap_rgb(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
  """float [H, W] -> uint8 [H, W, 3] through the jet colormap on [vmin, vmax]."""
  norm = np.clip((np.asarray(anomaly_map, np.float32) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
  rgba = matplotlib.colormaps["jet"](norm)
  return np.rint(rgba[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float,
            alpha: float = 0.5) -> np.ndarray:
  """The heatmap blended over a uint8 [H, W, 3] image."""
  heat = heatmap_rgb(anomaly_map, vmin, vmax).astype(np.float32)
  mixed = (1 - alpha) * np.asarray(image, np.float32) + alpha * heat
  return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
  """bool [H, W]: the pixels of `mask` within `thickness` of its boundary, the image's edge
  included (a mask covering most of an image shows as a frame around its holes)."""
  mask = np.asarray(mask, bool)
  inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
  return mask & ~inner


def draw_outline(image: np.ndarray, mask: np.ndarray, color=OUTLINE_COLOR,
                 thickness: Optional[int] = None) -> np.ndarray:
  """A copy of uint8 `image` with the outline of `mask` drawn in `color`.

  The default thickness grows with the image (1 px per 256), so outlines stay visible when large
  images are shown small.
  """
  if thickness is None:
    thickness = max(1, round(max(mask.shape) / 256))
  out = np.array(image, np.uint8, copy=True)
  out[outline(mask, thickness)] = color
  return out


def _new_figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def save_defect_grid(path: str, title: str, images: Sequence[np.ndarray],
                     reconstructions: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray],
                     maps: Sequence[np.ndarray], scores: Sequence[float], vmin: float,
                     vmax: float, pixel_threshold: float) -> None:
  """One row per image: input | reconstruction | ground truth | heatmap overlay | thresholded
  mask outline (predicted in green, ground truth in white), like the paper's figures 6-7."""
  columns = ("input", "reconstruction", "ground truth", "heatmap",
             "predicted (green), truth (white)")
  n = len(images)
  fig = _new_figure(2.2 * len(columns), 2.2 * n + 0.6)
  axes = fig.subplots(n, len(columns), squeeze=False)
  for row in range(n):
    image, gt = images[row], np.asarray(gt_masks[row], bool)
    predicted = np.asarray(maps[row]) >= pixel_threshold
    panels = (
        image,
        reconstructions[row],
        np.repeat((gt.astype(np.uint8) * 255)[:, :, None], 3, axis=2),
        overlay(image, maps[row], vmin, vmax),
        draw_outline(draw_outline(image, gt, GT_COLOR), predicted, OUTLINE_COLOR),
    )
    for col, panel in enumerate(panels):
      ax = axes[row, col]
      ax.imshow(panel, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        ax.set_title(columns[col], fontsize=9)
    axes[row, 0].set_ylabel(f"score {scores[row]:.3g}", fontsize=8)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  fig.savefig(path)


def binned_curves(scores: np.ndarray, labels: np.ndarray, bins: int = 2048):
  """(fpr, tpr, precision) from score histograms (recall is tpr); memory flat for many pixels.

  Thresholds are `bins` equal steps over the score range, so each point is exact for its
  threshold; only the spacing of the points is coarser than the exact curve's.
  """
  scores = np.asarray(scores, np.float64).ravel()
  labels = np.asarray(labels, bool).ravel()
  edges = np.linspace(scores.min(), scores.max() + 1e-12, bins + 1)
  pos = np.histogram(scores[labels], edges)[0][::-1].cumsum()
  neg = np.histogram(scores[~labels], edges)[0][::-1].cumsum()
  tpr = np.concatenate([[0.0], pos / max(pos[-1], 1)])
  fpr = np.concatenate([[0.0], neg / max(neg[-1], 1)])
  precision = np.concatenate([[1.0], pos / np.maximum(pos + neg, 1)])
  return fpr, tpr, precision


def save_roc_pr(path: str, image_scores: np.ndarray, image_labels: np.ndarray,
                pixel_maps: Optional[np.ndarray] = None,
                pixel_masks: Optional[np.ndarray] = None,
                aurocs: Optional[dict] = None) -> None:
  """ROC and PR curves, image level (exact) and pixel level (binned, when masks are given).

  `aurocs` may carry {"image": value, "pixel": value} from the metrics, shown in the legend.
  """
  aurocs = aurocs or {}
  curves = []
  fpr, tpr, _ = skm.roc_curve(image_labels, image_scores)
  precision, recall, _ = skm.precision_recall_curve(image_labels, image_scores)
  curves.append(("image", fpr, tpr, recall, precision))
  if pixel_maps is not None and pixel_masks is not None and np.any(pixel_masks):
    fpr, tpr, precision = binned_curves(pixel_maps, pixel_masks)
    curves.append(("pixel", fpr, tpr, tpr, precision))
  fig = _new_figure(10, 4.5)
  ax_roc, ax_pr = fig.subplots(1, 2)
  for name, fpr, tpr, recall, precision in curves:
    label = name if name not in aurocs else f"{name} (AUROC {aurocs[name]:.3f})"
    ax_roc.plot(fpr, tpr, label=label)
    ax_pr.plot(recall, precision, label=name)
  ax_roc.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
  ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC",
             xlim=(0, 1), ylim=(0, 1.01))
  ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1),
            ylim=(0, 1.01))
  for ax in (ax_roc, ax_pr):
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if ax is ax_roc else "lower left")
  fig.tight_layout()
  fig.savefig(path)


def save_score_histogram(path: str, image_scores: np.ndarray, image_labels: np.ndarray,
                         threshold: Optional[float] = None) -> None:
  """Histogram of image scores, defect-free versus defective, with the image threshold."""
  scores = np.asarray(image_scores, np.float64)
  labels = np.asarray(image_labels, bool)
  edges = np.histogram_bin_edges(scores, bins=min(40, max(10, len(scores) // 4)))
  fig = _new_figure(6.5, 4)
  ax = fig.subplots()
  ax.hist(scores[~labels], bins=edges, alpha=0.6, label=f"defect-free (n={int((~labels).sum())})",
          color="tab:blue")
  ax.hist(scores[labels], bins=edges, alpha=0.6, label=f"defective (n={int(labels.sum())})",
          color="tab:red")
  if threshold is not None:
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
  ax.set(xlabel="image score", ylabel="images", title="image scores")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
