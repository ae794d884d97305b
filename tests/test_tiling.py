"""Tiling: split + stitch reproduces untiled maps (exact off the overlaps, float32 rounding on
them), weights form a partition of unity, small images are padded and cropped back."""
import numpy as np
import pytest
from scipy import ndimage

from configs.msd import get_config
from msd_jax import tiling


def _pointwise(x):
  """A per-pixel 'model': tile position cannot matter."""
  return np.tanh(3.0 * x[..., 0]) * x[..., 1] + np.sin(5.0 * x[..., 2])


def _box(x, radius):
  """A neighbourhood 'model' (mean over a (2r+1)^2 window, reflect at borders)."""
  return ndimage.uniform_filter(x[..., 0], size=2 * radius + 1, mode="reflect")


@pytest.fixture(scope="module")
def image900():
  return np.random.default_rng(0).uniform(-1, 1, (900, 900, 3)).astype(np.float32)


def test_starts_cover_and_overlap():
  for length, tile, overlap in ((900, 256, 64), (900, 32, 8), (257, 256, 0), (100, 128, 32)):
    starts = tiling.tile_starts(length, tile, overlap)
    assert starts[0] == 0
    assert starts[-1] + tile == max(length, tile)
    if len(starts) > 1:
      assert np.all(np.diff(starts) <= tile - overlap)
      assert np.all(np.diff(starts) > 0)


@pytest.mark.parametrize("tile,overlap", [(256, 64), (128, 32), (300, 150)])
def test_weights_partition_of_unity(tile, overlap):
  starts = tiling.tile_starts(900, tile, overlap)
  w = tiling.axis_weights(starts, tile)
  total = np.zeros(900)
  for s, wi in zip(starts, w):
    total[s:s + tile] += wi
  np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)
  assert np.all(w > 0)
  # smooth: no jumps larger than a raised-cosine step over the overlap
  assert np.max(np.abs(np.diff(w, axis=1))) < 2.0 * np.pi / overlap


def test_pointwise_900_equals_untiled(image900):
  size = get_config("demo").data.image_size
  grid = tiling.make_grid(900, 900, size, size // 4)
  assert grid.num_tiles > 1
  tiles = tiling.split(image900, grid)
  assert tiles.shape == (grid.num_tiles, size, size, 3)
  stitched = tiling.stitch(_pointwise(tiles), grid)
  expected = _pointwise(image900)
  overlap = grid.overlap_mask()
  assert overlap.any() and (~overlap).any()
  np.testing.assert_array_equal(stitched[~overlap], expected[~overlap])
  np.testing.assert_allclose(stitched[overlap], expected[overlap], rtol=1e-6, atol=1e-6)


def test_neighbourhood_model_exact_off_overlaps(image900):
  """A model whose receptive field (radius 3) fits inside the overlap: exact off the overlaps."""
  size, radius = 128, 3
  grid = tiling.make_grid(900, 900, size, 32)
  stitched = tiling.stitch(np.stack([_box(t, radius) for t in tiling.split(image900, grid)]), grid)
  expected = _box(image900, radius)
  overlap = grid.overlap_mask()
  np.testing.assert_array_equal(stitched[~overlap], expected[~overlap])
  # on the overlaps, the tile maps are wrong within `radius` of the tile edges; the blend's
  # weight there is tiny, so the error stays far below the signal
  err = np.abs(stitched - expected)[overlap].max()
  assert err < 0.05 * np.abs(expected).max()


def test_channels_and_small_images_pad_and_crop():
  rng = np.random.default_rng(1)
  small = rng.uniform(-1, 1, (20, 45, 3)).astype(np.float32)
  grid = tiling.make_grid(20, 45, 32, 8)
  tiles = tiling.split(small, grid)
  assert tiles.shape[1:] == (32, 32, 3)
  np.testing.assert_allclose(tiling.stitch(tiles, grid), small, rtol=1e-6, atol=1e-6)


def test_shape_errors_name_the_problem():
  grid = tiling.make_grid(64, 64, 32, 8)
  with pytest.raises(ValueError, match="does not match"):
    tiling.split(np.zeros((63, 64)), grid)
  with pytest.raises(ValueError, match="tiles of 32x32"):
    tiling.stitch(np.zeros((1, 32, 32)), grid)
  with pytest.raises(ValueError, match="min_overlap"):
    tiling.tile_starts(100, 32, 32)
