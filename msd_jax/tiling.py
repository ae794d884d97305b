"""Overlapping tiles of a large image, and stitching per-tile maps back with smooth blending.

A slab photo larger than the model's input is cut into `tile x tile` windows: along each axis the
first starts at 0, the last ends at the border, and the rest are evenly spaced so that neighbours
share at least `min_overlap` pixels. An image smaller than a tile along an axis is first
reflect-padded up to the tile size (no resampling, so defects keep their physical scale), and the
padding is cropped away again after stitching.

Blending is separable: along each axis a tile's weight is 1 in its interior and a raised-cosine
ramp `0.5 - 0.5 cos(pi (u + 1/2) / L)` across each overlap of length L, so two ramps over the same
overlap sum to 1; the per-axis weights are then divided by their sum over tiles, which makes them a
partition of unity also when three tiles meet. A tile's 2-D weight is the outer product of its
two 1-D weights, and the stitched map is the weighted sum of the tile maps, accumulated in
float64.

Tolerance: where only one tile covers a pixel its weight is exactly 1, so the stitched value is
bit-identical to that tile's prediction. Where tiles overlap, the result is a convex combination
of the tiles' predictions: for a prediction that depends only on the pixel itself (or on a
neighbourhood no wider than the overlap's distance to the tile edges) it equals the untiled map
to float32 rounding (relative 1e-6); for a model with a wider receptive field the difference is at
most the largest difference between a covering tile's prediction and the untiled one.
"""
import dataclasses
import math
from typing import Tuple

import numpy as np


def tile_starts(length: int, tile: int, min_overlap: int) -> np.ndarray:
  """Start offsets of tiles covering [0, length), neighbours sharing >= min_overlap pixels."""
  if not 0 <= min_overlap < tile:
    raise ValueError(f"min_overlap must be in [0, tile={tile}), got {min_overlap}")
  if length <= tile:
    return np.zeros((1,), np.int64)
  n = math.ceil((length - tile) / (tile - min_overlap)) + 1
  return np.round(np.linspace(0, length - tile, n)).astype(np.int64)


def _ramp(length: int) -> np.ndarray:
  u = np.arange(length, dtype=np.float64)
  return 0.5 - 0.5 * np.cos(np.pi * (u + 0.5) / length)


def axis_weights(starts: np.ndarray, tile: int) -> np.ndarray:
  """Per-tile 1-D blending weights [num_tiles, tile] that sum to 1 at every covered position."""
  raw = np.ones((len(starts), tile), np.float64)
  for i in range(len(starts) - 1):
    overlap = int(starts[i] + tile - starts[i + 1])
    if overlap > 0:
      ramp = _ramp(overlap)
      raw[i, tile - overlap:] *= ramp[::-1]
      raw[i + 1, :overlap] *= ramp
  total = np.zeros((int(starts[-1]) + tile,), np.float64)
  for start, w in zip(starts, raw):
    total[start:start + tile] += w
  return np.stack([w / total[start:start + tile] for start, w in zip(starts, raw)])


@dataclasses.dataclass(frozen=True)
class TileGrid:
  """Where the tiles of one `height x width` image lie, and their blending weights."""
  height: int
  width: int
  tile: int
  min_overlap: int

  @property
  def padded_shape(self) -> Tuple[int, int]:
    return max(self.height, self.tile), max(self.width, self.tile)

  @property
  def ys(self) -> np.ndarray:
    return tile_starts(self.padded_shape[0], self.tile, self.min_overlap)

  @property
  def xs(self) -> np.ndarray:
    return tile_starts(self.padded_shape[1], self.tile, self.min_overlap)

  @property
  def num_tiles(self) -> int:
    return len(self.ys) * len(self.xs)

  def overlap_mask(self) -> np.ndarray:
    """bool [height, width]: True where more than one tile covers the pixel."""
    count = np.zeros(self.padded_shape, np.int32)
    for y in self.ys:
      for x in self.xs:
        count[y:y + self.tile, x:x + self.tile] += 1
    return count[:self.height, :self.width] > 1


def make_grid(height: int, width: int, tile: int, min_overlap: int) -> TileGrid:
  return TileGrid(int(height), int(width), int(tile), int(min_overlap))


def split(image: np.ndarray, grid: TileGrid) -> np.ndarray:
  """[H, W, ...] -> [num_tiles, tile, tile, ...], row-major over the grid."""
  if image.shape[:2] != (grid.height, grid.width):
    raise ValueError(f"image shape {image.shape[:2]} does not match the grid's "
                     f"{(grid.height, grid.width)}")
  ph, pw = grid.padded_shape
  pad = [(0, ph - grid.height), (0, pw - grid.width)] + [(0, 0)] * (image.ndim - 2)
  padded = np.pad(image, pad, mode="symmetric") if (ph, pw) != image.shape[:2] else image
  t = grid.tile
  return np.stack([padded[y:y + t, x:x + t] for y in grid.ys for x in grid.xs])


def stitch(tiles: np.ndarray, grid: TileGrid) -> np.ndarray:
  """[num_tiles, tile, tile, ...] -> [H, W, ...] blended as described in the module docstring."""
  tiles = np.asarray(tiles)
  if tiles.shape[:3] != (grid.num_tiles, grid.tile, grid.tile):
    raise ValueError(f"expected {grid.num_tiles} tiles of {grid.tile}x{grid.tile}, "
                     f"got shape {tiles.shape}")
  wy = axis_weights(grid.ys, grid.tile)
  wx = axis_weights(grid.xs, grid.tile)
  extra = tiles.shape[3:]
  out = np.zeros(grid.padded_shape + extra, np.float64)
  t = grid.tile
  k = 0
  for i, y in enumerate(grid.ys):
    for j, x in enumerate(grid.xs):
      w = np.outer(wy[i], wx[j]).reshape((t, t) + (1,) * len(extra))
      out[y:y + t, x:x + t] += w * tiles[k]
      k += 1
  return out[:grid.height, :grid.width].astype(tiles.dtype)
