"""eval outputs: metrics.json equals the metrics recomputed from the saved maps, and every
picture and index.html is written; eval and detect on a checkpoint trained by the real loop."""
import copy
import functools
import importlib.util
import io
import json
import os
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from configs.msd import get_config
from data_pipeline import datasets
from msd_jax import detector as detector_lib
from msd_jax import image_io
from msd_jax import metrics as metrics_lib
from msd_jax import parallel
from msd_jax import report
from msd_jax.training import checkpoint
from msd_jax.training import loop

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
                                     layers=["s4", "s8"], sigma=2.0, reference="input",
                                     local_contrast=0.0)
  assert config.diffusion.t_start == 499 and config.model.scorer.layers == ("s4", "s8")
  assert config.model.scorer.reference == "input" and config.model.scorer.local_contrast == 0.0
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


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A tiny run through the real training loop (one step per stage, the settings of
  test_training's smoke test, so the compilation cache is shared), with the whitened scorer."""
  config = get_config("tiny")
  config.model.scorer.distance = "whitened"
  config.model.scorer.whitening_images = 6
  config.mesh.data = 2
  config.stages.vae.num_steps = 1
  config.stages.msd.num_steps = 1
  workdir = str(tmp_path_factory.mktemp("trained"))
  original = parallel.make_mesh
  try:
    parallel.make_mesh = lambda cfg, devices=None: original(cfg, jax.devices()[:2])
    loop.train_and_evaluate(config, workdir)
  finally:
    parallel.make_mesh = original
  return workdir


def _best_msd_meta(workdir):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints", "msd"),
                                 best_metric="val_auroc")
  try:
    return ckpt.restore_meta(ckpt.best_step())
  finally:
    ckpt.close()


@pytest.mark.slow
def test_eval_on_trained_checkpoint(eval_main, trained_workdir):
  """eval's real path on a trained checkpoint: the best msd checkpoint with its validation
  thresholds, every picture and index.html, and metrics.json equal to the metrics recomputed
  from the saved maps."""
  config = detector_lib.load_config(trained_workdir)  # what detect uses: one compiled program
  metrics, out_dir = eval_main.run_eval(config, trained_workdir)
  out = pathlib.Path(out_dir)
  assert out == pathlib.Path(trained_workdir) / "eval"
  saved = json.loads((out / "metrics.json").read_text())
  arrays = np.load(out / "maps.npz")
  test = datasets.load_splits(config.data, default_root=os.path.join(trained_workdir, "data"))
  test = test["test"]
  assert arrays["maps"].shape == (len(test), SIZE, SIZE)
  assert np.isfinite(arrays["maps"]).all() and arrays["maps"].std() > 0
  np.testing.assert_array_equal(arrays["labels"], [r.label for r in test])
  recomputed = metrics_lib.compute_metrics(arrays["scores"], arrays["labels"], arrays["maps"],
                                           arrays["masks"], list(arrays["defect_types"]))
  assert _nan_equal(saved["metrics"], json.loads(json.dumps(report.jsonable(recomputed))))
  assert _nan_equal(saved["metrics"], json.loads(json.dumps(report.jsonable(metrics))))
  meta = _best_msd_meta(trained_workdir)
  assert saved["thresholds"] == pytest.approx(meta["thresholds"])
  assert saved["info"]["checkpoint"] == "msd step 1"
  assert sorted(meta["whitening"]) == sorted(config.model.scorer.layers)
  assert config.model.scorer.local_contrast > 0 and len(meta["score_norm"]["std"]) == 2
  types = sorted({r.defect_type for r in test if r.label})
  for name in [f"grid_{t}.png" for t in types] + ["grid_good.png", "roc_pr.png",
                                                  "score_histogram.png", "index.html"]:
    assert (out / name).stat().st_size > 0, name
  page = (out / "index.html").read_text()
  assert all(f"src='grid_{t}.png'" in page for t in types)

  # --split=val with an ablation flag: the whitening is refitted on the training split.
  _, val_dir = eval_main.run_eval(config, trained_workdir, split="val", saved_thresholds=False)
  val = datasets.load_splits(config.data, default_root=os.path.join(trained_workdir, "data"))["val"]
  val_saved = json.loads((pathlib.Path(val_dir) / "metrics.json").read_text())
  assert pathlib.Path(val_dir) == pathlib.Path(trained_workdir) / "eval_val"
  assert val_saved["info"]["val_images"] == len(val) and "test_images" not in val_saved["info"]
  assert val_saved["info"]["thresholds"].startswith("F1-optimal on the val split")
  with pytest.raises(ValueError, match="no training batches"):
    detector_lib.load_model(config, trained_workdir, refit=True)
  # a scorer with other layers than the saved fit: refitted, and the saved thresholds dropped
  other = copy.deepcopy(config)
  other.model.scorer.layers = ("pixels", "s4")
  with pytest.raises(ValueError, match="fit is for the layers"):
    detector_lib.load_model(other, trained_workdir)
  refitted = detector_lib.load_model(other, trained_workdir, fit_batches=functools.partial(
      eval_main.whitening_batches, other, datasets.load_splits(
          other.data, default_root=os.path.join(trained_workdir, "data"))["train"]))
  assert refitted.thresholds is None
  assert np.load(pathlib.Path(val_dir) / "maps.npz")["maps"].shape[0] == len(val)


@pytest.mark.slow
def test_detect_on_trained_checkpoint(trained_workdir, tmp_path):
  """detect's real path (Detector.from_workdir, detect_inputs) on the same checkpoint: a slab
  larger than the training images, a grayscale PNG and a corrupt file give two results, one
  reported failure and exit code 1; verdicts and masks follow the saved thresholds."""
  rng = np.random.default_rng(0)
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  first = sorted((pathlib.Path(trained_workdir) / "data" / "images").glob("*.png"))[0]
  slab = np.asarray(Image.open(first).convert("RGB"))
  Image.fromarray(np.tile(slab, (3, 3, 1))[:150, :170]).save(inputs / "slab.jpg", quality=95)
  Image.fromarray(rng.integers(0, 255, (SIZE, SIZE), dtype=np.uint8)).save(inputs / "gray.png")
  (inputs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
  detector = detector_lib.Detector.from_workdir(trained_workdir)
  assert detector.thresholds == pytest.approx(_best_msd_meta(trained_workdir)["thresholds"])
  log = io.StringIO()
  code = detector_lib.detect_inputs(detector, [str(inputs)], str(tmp_path / "out"), stream=log)
  assert code == 1 and "1 failed" in log.getvalue() and "corrupt.png" in log.getvalue()
  lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text()
           .splitlines()]
  results = {os.path.basename(r["path"]): r for r in lines if "score" in r}
  assert sorted(results) == ["gray.png", "slab.jpg"]
  assert [os.path.basename(r["path"]) for r in lines if "error" in r] == ["corrupt.png"]
  for name, shape in (("slab.jpg", (150, 170)), ("gray.png", (SIZE, SIZE))):
    r = results[name]
    assert np.isfinite(r["score"])
    assert r["defective"] == (r["score"] >= r["image_threshold"])
    assert r["image_threshold"] == detector.thresholds["image"]
    mask = np.asarray(Image.open(tmp_path / "out" / r["mask"])) > 0
    assert mask.shape == shape
    (det,) = detector.predict([image_io.read_image(inputs / name)])
    np.testing.assert_array_equal(mask, det.anomaly_map >= r["pixel_threshold"])
    assert det.score == pytest.approx(r["score"], rel=1e-6)
