"""`Detector`: defect maps, scores and verdicts for images of any size; what eval.py and
detect.py use.

`predict_fn(images) -> dict(maps, scores, reconstructions)` is the model: images are float32
[B, S, S, 3] in [-1, 1] with S = `image_size`; maps [B, S, S], scores [B] and reconstructions
[B, S, S, 3] in [-1, 1] come back. It is called on batches of exactly `batch_size` tiles (the last
batch padded by repeating its final tile), so a jitted model compiles once.

Sizes: the model must see texture at the scale it was trained on, so an image is first
resampled by `scale`:
- a number: 1.0 (the default) keeps the photo's own pixels, as for a model trained on native-
  resolution tiles or on images already S px wide; image_size / tile_size mirrors training on
  `data.tile_size` tiles resized to S;
- "fit": the whole image is resized to S x S (aspect ratio not kept), exactly what the input
  pipeline does when `data.tile_size` is 0, so a model trained on resized photos sees new photos
  the same way.
If the resampled image is S x S it is one tile; if larger along an axis it is split into
overlapping S x S tiles and the maps are stitched with smooth blending (msd_jax/tiling.py); if
smaller it is reflect-padded to S. Maps and reconstructions are returned at the input's original
resolution. `from_workdir` picks the scale that mirrors the training config.

The image score of a tiled image is the largest tile score: each tile is scored exactly as the
validation images that fixed the threshold were, and a defect anywhere makes the slab defective.
More tiles give more chances to exceed the threshold, so on very large images the false-positive
rate per image grows with the tile count.
"""
import dataclasses
import json
import os
import sys
import time
from typing import (Callable, Dict, Iterable, List, Mapping, Optional, Sequence, TextIO,
                    Tuple, Union)

import jax
import ml_collections
import numpy as np
from absl import logging
from skimage.transform import resize

from msd_jax import image_io
from msd_jax import scoring
from msd_jax import tiling
from msd_jax import viz
from msd_jax.models import msd as msd_lib
from msd_jax.models import scorer as scorer_lib
from msd_jax.training import checkpoint as ckpt_lib

PredictFn = Callable[[np.ndarray], Mapping[str, np.ndarray]]


@dataclasses.dataclass
class Detection:
  """The result for one image, at the image's own resolution."""
  score: float  # image anomaly score
  is_defective: bool  # score >= the image threshold
  anomaly_map: np.ndarray  # float32 [H, W]
  mask: np.ndarray  # bool [H, W]: anomaly_map >= the pixel threshold
  reconstruction: np.ndarray  # uint8 [H, W, 3]


@dataclasses.dataclass
class LoadedModel:
  """A restored checkpoint ready to predict."""
  predict_fn: PredictFn
  image_size: int
  batch_size: int
  thresholds: Optional[Dict[str, float]]  # {"image", "pixel"}: F1-optimal on validation
  info: Dict[str, object]  # checkpoint step and stage, shown in reports


def load_config(workdir: str):
  """The config training saved as `workdir/config.json`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no saved config; is {workdir} a training workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


RECONSTRUCTORS = {"vae": "vae_reconstruct", "msd": "reconstruct"}  # stage -> MSD method


def _restore_best(config, workdir: str):
  """(params, meta) of the best validated checkpoint of the last trained stage (the latest
  checkpoint when none was validated); the EMA weights when training kept them."""
  for stage in reversed(config.stages.order):
    directory = os.path.join(workdir, "checkpoints", stage)
    if stage not in RECONSTRUCTORS or not os.path.isdir(directory):
      continue
    checkpointer = ckpt_lib.Checkpointer(directory, best_metric=config.eval.best_metric)
    try:
      step = checkpointer.best_step()
      step = checkpointer.latest_step() if step is None else step
      if step is None:
        continue
      state, meta = checkpointer.restore_on_device(step)
    finally:
      checkpointer.close()
    params = state.get("ema_params") or state["params"]
    return params, dict(meta, stage=stage, step=step)
  raise FileNotFoundError(f"{workdir}: no checkpoint of the stages {tuple(RECONSTRUCTORS)} "
                          f"under {os.path.join(workdir, 'checkpoints')}")


def load_model(config, workdir: str, fit_batches: Optional[Callable[[], Iterable]] = None,
               refit: bool = False) -> LoadedModel:
  """Restores the best checkpoint of `workdir` and builds its predict_fn: reconstruction
  (partial noising to `config.diffusion.t_start`, DDIM steps, decode) and scoring in one jitted
  function per batch, with the rng fixed by `config.seed` so results repeat.

  A whitened scorer and a combined image score (msd_jax.scoring) use the fits saved with the
  checkpoint; with `refit`, or when none was saved for this scorer, they are fitted anew on
  `fit_batches()`, an iterable of (images, valid) batches of defect-free training images (what
  eval.py does when an ablation changes the reconstruction or the scorer). A fit for another
  scorer also drops the saved thresholds, which were chosen with that other scorer.
  """
  params, meta = _restore_best(config, workdir)
  model = msd_lib.MSD(config)
  reconstruct = getattr(model, RECONSTRUCTORS[meta["stage"]])
  reference = model.scoring_reference if meta["stage"] == "msd" else lambda params, x: x
  module, variables = scorer_lib.build_scorer(config.model.scorer)
  score_parts = scoring.make_score_fn(module, variables, config.model.scorer, parts=True)
  key = jax.random.PRNGKey(config.seed)

  @jax.jit
  def pair(params, images):
    return reference(params, images), reconstruct(params, images, key)

  @jax.jit
  def predict(params, variables, images, whitening, score_norm):
    x_ref, x_hat = pair(params, images)
    maps, parts = score_parts.func(variables, x_ref, x_hat, whitening)
    scores = scoring.image_scores(parts, config.model.scorer, score_norm)
    return {"maps": maps, "scores": scores, "reconstructions": x_hat}

  thresholds = meta.get("thresholds")
  whitened = scoring.uses_whitening(config.model.scorer)
  normed = scoring.uses_score_norm(config.model.scorer)
  saved = meta.get("whitening")
  problem = None  # why the saved fits cannot serve this scorer
  if whitened and saved is None:
    problem = "the checkpoint carries no whitening fit"
  elif whitened and set(saved) != set(config.model.scorer.layers):
    problem = f"its whitening fit is for the layers {sorted(saved)}"
  elif normed and meta.get("score_norm") is None:
    problem = "the checkpoint carries no image-score normalisation"
  whitening = scoring.whitening_from_json(saved) if whitened and problem is None else None
  score_norm = (scoring.score_norm_from_json(meta["score_norm"]) if normed and problem is None
                else None)
  if (whitened or normed) and (refit or problem):
    if fit_batches is None:
      raise ValueError(f"{workdir}: the scorer needs fits on training images and "
                       f"{'a refit was asked' if refit else problem}, but no training batches "
                       "were given to fit them on (eval.py fits them on the training split)")
    pairs = [(*pair(params, images), valid) for images, valid in fit_batches()]
    if whitened:
      moments = scoring.make_moments_fn(module, variables, config.model.scorer)
      whitening = scoring.fit_whitening(moments, pairs, config.model.scorer.whitening_shrinkage)
    if normed:
      score_norm = scoring.fit_score_norm(
          lambda x_ref, x_hat, valid: (score_parts(x_ref, x_hat, whitening)[1], valid), pairs)
    if problem:
      thresholds = None

  return LoadedModel(
      predict_fn=lambda images: jax.device_get(
          predict(params, variables, images, whitening, score_norm)),
      image_size=int(config.data.image_size),
      batch_size=int(config.eval.batch_size),
      thresholds=None if thresholds is None else {k: float(thresholds[k]) for k in
                                                  ("image", "pixel")},
      info={"checkpoint": f"{meta['stage']} step {meta['step']}", "workdir": workdir})


def training_scale(data_config) -> Union[float, str]:
  """The `scale` that shows new images to the model as the training input pipeline did."""
  if data_config.tile_size > 0:
    return data_config.image_size / data_config.tile_size
  return "fit"


def to_model_range(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] (or [H, W]) -> float32 [H, W, 3] in [-1, 1]."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got {image.dtype}")
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
  return image.astype(np.float32) / 127.5 - 1.0


def from_model_range(image: np.ndarray) -> np.ndarray:
  """float [..., 3] in [-1, 1] -> uint8."""
  return np.clip(np.rint((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def resample(array: np.ndarray, shape) -> np.ndarray:
  if tuple(array.shape[:2]) == tuple(shape):
    return array
  return resize(array, tuple(shape) + array.shape[2:], order=1, mode="reflect",
                anti_aliasing=True, preserve_range=True).astype(np.float32)


class Detector:
  """Scores images of any size with a fixed-size model; see the module docstring."""

  def __init__(self, predict_fn: PredictFn, image_size: int, thresholds: Mapping[str, float], *,
               batch_size: int = 8, min_overlap: Optional[int] = None,
               scale: Union[float, str] = 1.0):
    """`thresholds` holds "image" (for the verdict) and "pixel" (for the mask).

    `min_overlap` (pixels at model resolution) defaults to a quarter of the tile.
    """
    missing = {"image", "pixel"} - set(thresholds)
    if missing:
      raise ValueError(f"thresholds lack {sorted(missing)}; got {dict(thresholds)}")
    if scale != "fit" and not (isinstance(scale, (int, float)) and scale > 0):
      raise ValueError(f"scale must be a positive number or 'fit', got {scale!r}")
    self.predict_fn = predict_fn
    self.image_size = int(image_size)
    self.thresholds = {k: float(v) for k, v in thresholds.items()}
    self.batch_size = int(batch_size)
    self.min_overlap = self.image_size // 4 if min_overlap is None else int(min_overlap)
    self.scale = scale if scale == "fit" else float(scale)

  @classmethod
  def from_workdir(cls, workdir: str, config=None, **kwargs) -> "Detector":
    """The best checkpoint of a trained `workdir`, with the thresholds saved with it.

    `config` defaults to the one training saved in `workdir/config.json`; `scale` defaults to
    the one mirroring the training input pipeline (see the module docstring).
    """
    config = config if config is not None else load_config(workdir)
    model = load_model(config, workdir)
    if model.thresholds is None:
      raise ValueError(f"{workdir}: the checkpoint carries no validation thresholds; pass "
                       "thresholds to Detector(...) or run eval.py")
    kwargs.setdefault("batch_size", model.batch_size)
    kwargs.setdefault("scale", training_scale(config.data))
    return cls(model.predict_fn, model.image_size, model.thresholds, **kwargs)

  def _run_tiles(self, tiles: np.ndarray) -> Dict[str, np.ndarray]:
    n = len(tiles)
    outputs: Dict[str, List[np.ndarray]] = {"maps": [], "scores": [], "reconstructions": []}
    for start in range(0, n, self.batch_size):
      batch = tiles[start:start + self.batch_size]
      valid = len(batch)
      if valid < self.batch_size:
        batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - valid, axis=0)])
      result = self.predict_fn(batch)
      for key in outputs:
        outputs[key].append(np.asarray(result[key], np.float32)[:valid])
    return {k: np.concatenate(v) for k, v in outputs.items()}

  def predict(self, images: Sequence[np.ndarray]) -> List[Detection]:
    """uint8 images [H, W, 3] (or [H, W]) of any sizes -> one `Detection` each."""
    prepared, grids = [], []
    for image in images:
      x = to_model_range(image)
      if self.scale == "fit":
        x = resample(x, (self.image_size, self.image_size))
      elif self.scale != 1.0:
        h, w = x.shape[:2]
        x = resample(x, (max(1, round(h * self.scale)), max(1, round(w * self.scale))))
      grid = tiling.make_grid(x.shape[0], x.shape[1], self.image_size, self.min_overlap)
      prepared.append(tiling.split(x, grid))
      grids.append(grid)
    if not prepared:
      return []
    out = self._run_tiles(np.concatenate(prepared))
    detections, offset = [], 0
    for image, grid in zip(images, grids):
      k = grid.num_tiles
      anomaly_map = tiling.stitch(out["maps"][offset:offset + k], grid)
      recon = tiling.stitch(out["reconstructions"][offset:offset + k], grid)
      score = float(out["scores"][offset:offset + k].max())
      offset += k
      anomaly_map = resample(anomaly_map, image.shape[:2])
      recon = resample(recon, image.shape[:2])
      detections.append(Detection(
          score=score,
          is_defective=score >= self.thresholds["image"],
          anomaly_map=anomaly_map.astype(np.float32),
          mask=anomaly_map >= self.thresholds["pixel"],
          reconstruction=from_model_range(recon)))
    return detections



IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                    ".pgm")


def collect_inputs(inputs: Sequence[str]) -> Tuple[List[str], List[str]]:
  """Expands files and folders into (image paths, ignored paths).

  A folder contributes its files with an image extension (case-insensitive), sorted; its other
  files are returned as ignored so the caller can say so. A path named explicitly is always
  attempted, whatever its extension, and a path that does not exist is attempted too (and then
  fails with a message naming it).
  """
  paths, ignored = [], []
  for item in inputs:
    if os.path.isdir(item):
      for name in sorted(os.listdir(item)):
        full = os.path.join(item, name)
        if name.startswith(".") or os.path.isdir(full):
          continue
        (paths if name.lower().endswith(IMAGE_EXTENSIONS) else ignored).append(full)
    else:
      paths.append(item)
  return paths, ignored


class Progress:
  """A one-line text progress bar with rate and ETA, redrawn in place on `stream`."""

  def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30):
    self.total, self.stream, self.width = total, stream, width
    self.start = time.monotonic()
    self.done = 0

  def update(self, label: str = "") -> None:
    self.done += 1
    elapsed = time.monotonic() - self.start
    rate = elapsed / self.done
    eta = rate * (self.total - self.done)
    filled = int(self.width * self.done / max(self.total, 1))
    bar = "#" * filled + "." * (self.width - filled)
    line = (f"\r[{bar}] {self.done}/{self.total} {rate:.2f} s/img "
            f"ETA {_clock(eta)} elapsed {_clock(elapsed)} {label[-40:]:<40}")
    self.stream.write(line)
    if self.done == self.total:
      self.stream.write("\n")
    self.stream.flush()


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _unique_stem(path: str, used: set) -> str:
  stem = os.path.splitext(os.path.basename(path))[0] or "image"
  candidate, k = stem, 1
  while candidate in used:
    candidate, k = f"{stem}-{k}", k + 1
  used.add(candidate)
  return candidate


def detect_files(detector: Detector, paths: Sequence[str], out_dir: str,
                 progress: Optional[Progress] = None) -> Tuple[List[dict], List[dict]]:
  """Scores each file, writing OUT/<stem>_mask.png, OUT/<stem>_overlay.png and one line per
  file to OUT/results.jsonl (failures carry "error" instead of a score).

  An unreadable file or a failing prediction is logged, recorded and skipped; the rest are still
  processed. Returns (results, failures). The overlay colours [0, 2 x pixel threshold], so the
  threshold is the middle of the colormap, with the predicted mask outlined in green.
  """
  os.makedirs(out_dir, exist_ok=True)
  results, failures, used = [], [], set()
  vmax = 2.0 * detector.thresholds["pixel"]
  with open(os.path.join(out_dir, "results.jsonl"), "w") as jsonl:
    for path in paths:
      try:
        image = image_io.read_image(path)
        (det,) = detector.predict([image])
        stem = _unique_stem(path, used)
        mask_name, overlay_name = f"{stem}_mask.png", f"{stem}_overlay.png"
        image_io.write_png(os.path.join(out_dir, mask_name), det.mask)
        picture = viz.draw_outline(viz.overlay(image, det.anomaly_map, 0.0, vmax), det.mask)
        image_io.write_png(os.path.join(out_dir, overlay_name), picture)
        record = {
            "path": path, "score": det.score, "defective": bool(det.is_defective),
            "image_threshold": detector.thresholds["image"],
            "pixel_threshold": detector.thresholds["pixel"],
            "height": int(image.shape[0]), "width": int(image.shape[1]),
            "defect_area_fraction": float(det.mask.mean()),
            "mask": mask_name, "overlay": overlay_name,
        }
        results.append(record)
      except Exception as e:  # one bad file must not stop the batch; it is reported below
        message = str(e) if isinstance(e, image_io.ImageReadError) else (
            f"{path}: {type(e).__name__}: {e}")
        record = {"path": path, "error": message}
        failures.append(record)
        logging.error("skipped %s", message)
      jsonl.write(json.dumps(record) + "\n")
      jsonl.flush()
      if progress is not None:
        progress.update(os.path.basename(path))
  return results, failures


def detect_inputs(detector: Detector, inputs: Sequence[str], out_dir: str,
                  stream: TextIO = sys.stderr) -> int:
  """What detect.py does: files and folders in, outputs in `out_dir`, a summary on `stream`.

  Returns the exit code: 0 when every file was scored, 1 when any failed, 2 when there was
  nothing to score.
  """
  paths, ignored = collect_inputs(inputs)
  for path in ignored:
    logging.warning("ignored %s: not an image extension (%s)", path, ", ".join(IMAGE_EXTENSIONS))
  if not paths:
    stream.write(f"no images found in {', '.join(inputs) or '(no inputs given)'}\n")
    return 2
  results, failures = detect_files(detector, paths, out_dir, Progress(len(paths), stream))
  defective = sum(r["defective"] for r in results)
  stream.write(f"scored {len(results)} of {len(paths)} images: {defective} defective, "
               f"{len(results) - defective} defect-free; results in "
               f"{os.path.join(out_dir, 'results.jsonl')}\n")
  if failures:
    stream.write(f"{len(failures)} failed:\n")
    for failure in failures:
      stream.write(f"  {failure['error']}\n")
  return 1 if failures else 0
