"""Test-split evaluation: `python eval.py --workdir=DIR [--config=configs/msd.py:VARIANT]`.

Restores the best checkpoint (chosen on validation), reconstructs and scores the test split in one
jitted function per batch, and writes DIR/eval/: metrics.json, maps.npz, a grid per defect type,
ROC/PR curves, the score histogram and index.html; prints the metrics table. The flags below
override the config for the paper's ablations (its tables 2-4), e.g.
`--t_start=499 --num_steps=5 --layers=s4,s8 --sigma=2`.

Maps are evaluated at the model's resolution (the input pipeline resizes each test image to
`data.image_size`, as validation does) or, with `data.tile_size > 0`, stitched from native-
resolution tiles (msd_jax/tiling.py) and evaluated against the native masks.
"""
import functools
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from data_pipeline import datasets
from data_pipeline import input_pipeline
from msd_jax import detector as detector_lib
from msd_jax import metrics as metrics_lib
from msd_jax import report
from msd_jax import tiling

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config (default: the one saved in the workdir).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.")
_T_START = flags.DEFINE_integer("t_start", None, "Partial-noising timestep (config.diffusion).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "DDIM steps (diffusion.num_inference_steps).")
_LAYERS = flags.DEFINE_list("layers", None, "Scorer layers, e.g. s4,s8,s16 (model.scorer.layers).")
_SIGMA = flags.DEFINE_float("sigma", None, "Gaussian sigma of the map (model.scorer.sigma).")
_REFERENCE = flags.DEFINE_enum("reference", None, ["input", "autoencoder"],
                                "What x_hat is compared with (model.scorer.reference).")
_DISTANCE = flags.DEFINE_enum("distance", None, ["cosine", "whitened"],
                               "Feature distance of the scorer (model.scorer.distance).")
_LOCAL_CONTRAST = flags.DEFINE_float(
    "local_contrast", None, "Background sigma of the local-peak image score in pixels, 0 = the "
    "map's score alone (model.scorer.local_contrast).")
_NUM_BINS = flags.DEFINE_integer("num_bins", None, "Binned pixel metrics (large test sets).")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "val"],
                           "val: choose ablation settings on validation (report in DIR/eval_val/).")
flags.mark_flags_as_required(["workdir"])


def apply_overrides(config, t_start=None, num_steps=None, layers=None, sigma=None,
                    reference=None, distance=None, local_contrast=None):
  """The ablation flags written into the config (unlocked copy semantics kept by the caller)."""
  if t_start is not None:
    config.diffusion.t_start = t_start
  if num_steps is not None:
    config.diffusion.num_inference_steps = num_steps
  if layers:
    config.model.scorer.layers = tuple(layers)
  if sigma is not None:
    config.model.scorer.sigma = sigma
  if reference is not None:
    config.model.scorer.reference = reference
  if distance is not None:
    config.model.scorer.distance = distance
  if local_contrast is not None:
    config.model.scorer.local_contrast = local_contrast
  return config


def predict_split(config, predict_fn, records, defect_types):
  """Runs `predict_fn` over the evaluation stream of `records`.

  Returns per-record arrays: images uint8, reconstructions uint8, masks bool (None without pixel
  labels), maps float32, scores, labels, defect type names.
  """
  data = config.data
  ds = input_pipeline.eval_dataset(
      records, image_size=data.image_size, global_batch_size=config.eval.batch_size,
      tile_size=data.tile_size, tile_overlap=data.tile_overlap, defect_types=defect_types)
  pieces = {k: [] for k in ("index", "image", "mask", "map", "score", "recon")}
  for batch in ds.as_numpy_iterator():
    out = predict_fn(batch["image"])
    valid = batch["valid"]
    pieces["index"].append(batch["index"][valid])
    pieces["image"].append(batch["image"][valid])
    pieces["mask"].append(batch["mask"][valid])
    pieces["map"].append(np.asarray(out["maps"], np.float32)[valid])
    pieces["score"].append(np.asarray(out["scores"], np.float32)[valid])
    pieces["recon"].append(np.asarray(out["reconstructions"], np.float32)[valid])
  got = {k: np.concatenate(v) for k, v in pieces.items()}
  has_masks = all(r.has_pixel_labels for r in records)
  if data.tile_size > 0:
    return _stitch_records(config, records, got, has_masks)
  return {
      "images": detector_lib.from_model_range(got["image"]),
      "reconstructions": detector_lib.from_model_range(got["recon"]),
      "masks": got["mask"].astype(bool) if has_masks else None,
      "maps": got["map"], "scores": got["score"],
      "labels": np.array([r.label for r in records], bool),
      "defect_types": [r.defect_type for r in records]}


def _stitch_records(config, records, got, has_masks):
  """Tile outputs -> native-resolution maps per record; image score = the largest tile score."""
  data = config.data
  sizes = {r.size for r in records}
  if len(sizes) != 1:
    raise ValueError(f"data.tile_size > 0 needs test images of one size to stack the maps; got "
                     f"{sorted(sizes)} (e.g. {records[0].path})")
  native = functools.partial(detector_lib.resample, shape=(data.tile_size, data.tile_size))
  images, recons, masks, maps, scores = [], [], [], [], []
  for i, record in enumerate(records):
    sel = got["index"] == i
    grid = tiling.make_grid(*record.size, data.tile_size, data.tile_overlap)
    maps.append(tiling.stitch(np.stack([native(m) for m in got["map"][sel]]), grid))
    recons.append(detector_lib.from_model_range(
        tiling.stitch(np.stack([native(m) for m in got["recon"][sel]]), grid)))
    scores.append(float(got["score"][sel].max()))
    images.append(datasets.load_image(record))
    mask = datasets.load_mask(record) if has_masks else None
    masks.append(None if mask is None else mask.astype(bool))
  return {"images": np.stack(images), "reconstructions": np.stack(recons),
          "masks": np.stack(masks) if has_masks else None, "maps": np.stack(maps),
          "scores": np.array(scores, np.float32),
          "labels": np.array([r.label for r in records], bool),
          "defect_types": [r.defect_type for r in records]}


def evaluate(config, predict_fn, records, out_dir, thresholds=None, info=None, num_bins=None,
             split="test"):
  """Predicts, measures and writes the report; returns the metrics.

  `thresholds` ({"image", "pixel"}, from validation) colour the pictures; without them the test
  split's own F1-optimal thresholds are used, and the report says so.
  """
  defect_types = datasets.defect_type_names(records)
  result = predict_split(config, predict_fn, records, defect_types)
  metrics = metrics_lib.compute_metrics(
      result["scores"], result["labels"], result["maps"], result["masks"],
      result["defect_types"], num_bins=num_bins)
  info = dict(info or {})
  if thresholds is None:
    thresholds = {"image": metrics["image"]["threshold"],
                  "pixel": metrics.get("pixel", {}).get("threshold", np.inf)}
    info["thresholds"] = (f"F1-optimal on the {split} split (no validation thresholds for these "
                          "settings)")
  else:
    info["thresholds"] = "F1-optimal on the validation split"
  info.update({"t_start": config.diffusion.t_start,
               "num_steps": config.diffusion.num_inference_steps,
               "scorer": f"{config.model.scorer.backbone} {tuple(config.model.scorer.layers)}",
               "sigma": config.model.scorer.sigma, f"{split}_images": len(records)})
  report.write_eval_report(
      out_dir, metrics=metrics, thresholds=thresholds, info=info, title="MSD evaluation",
      paths=[r.path for r in records], **result)
  return metrics


def whitening_batches(config, records):
  """(images, valid) batches of the first `model.scorer.whitening_images` model inputs of the
  training records (images, or with `data.tile_size > 0` tiles, on which training and its
  validation run), as validation fits a whitened scorer during training."""
  count = config.model.scorer.whitening_images
  batch = config.eval.batch_size
  ds = input_pipeline.eval_dataset(
      records[:count], image_size=config.data.image_size, global_batch_size=batch,
      tile_size=config.data.tile_size, tile_overlap=config.data.tile_overlap)
  for start, b in zip(range(0, count, batch), ds.as_numpy_iterator()):
    yield b["image"], b["valid"] & (start + np.arange(len(b["valid"])) < count)


def run_eval(config, workdir, num_bins=None, saved_thresholds=True, split="test"):
  """What eval.py does: the best checkpoint of `workdir` on its test split (or `split`), the
  report in `workdir/eval/` (`workdir/eval_<split>/`). Returns (metrics, the report folder).

  `saved_thresholds=False` ignores the checkpoint's validation thresholds (they were fixed for
  the training config's diffusion and scorer settings, not for an ablation's), and fits a
  whitened scorer anew on the training split for the same reason.
  """
  splits = datasets.load_splits(config.data, default_root=os.path.join(workdir, "data"))
  model = detector_lib.load_model(
      config, workdir, fit_batches=functools.partial(whitening_batches, config, splits["train"]),
      refit=not saved_thresholds)
  out_dir = os.path.join(workdir, "eval" if split == "test" else f"eval_{split}")
  metrics = evaluate(config, model.predict_fn, splits[split], out_dir,
                     thresholds=model.thresholds if saved_thresholds else None,
                     info=model.info, num_bins=num_bins, split=split)
  logging.info("wrote %s", out_dir)
  return metrics, out_dir


def main(argv):
  del argv
  config = _CONFIG.value or detector_lib.load_config(_WORKDIR.value)
  overrides = (_T_START.value, _NUM_STEPS.value, _LAYERS.value, _SIGMA.value,
               _REFERENCE.value, _DISTANCE.value, _LOCAL_CONTRAST.value)
  config = apply_overrides(config, *overrides)
  metrics, out_dir = run_eval(config, _WORKDIR.value, num_bins=_NUM_BINS.value,
                              saved_thresholds=all(v is None for v in overrides),
                              split=_SPLIT.value)
  print(report.format_table(metrics))
  print(f"\nreport: {os.path.join(out_dir, 'index.html')}")


if __name__ == "__main__":
  app.run(main)
