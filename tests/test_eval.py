"""eval outputs: metrics.json equals the metrics recomputed from the saved maps, and every
picture and index.html is written."""
import importlib.util
import json
import os

import numpy as np
import pytest

from configs.msd import get_config
from data_pipeline import datasets
from msd_jax import metrics as metrics_lib
from msd_jax import report

SIZE = get_config("tiny").data.image_size


def _nan_equal(a, b):
  """Nested equality where JSON null stands for NaN."""
  if isinstance(a, dict):
    return isinstance(b, dict) and a.keys() == b.keys() and all(_nan_equal(a[k], b[k]) for k in a)
  if a is None or b is None:
    return (a is None or np.isnan(a)) and (b is None or np.isnan(b))
  return a == pytest.approx(b, rel=1e-12, abs=1e-12)


@pytest.fixture(scope="module")
def fake_results():
  """A small test split: defect-free images with noise maps, defective ones with a bright
  region where the mask is."""
  rng = np.random.default_rng(0)
  types = ["good"] * 6 + ["spot"] * 3 + ["gap"] * 3
  n = len(types)
  labels = np.array([t != "good" for t in types])
  masks = np.zeros((n, SIZE, SIZE), bool)
  maps = rng.uniform(0, 0.5, (n, SIZE, SIZE)).astype(np.float32)
  for i in np.flatnonzero(labels):
    y, x = rng.integers(2, SIZE - 12, 2)
    masks[i, y:y + 8, x:x + 6] = True
    maps[i] += 0.4 * masks[i] * rng.uniform(0.5, 1.5)
  scores = maps.reshape(n, -1).max(1)
  images = rng.integers(0, 255, (n, SIZE, SIZE, 3), dtype=np.uint8)
  return dict(images=images, reconstructions=images[:, ::-1], masks=masks, maps=maps,
              scores=scores, labels=labels, defect_types=types,
              paths=[f"/data/{t}_{i}.png" for i, t in enumerate(types)])


def test_report_metrics_match_saved_maps(fake_results, tmp_path):
  r = fake_results
  metrics = metrics_lib.compute_metrics(r["scores"], r["labels"], r["maps"], r["masks"],
                                        r["defect_types"])
  thresholds = {"image": metrics["image"]["threshold"], "pixel": metrics["pixel"]["threshold"]}
  written = report.write_eval_report(str(tmp_path), metrics=metrics, thresholds=thresholds,
                                     info={"checkpoint_step": 7}, title="test", **r)
  for name in ("metrics.json", "maps.npz", "grid_spot.png", "grid_gap.png", "grid_good.png",
               "roc_pr.png", "score_histogram.png", "index.html"):
    assert name in written and os.path.getsize(tmp_path / name) > 0, name
  saved = json.loads((tmp_path / "metrics.json").read_text())
  arrays = np.load(tmp_path / "maps.npz")
  recomputed = metrics_lib.compute_metrics(arrays["scores"], arrays["labels"], arrays["maps"],
                                           arrays["masks"], list(arrays["defect_types"]))
  assert _nan_equal(saved["metrics"], json.loads(json.dumps(report.jsonable(recomputed))))
  assert saved["info"] == {"checkpoint_step": 7}
  page = (tmp_path / "index.html").read_text()
  for name in written[2:-1]:
    assert f"src='{name}'" in page
  assert f"{metrics['pixel']['auroc']:.4f}" in page


@pytest.fixture(scope="module")
def eval_main():
  spec = importlib.util.spec_from_file_location("eval_main", "eval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _darkness_model(images):
  """Fake model: dark pixels are 'defects' (spots, gaps); the reconstruction is a flat image."""
  maps = np.clip(-images.mean(-1), 0, None)
  return {"maps": maps, "scores": maps.reshape(len(maps), -1).max(1),
          "reconstructions": np.zeros_like(images)}


def test_evaluate_split_end_to_end(eval_main, tmp_path):
  """The real eval path (test split from the synthetic tiny data, tf.data stream, metrics,
  report) with a cheap model injected; the saved maps reproduce metrics.json."""
  config = eval_main.apply_overrides(get_config("tiny"), t_start=499, num_steps=3,
                                     layers=["s4", "s8"], sigma=2.0)
  assert config.diffusion.t_start == 499 and config.model.scorer.layers == ("s4", "s8")
  splits = datasets.load_splits(config.data, default_root=str(tmp_path / "data"))
  test = splits["test"]
  out = tmp_path / "eval"
  metrics = eval_main.evaluate(config, _darkness_model, test, str(out),
                               thresholds={"image": 0.5, "pixel": 0.5}, info={"checkpoint": "x"})
  saved = json.loads((out / "metrics.json").read_text())
  arrays = np.load(out / "maps.npz")
  assert arrays["maps"].shape == (len(test), SIZE, SIZE)
  recomputed = metrics_lib.compute_metrics(arrays["scores"], arrays["labels"], arrays["maps"],
                                           arrays["masks"], list(arrays["defect_types"]))
  assert _nan_equal(saved["metrics"], json.loads(json.dumps(report.jsonable(recomputed))))
  assert _nan_equal(saved["metrics"], json.loads(json.dumps(report.jsonable(metrics))))
  assert saved["info"]["t_start"] == 499 and saved["info"]["sigma"] == 2.0
  types = sorted({r.defect_type for r in test if r.label})
  for name in [f"grid_{t}.png" for t in types] + ["grid_good.png", "roc_pr.png",
                                                  "score_histogram.png", "index.html"]:
    assert (out / name).stat().st_size > 0, name
