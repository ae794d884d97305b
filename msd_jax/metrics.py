"""Detection and segmentation metrics (host-side numpy).

Image level: AUROC, AP and F1max of the image scores. Pixel level: the same over the pixels of
all test images flattened together, plus AUPRO up to a false-positive rate of 0.3 (per-region
overlap averaged over the connected defect regions, 8-connectivity, integrated over the FPR of
defect-free pixels and divided by the limit, as in the MVTec AD evaluation).

Conventions: a sample is predicted positive when `score >= threshold`; tied scores move together
(one curve point per distinct score, as scikit-learn); a metric that is undefined for the data
(one class only, no defect region) is NaN. Per defect type, a type's images are evaluated
together with all defect-free images.

Exact mode sorts all scores. `num_bins` selects the binned mode for very large pixel sets: one
pass over the maps fixes the score range, a second accumulates per-bin histograms image by image,
so memory is O(num_bins) beyond the inputs. Binned values are the exact metrics of the scores
quantised to the bins, and each comes with an upper bound on its distance to the exact value,
computed from the histograms (p_b, n_b: positives/negatives in bin b; c_b = p_b + n_b; T_b:
samples in bin b and above; P: positives; dX_b: the change of curve coordinate X across bin b):

  AUROC   0.5 * sum_b dTPR_b * dFPR_b   (within a bin the exact curve stays in the box spanned
                                          by its ends; the binned one is that box's diagonal)
  AP      sum_b (p_b / P) * c_b / T_b   (precision moves by at most c_b / T_b inside bin b)
  F1max   2 * max_b p_b / P             (binned <= exact always)
  AUPRO   sum_b dFPR_b * dPRO_b / limit, over bins below the FPR limit
"""
from typing import Sequence

import numpy as np
from scipy import ndimage

_EIGHT_CONNECTED = np.ones((3, 3), bool)


def _descending_curve(scores, labels, weights=None):
  """Cumulative counts at each distinct score, highest first.

  Returns (thresholds, positives >= t, negatives >= t[, sum of positive weights >= t]). Negatives
  and positives are sorted apart (a plain sort, no argsort of the whole set) and counted with
  binary search, which keeps tens of millions of pixels fast.
  """
  scores = np.asarray(scores).ravel()
  y = np.asarray(labels).ravel().astype(bool)
  pos = scores[y]
  order = np.argsort(pos, kind="stable")
  pos = pos[order]
  neg = np.sort(scores[~y])
  merged = np.sort(np.concatenate([pos, neg]), kind="stable")  # merges the two sorted runs
  thresholds = merged[np.r_[merged[1:] != merged[:-1], True]][::-1]
  i_pos = np.searchsorted(pos, thresholds, side="left")
  tp = (pos.size - i_pos).astype(np.float64)
  fp = (neg.size - np.searchsorted(neg, thresholds, side="left")).astype(np.float64)
  out = (thresholds.astype(np.float64), tp, fp)
  if weights is not None:
    w = np.r_[0.0, np.cumsum(np.asarray(weights).ravel()[y][order], dtype=np.float64)]
    out += (w[-1] - w[i_pos],)
  return out


def _auroc(tp, fp):
  if tp[-1] == 0 or fp[-1] == 0:
    return float("nan")
  return float(np.trapezoid(np.r_[0.0, tp / tp[-1]], np.r_[0.0, fp / fp[-1]]))


def _ap(tp, fp):
  if tp[-1] == 0:
    return float("nan")
  recall = np.r_[0.0, tp / tp[-1]]
  return float(np.sum(np.diff(recall) * tp / (tp + fp)))


def _f1max(thresholds, tp, fp):
  if tp[-1] == 0:
    return float("nan"), float("nan")
  f1 = 2 * tp / (tp + fp + tp[-1])
  i = int(np.argmax(f1))
  return float(f1[i]), float(thresholds[i])


def _area_to_limit(fpr, pro, limit):
  """Trapezoidal area under (fpr, pro) from 0 to `limit`, interpolating at the limit, / limit."""
  fpr, pro = np.r_[0.0, fpr], np.r_[0.0, pro]
  k = int(np.searchsorted(fpr, limit, side="right"))
  if k < fpr.size:
    w = (limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
    fpr = np.r_[fpr[:k], limit]
    pro = np.r_[pro[:k], pro[k - 1] + w * (pro[k] - pro[k - 1])]
  return float(np.trapezoid(pro, fpr) / limit)


def roc_auc(scores, labels) -> float:
  """Area under the ROC curve (equals `sklearn.metrics.roc_auc_score`)."""
  _, tp, fp = _descending_curve(scores, labels)
  return _auroc(tp, fp)


def average_precision(scores, labels) -> float:
  """Average precision, sum over thresholds of dRecall * precision (as scikit-learn)."""
  _, tp, fp = _descending_curve(scores, labels)
  return _ap(tp, fp)


def f1_max(scores, labels) -> tuple[float, float]:
  """(best F1 over all thresholds, the threshold that attains it)."""
  thresholds, tp, fp = _descending_curve(scores, labels)
  return _f1max(thresholds, tp, fp)


def _region_weights(masks):
  """Per-pixel PRO weight 1/size of its region (0 off regions), and the number of regions."""
  weights = np.zeros(np.shape(masks), np.float64)
  n_regions = 0
  for i, mask in enumerate(masks):
    regions, n = ndimage.label(np.asarray(mask) > 0, structure=_EIGHT_CONNECTED)
    if n:
      sizes = np.bincount(regions.ravel())
      inv = np.r_[0.0, 1.0 / sizes[1:]]
      weights[i] = inv[regions]
    n_regions += n
  return weights, n_regions


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
  """Normalised area under the per-region-overlap curve up to `fpr_limit`."""
  masks = np.asarray(masks) > 0
  weights, n_regions = _region_weights(masks)
  n_ok = int((~masks).sum())
  if n_regions == 0 or n_ok == 0:
    return float("nan")
  _, _, fp, w = _descending_curve(maps, masks, weights)
  return _area_to_limit(fp / n_ok, w / n_regions, fpr_limit)


def _exact_pixel_metrics(maps, masks, fpr_limit):
  masks = np.asarray(masks) > 0
  weights, n_regions = _region_weights(masks)
  thresholds, tp, fp, w = _descending_curve(maps, masks, weights)
  f1, threshold = _f1max(thresholds, tp, fp)
  pro = float("nan")
  if n_regions and fp[-1]:
    pro = _area_to_limit(fp / fp[-1], w / n_regions, fpr_limit)
  return {"auroc": _auroc(tp, fp), "ap": _ap(tp, fp), "f1max": f1, "threshold": threshold,
          "aupro": pro}


class _Histograms:
  """Per-bin positive / negative counts and PRO weights over fixed edges."""

  def __init__(self, lo, hi, num_bins):
    self.lo, self.hi, self.num_bins = lo, hi, num_bins
    self.pos = np.zeros(num_bins)
    self.neg = np.zeros(num_bins)
    self.pro = np.zeros(num_bins)  # sum of 1/region size
    self.n_regions = 0

  def add(self, m, mask):
    scale = self.num_bins / (self.hi - self.lo) if self.hi > self.lo else 0.0
    idx = np.clip(((np.asarray(m, np.float64) - self.lo) * scale).astype(np.int64), 0,
                  self.num_bins - 1).ravel()
    mask = np.asarray(mask) > 0
    w, n = _region_weights(mask[None])
    flat = mask.ravel()
    self.pos += np.bincount(idx[flat], minlength=self.num_bins)
    self.neg += np.bincount(idx[~flat], minlength=self.num_bins)
    self.pro += np.bincount(idx, weights=w.ravel(), minlength=self.num_bins)
    self.n_regions += n

  def __add__(self, other):
    out = _Histograms(self.lo, self.hi, self.num_bins)
    for name in ("pos", "neg", "pro", "n_regions"):
      setattr(out, name, getattr(self, name) + getattr(other, name))
    return out

  def metrics(self, fpr_limit):
    edges = np.linspace(self.lo, self.hi, self.num_bins + 1)[:-1][::-1]
    p, n, pw = self.pos[::-1], self.neg[::-1], self.pro[::-1]
    tp, fp = np.cumsum(p), np.cumsum(n)
    P, N = tp[-1], fp[-1]
    nan = float("nan")
    out = {"auroc": _auroc(tp, fp), "ap": _ap(tp, fp)}
    out["f1max"], out["threshold"] = _f1max(edges, tp, fp)
    bound = {"auroc": nan, "ap": nan, "f1max": nan, "aupro": nan}
    if P and N:
      bound["auroc"] = float(0.5 * np.sum((p / P) * (n / N)))
    if P:
      total = tp + fp
      bound["ap"] = float(np.sum((p / P) * (p + n) / np.maximum(total, 1)))
      bound["f1max"] = float(2 * p.max() / P)
    out["aupro"] = nan
    if self.n_regions and N:
      fpr, pro = fp / N, np.cumsum(pw) / self.n_regions
      out["aupro"] = _area_to_limit(fpr, pro, fpr_limit)
      f0, p0 = np.r_[0.0, fpr[:-1]], np.r_[0.0, pro[:-1]]
      below = f0 < fpr_limit
      df = np.minimum(fpr, fpr_limit)[below] - f0[below]
      bound["aupro"] = float(np.sum(df * (pro[below] - p0[below])) / fpr_limit)
    out["error_bound"] = bound
    return out


def _image_metrics(scores, labels):
  thresholds, tp, fp = _descending_curve(scores, labels)
  f1, threshold = _f1max(thresholds, tp, fp)
  return {"auroc": _auroc(tp, fp), "ap": _ap(tp, fp), "f1max": f1, "threshold": threshold}


def compute_metrics(image_scores, image_labels, maps=None, masks=None,
                    defect_types: Sequence[str] | None = None, fpr_limit: float = 0.3,
                    num_bins: int | None = None) -> dict:
  """All metrics, overall and per defect type.

  Args:
    image_scores, image_labels: [N] scores and 0/1 labels (1 = defective).
    maps, masks: [N, H, W] anomaly maps and ground-truth masks (non-zero = defect), or None to
      skip the pixel metrics.
    defect_types: [N] type names of the defective images (ignored for defect-free ones).
    fpr_limit: AUPRO integration limit.
    num_bins: None for exact pixel metrics, else the number of bins of the binned mode.

  Returns:
    {"image": {auroc, ap, f1max, threshold}, "pixel": {auroc, ap, f1max, threshold, aupro
    [, error_bound]}, "per_type": {type: {"image": ..., "pixel": ...}}}.
  """
  scores = np.asarray(image_scores, np.float64).ravel()
  labels = np.asarray(image_labels).ravel().astype(bool)
  if defect_types is None:
    defect_types = ["defect"] * len(labels)
  types = np.asarray([str(t) if l else "good" for l, t in zip(labels, defect_types)])
  groups = {"all": np.ones(len(labels), bool)}
  for t in sorted(set(types[labels].tolist())):
    groups[t] = (~labels) | (types == t)

  pixel = {}
  if maps is not None:
    if num_bins is None:
      maps, masks = np.asarray(maps), np.asarray(masks)
      pixel["all"] = _exact_pixel_metrics(maps, masks, fpr_limit)
      for g, sel in groups.items():
        if g != "all":
          pixel[g] = pixel["all"] if sel.all() else _exact_pixel_metrics(maps[sel], masks[sel],
                                                                          fpr_limit)
    else:
      lo = float(min(np.min(m) for m in maps))
      hi = float(max(np.max(m) for m in maps))
      hists = {}
      for m, mask, t in zip(maps, masks, types):
        hists.setdefault(t, _Histograms(lo, hi, num_bins)).add(m, mask)
      empty = _Histograms(lo, hi, num_bins)
      pixel["all"] = sum(hists.values(), empty).metrics(fpr_limit)
      for g in groups:
        if g != "all":
          pixel[g] = (hists[g] + hists.get("good", empty)).metrics(fpr_limit)

  def entry(g):
    e = {"image": _image_metrics(scores[groups[g]], labels[groups[g]])}
    if g in pixel:
      e["pixel"] = pixel[g]
    return e

  out = entry("all")
  out["per_type"] = {g: entry(g) for g in groups if g != "all"}
  return out
