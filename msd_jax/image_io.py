"""Reading user images of any mode into uint8 RGB, and writing result PNGs.

Accepted: anything Pillow decodes (PNG, JPEG, BMP, TIFF, ...) in modes 1, L, LA, P, RGB, RGBA,
CMYK, 16-bit grayscale (I;16) and 32-bit integer or float grayscale (I, F). Choices:
- 16-bit grayscale is scaled by 255/65535 (full 16-bit range), not min-max stretched, so the
  brightness of a photograph is kept.
- I and F images whose values already lie in [0, 255] are taken as 8-bit; larger values as
  16-bit; anything else (negative or above 65535) is min-max stretched to [0, 255].
- Alpha is dropped (stone photographs are opaque; a transparent background carries no texture).
- The EXIF orientation of JPEGs is applied, so a phone photo is read the way it is displayed.
"""
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

PathLike = Union[str, os.PathLike]

_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageReadError(ValueError):
  """An image file that cannot be read; the message names the file and the reason."""

  def __init__(self, path: PathLike, reason: str):
    self.path = os.fspath(path)
    self.reason = reason
    super().__init__(f"cannot read image {self.path}: {reason}")


def _wide_to_uint8(values: np.ndarray) -> np.ndarray:
  values = values.astype(np.float64)
  lo, hi = float(values.min()), float(values.max())
  if lo >= 0 and hi <= 255:
    scaled = values
  elif lo >= 0 and hi <= 65535:
    scaled = values * (255.0 / 65535.0)
  else:
    scaled = (values - lo) * (255.0 / max(hi - lo, 1e-12))
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
  """A decoded Pillow image as a uint8 array [H, W, 3]."""
  if image.mode in _WIDE_MODES:
    gray = _wide_to_uint8(np.asarray(image))
    return np.repeat(gray[:, :, None], 3, axis=2)
  return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_image(path: PathLike) -> np.ndarray:
  """Reads an image file as uint8 [H, W, 3]; raises `ImageReadError` naming the file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ImageReadError(path, "no such file")
  try:
    with Image.open(path) as image:
      image.load()
      image = ImageOps.exif_transpose(image)
      array = to_rgb_uint8(image)
  except Exception as e:  # corrupt files raise OSError, SyntaxError, struct.error, ...
    raise ImageReadError(path, f"{type(e).__name__}: {e}") from e
  if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
    raise ImageReadError(path, f"decoded to an empty array of shape {array.shape}")
  return array


def write_png(path: PathLike, array: np.ndarray) -> None:
  """Writes uint8 [H, W] or [H, W, 3] (or bool [H, W], as 0/255) to a PNG file."""
  array = np.asarray(array)
  if array.dtype == bool:
    array = array.astype(np.uint8) * 255
  if array.dtype != np.uint8:
    raise ValueError(f"write_png expects uint8 or bool, got {array.dtype} for {os.fspath(path)}")
  Image.fromarray(array).save(os.fspath(path), format="PNG")
