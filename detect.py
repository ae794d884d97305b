"""Defect maps for new slab photos:
`python detect.py --workdir=DIR --input=PATHS_OR_FOLDER --out=OUT`.

Any size and mode (grayscale, RGB, RGBA, 16-bit PNG, JPEG); large images are tiled. Writes
OUT/<stem>_mask.png, OUT/<stem>_overlay.png and OUT/results.jsonl; exits non-zero if any file
failed. Extra positional arguments are further inputs (so a shell glob works).
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from msd_jax import detector as detector_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config (default: the one saved in the workdir).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding the checkpoint.")
_INPUT = flags.DEFINE_list("input", [], "Image files and/or folders, comma-separated.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Tiles per model call (default: eval batch).")
_SCALE = flags.DEFINE_string(
    "scale", None, "Resample inputs by this factor before tiling, or 'fit' to resize each to the "
    "model input (default: what the training config's input pipeline did).")
_OVERLAP = flags.DEFINE_integer("min_overlap", None, "Tile overlap in pixels (default S/4).")
_IMAGE_THR = flags.DEFINE_float("image_threshold", None, "Override the saved image threshold.")
_PIXEL_THR = flags.DEFINE_float("pixel_threshold", None, "Override the saved pixel threshold.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  kwargs = {"min_overlap": _OVERLAP.value}
  if _SCALE.value:
    kwargs["scale"] = _SCALE.value if _SCALE.value == "fit" else float(_SCALE.value)
  if _BATCH.value:
    kwargs["batch_size"] = _BATCH.value
  detector = detector_lib.Detector.from_workdir(_WORKDIR.value, config=_CONFIG.value, **kwargs)
  for key, value in (("image", _IMAGE_THR.value), ("pixel", _PIXEL_THR.value)):
    if value is not None:
      detector.thresholds[key] = value
  sys.exit(detector_lib.detect_inputs(detector, _INPUT.value + list(argv[1:]), _OUT.value))


if __name__ == "__main__":
  app.run(main)
