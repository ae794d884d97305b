"""viz and report: overlays colour the right places, figures are written as real PNGs, curves
match scikit-learn, the metrics table shows every number."""
import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from msd_jax import report
from msd_jax import viz


@pytest.fixture(scope="module")
def sample():
  rng = np.random.default_rng(0)
  image = rng.integers(60, 140, (64, 64, 3), dtype=np.uint8)
  gt = np.zeros((64, 64), bool)
  gt[20:36, 24:44] = True
  amap = rng.uniform(0, 0.2, (64, 64)).astype(np.float32) + 0.8 * gt
  return image, gt, amap


def test_heatmap_and_overlay(sample):
  image, gt, amap = sample
  heat = viz.heatmap_rgb(amap, 0.0, 1.0)
  assert heat.shape == (64, 64, 3) and heat.dtype == np.uint8
  # jet: high values are red, low values blue
  assert heat[gt, 0].mean() > 150 and heat[~gt, 2].mean() > 150
  assert heat[gt, 2].mean() < 60 and heat[~gt, 0].mean() < 60
  over = viz.overlay(image, amap, 0.0, 1.0, alpha=0.5)
  np.testing.assert_array_equal(viz.overlay(image, amap, 0.0, 1.0, alpha=0.0), image)
  assert np.abs(over.astype(int) - image.astype(int)).max() > 20


def test_outline(sample):
  _, gt, _ = sample
  edge = viz.outline(gt)
  assert edge.sum() == 2 * (16 + 20) - 4  # the rectangle's perimeter pixels
  assert not edge[28, 34] and edge[20, 30]
  drawn = viz.draw_outline(np.zeros((64, 64, 3), np.uint8), gt, color=(0, 255, 0), thickness=1)
  np.testing.assert_array_equal(drawn[..., 1] == 255, edge)
  left = np.zeros((8, 8), bool)
  left[:, :4] = True  # touches three image edges
  expected = left.copy()
  expected[1:-1, 1:3] = False
  np.testing.assert_array_equal(viz.outline(left), expected)


def test_binned_curves_match_sklearn():
  rng = np.random.default_rng(1)
  labels = rng.uniform(size=20000) < 0.1
  scores = rng.normal(size=20000) + 1.5 * labels
  fpr, tpr, precision = viz.binned_curves(scores, labels, bins=4096)
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  assert fpr[-1] == pytest.approx(1.0) and tpr[-1] == pytest.approx(1.0)
  assert np.trapezoid(tpr, fpr) == pytest.approx(skm.roc_auc_score(labels, scores), abs=2e-3)
  assert precision[-1] == pytest.approx(labels.mean())


def test_figures_written(sample, tmp_path):
  image, gt, amap = sample
  rng = np.random.default_rng(2)
  path = tmp_path / "grid.png"
  viz.save_defect_grid(str(path), "spot", [image, image], [image, image], [gt, gt],
                       [amap, amap * 0.5], [0.9, 0.5], 0.0, 1.0, 0.5)
  grid = np.asarray(Image.open(path))
  assert grid.shape[1] > grid.shape[0] > 200  # two rows of five panels
  labels = np.array([0] * 30 + [1] * 20, bool)
  scores = rng.normal(size=50) + labels
  viz.save_roc_pr(str(tmp_path / "curves.png"), scores, labels,
                  np.stack([amap, amap]), np.stack([gt, gt]), aurocs={"image": 0.8})
  viz.save_score_histogram(str(tmp_path / "hist.png"), scores, labels, threshold=0.5)
  for name in ("curves.png", "hist.png"):
    picture = np.asarray(Image.open(tmp_path / name).convert("RGB"))
    assert picture.std() > 10  # something drawn on the white canvas


def test_map_range_includes_threshold():
  maps = np.linspace(0, 1, 10000).reshape(1, 100, 100)
  lo, hi = viz.map_range(maps)
  assert lo == pytest.approx(0.01, abs=1e-3) and hi == pytest.approx(0.999, abs=1e-3)
  assert viz.map_range(maps, pixel_threshold=2.0)[1] == 2.0


def test_metrics_table_and_index(tmp_path):
  metrics = {
      "image": {"auroc": 0.91234, "ap": 0.8, "f1max": 0.75},
      "pixel": {"auroc": 0.95, "ap": 0.5, "f1max": 0.4, "aupro": 0.7},
      "per_type": {"spot": {"image": {"auroc": 0.99}, "pixel": {"auroc": 0.97, "aupro": None}}},
      "thresholds": {"image": 0.3, "pixel": 0.2},
  }
  rows = dict(report.table_rows(metrics))
  assert set(rows) == {"image", "pixel", "per_type / spot / image", "per_type / spot / pixel",
                       "thresholds"}
  text = report.format_table(metrics)
  assert "0.9123" in text and "per_type / spot / pixel" in text and " - " in text + " "
  (tmp_path / "a.png").write_bytes(b"")
  path = report.write_index(str(tmp_path), "eval <tiny>", metrics, [("ROC & PR", "a.png")],
                            notes=["checkpoint step 5"])
  page = open(path).read()
  assert "eval &lt;tiny&gt;" in page and "src='a.png'" in page and "ROC &amp; PR" in page
  assert "0.9123" in page and "aupro" in page and "checkpoint step 5" in page
