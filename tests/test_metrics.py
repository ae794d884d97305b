"""Metrics: scikit-learn parity, hand-computed F1max/AUPRO, binned-mode error bounds."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from msd_jax import metrics


@pytest.mark.parametrize("seed", range(4))
def test_auroc_and_ap_match_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = 2000
  scores = rng.integers(0, 25, n) / 7.0  # heavy ties
  labels = rng.random(n) < 0.2 + 0.02 * scores
  assert abs(metrics.roc_auc(scores, labels) - roc_auc_score(labels, scores)) < 1e-9
  ap = metrics.average_precision(scores, labels)
  assert abs(ap - average_precision_score(labels, scores)) < 1e-9
  continuous = rng.normal(size=n) + labels
  assert abs(metrics.roc_auc(continuous, labels) - roc_auc_score(labels, continuous)) < 1e-9
  assert abs(metrics.average_precision(continuous, labels)
             - average_precision_score(labels, continuous)) < 1e-9


def test_f1max_hand_computed():
  # thresholds 0.9, 0.8, 0.3, 0.1 give (tp, fp) = (1,0), (2,1), (3,1), (3,2): F1 = 2tp/(tp+fp+3)
  scores = [0.9, 0.8, 0.8, 0.3, 0.1]
  labels = [1, 0, 1, 1, 0]
  f1, threshold = metrics.f1_max(scores, labels)
  assert f1 == pytest.approx(6 / 7)
  assert threshold == 0.3


def test_undefined_metrics_are_nan():
  assert np.isnan(metrics.roc_auc([0.1, 0.2], [1, 1]))
  assert np.isnan(metrics.average_precision([0.1, 0.2], [0, 0]))
  assert np.isnan(metrics.aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))))


def _two_region_case():
  """Image 0 holds a 1-pixel region and a 16-pixel region; image 1 is defect-free."""
  maps = np.zeros((2, 10, 10))
  masks = np.zeros((2, 10, 10), bool)
  masks[0, 0, 0] = True  # region A (1 px)
  masks[0, 5:9, 5:9] = True  # region B (16 px)
  maps[0, 0, 0] = 0.9
  maps[0, 5:7, 5:9] = 0.7  # half of B
  maps[0, 7:9, 5:9] = 0.2  # other half of B
  normal = np.flatnonzero(~masks.ravel())
  flat = maps.reshape(-1)
  flat[normal[:30]] = 0.5
  flat[normal[30:130]] = 0.2
  return maps, masks, normal.size


def test_aupro_hand_computed_regions_of_different_sizes():
  maps, masks, n_ok = _two_region_case()
  # Curve (fpr, pro): (0, .5) at 0.9 [A covered, B not], (0, .75) at 0.7 [B half], (f1, .75) at 0.5,
  # (f2, 1) at 0.2, (1, 1) at 0. The segment f1 -> f2 crosses the 0.3 limit.
  f1, f2 = 30 / n_ok, 130 / n_ok
  pro_at_limit = 0.75 + 0.25 * (0.3 - f1) / (f2 - f1)
  expected = (0.75 * f1 + 0.5 * (0.75 + pro_at_limit) * (0.3 - f1)) / 0.3
  assert metrics.aupro(maps, masks) == pytest.approx(expected, abs=1e-12)
  # The pixel-level view weighs B 16x more than A; AUPRO weighs them equally.
  assert metrics.roc_auc(maps, masks) != pytest.approx(expected)
  # With a different limit the same curve integrates differently.
  expected_full = 0.75 * f1 + 0.5 * (0.75 + 1.0) * (f2 - f1) + (1 - f2)
  assert metrics.aupro(maps, masks, fpr_limit=1.0) == pytest.approx(expected_full, abs=1e-12)


def _brute_force_aupro(maps, masks, limit):
  """Threshold sweep with explicit per-region overlaps (independent reference)."""
  regions = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
  points = [(0.0, 0.0)]
  for t in np.unique(maps)[::-1]:
    pred = maps >= t
    overlaps = [pred[i][r == k].mean()
                for i, r in enumerate(regions) for k in range(1, r.max() + 1)]
    points.append((pred[~masks].mean(), np.mean(overlaps)))
  fpr, pro = map(np.array, zip(*points))
  grid = np.linspace(0, limit, 20001)
  return np.trapezoid(np.interp(grid, fpr, pro), grid) / limit


def test_aupro_matches_brute_force():
  rng = np.random.default_rng(3)
  masks = np.zeros((3, 24, 24), bool)
  masks[0, 2:4, 2:4] = masks[0, 10:20, 8:22] = masks[2, 20, 20] = True
  maps = np.round(ndimage.gaussian_filter(rng.random((3, 24, 24)), (0, 1, 1)) + 0.2 * masks, 3)
  assert metrics.aupro(maps, masks) == pytest.approx(_brute_force_aupro(maps, masks, 0.3), abs=1e-6)


def test_compute_metrics_overall_and_per_type():
  rng = np.random.default_rng(1)
  n, hw = 12, 16
  masks = np.zeros((n, hw, hw), bool)
  types = ["good"] * 4 + ["spot"] * 4 + ["gap"] * 4
  for i in range(4, n):
    r, c = rng.integers(0, hw - 4, 2)
    masks[i, r:r + rng.integers(1, 5), c:c + rng.integers(1, 5)] = True
  maps = rng.random((n, hw, hw)) + 0.8 * masks
  labels = masks.any(axis=(1, 2))
  scores = maps.max(axis=(1, 2))
  out = metrics.compute_metrics(scores, labels, maps, masks, types)
  assert out["image"]["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
  pixel_auroc = roc_auc_score(masks.ravel(), maps.ravel())
  assert out["pixel"]["auroc"] == pytest.approx(pixel_auroc, abs=1e-9)
  assert out["pixel"]["aupro"] == pytest.approx(metrics.aupro(maps, masks), abs=1e-12)
  f1, thr = metrics.f1_max(maps, masks)
  assert (out["pixel"]["f1max"], out["pixel"]["threshold"]) == pytest.approx((f1, thr))
  assert set(out["per_type"]) == {"spot", "gap"}
  sel = np.array([t in ("good", "gap") for t in types])
  gap = out["per_type"]["gap"]
  assert gap["image"]["ap"] == pytest.approx(average_precision_score(labels[sel], scores[sel]))
  assert gap["pixel"]["ap"] == pytest.approx(average_precision_score(masks[sel].ravel(),
                                                                     maps[sel].ravel()))
  assert "pixel" not in metrics.compute_metrics(scores, labels)


@pytest.mark.slow
def test_binned_mode_within_its_bound_on_50_maps_900px():
  rng = np.random.default_rng(0)
  n, hw = 50, 900
  maps = np.empty((n, hw, hw), np.float32)
  masks = np.zeros((n, hw, hw), bool)
  yy, xx = np.mgrid[:hw, :hw]
  for i in range(n):
    noise = ndimage.zoom(rng.random((hw // 30, hw // 30)), 30, order=1)
    if i % 2:
      for _ in range(rng.integers(1, 4)):
        cy, cx = rng.integers(50, hw - 50, 2)
        ry, rx = rng.integers(2, 60, 2)
        masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    maps[i] = noise + 0.3 * masks[i] + 0.05 * rng.random((hw, hw))
  labels = masks.any(axis=(1, 2))
  scores = maps.max(axis=(1, 2))
  exact = metrics.compute_metrics(scores, labels, maps, masks)["pixel"]
  binned = metrics.compute_metrics(scores, labels, maps, masks, num_bins=4096)["pixel"]
  for name in ("auroc", "ap", "f1max", "aupro"):
    bound = binned["error_bound"][name]
    assert 0 <= bound < 0.05, (name, bound)
    assert abs(binned[name] - exact[name]) <= bound, (name, binned[name], exact[name], bound)
  assert binned["f1max"] <= exact["f1max"]
