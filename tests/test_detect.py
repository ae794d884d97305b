"""detect: image reading in every mode, the Detector's tiling and verdicts, and the CLI logic
(outputs, a reported failure, exit codes) with a cheap model injected through the API."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs.msd import get_config
from msd_jax import detector as detector_lib
from msd_jax import image_io

SIZE = get_config("tiny").data.image_size
THRESHOLDS = {"image": 0.8, "pixel": 0.8}


def _brightness_model(calls):
  """Fake model: map = brightness of the red channel in [0, 1]; score = its max; the
  reconstruction is the input. Records the batch shapes it is called with."""

  def predict_fn(images):
    calls.append(images.shape)
    maps = (images[..., 0] + 1.0) / 2.0
    return {"maps": maps, "scores": maps.reshape(len(maps), -1).max(1),
            "reconstructions": images}

  return predict_fn


def _slab(rng, h, w, defect=False):
  image = rng.integers(40, 120, (h, w, 3), dtype=np.uint8)
  if defect:
    image[h // 3:h // 3 + 40, w // 2:w // 2 + 40] = 250
  return image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  rng = np.random.default_rng(0)
  d = tmp_path_factory.mktemp("inputs")
  Image.fromarray(_slab(rng, 900, 900, defect=True)).save(d / "slab900.jpg", quality=95)
  Image.fromarray(_slab(rng, 256, 256)[..., 0]).save(d / "gray256.png")
  rgba = np.concatenate([_slab(rng, 100, 140), np.full((100, 140, 1), 128, np.uint8)], axis=2)
  Image.fromarray(rgba, mode="RGBA").save(d / "rgba.png")
  Image.fromarray((_slab(rng, 64, 48)[..., 1].astype(np.uint16) * 257)).save(d / "deep16.png")
  (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
  (d / "notes.txt").write_text("not an image")
  return d


def test_read_image_modes(folder):
  jpeg = image_io.read_image(folder / "slab900.jpg")
  assert jpeg.shape == (900, 900, 3) and jpeg.dtype == np.uint8
  gray = image_io.read_image(folder / "gray256.png")
  assert gray.shape == (256, 256, 3)
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  rgba = image_io.read_image(folder / "rgba.png")
  assert rgba.shape == (100, 140, 3)
  np.testing.assert_array_equal(rgba, np.asarray(Image.open(folder / "rgba.png"))[..., :3])
  deep = image_io.read_image(folder / "deep16.png")
  raw = np.asarray(Image.open(folder / "deep16.png"))
  assert raw.dtype == np.uint16 and deep.shape == (64, 48, 3)
  np.testing.assert_array_equal(deep[..., 0], np.rint(raw / 257.0).astype(np.uint8))


def test_read_image_errors_name_the_file(folder, tmp_path):
  with pytest.raises(image_io.ImageReadError, match="corrupt.png"):
    image_io.read_image(folder / "corrupt.png")
  with pytest.raises(image_io.ImageReadError, match="missing.png: no such file"):
    image_io.read_image(tmp_path / "missing.png")
  truncated = tmp_path / "truncated.jpg"
  buf = io.BytesIO()
  Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(buf, format="JPEG")
  truncated.write_bytes(buf.getvalue()[:200])
  with pytest.raises(image_io.ImageReadError, match="truncated.jpg"):
    image_io.read_image(truncated)


def test_tiled_900_map_equals_untiled():
  """A 900x900 image is tiled; with a per-pixel model the stitched map equals the map of the
  whole image exactly off the overlaps and to float32 rounding on them."""
  calls = []
  det = detector_lib.Detector(_brightness_model(calls), SIZE, THRESHOLDS, batch_size=4)
  image = _slab(np.random.default_rng(1), 900, 900, defect=True)
  (result,) = det.predict([image])
  assert all(shape == (4, SIZE, SIZE, 3) for shape in calls)  # fixed batch shape
  assert len(calls) > 100  # it really was tiled
  expected = (detector_lib.to_model_range(image)[..., 0] + 1.0) / 2.0
  grid = detector_lib.tiling.make_grid(900, 900, SIZE, det.min_overlap)
  overlap = grid.overlap_mask()
  np.testing.assert_array_equal(result.anomaly_map[~overlap], expected[~overlap])
  np.testing.assert_allclose(result.anomaly_map, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(result.reconstruction, image)
  assert result.is_defective and result.score == pytest.approx(expected.max())
  np.testing.assert_array_equal(result.mask, expected >= THRESHOLDS["pixel"])


def test_scale_resamples_and_returns_full_resolution():
  det = detector_lib.Detector(_brightness_model([]), SIZE, THRESHOLDS, scale=0.25)
  image = _slab(np.random.default_rng(2), 200, 120)
  (result,) = det.predict([image])
  assert result.anomaly_map.shape == (200, 120) and result.reconstruction.shape == (200, 120, 3)
  assert not result.is_defective
  assert np.abs(result.reconstruction.astype(int) - image.astype(int)).mean() < 40


def test_fit_resizes_whole_image_to_one_tile():
  calls = []
  det = detector_lib.Detector(_brightness_model(calls), SIZE, THRESHOLDS, batch_size=2,
                              scale="fit")
  (result,) = det.predict([_slab(np.random.default_rng(4), 300, 180, defect=True)])
  assert calls == [(2, SIZE, SIZE, 3)]  # one tile, padded to the batch
  assert result.anomaly_map.shape == (300, 180) and result.is_defective
  assert result.mask[300 // 3 + 20, 90 + 20] and not result.mask[10, 10]


def test_detect_folder(folder, tmp_path):
  out = tmp_path / "out"
  log = io.StringIO()
  det = detector_lib.Detector(_brightness_model([]), SIZE, THRESHOLDS, batch_size=8)
  code = detector_lib.detect_inputs(det, [str(folder)], str(out), stream=log)
  assert code == 1
  lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  results = [r for r in lines if "score" in r]
  failures = [r for r in lines if "error" in r]
  assert len(results) == 4 and len(failures) == 1
  assert failures[0]["path"].endswith("corrupt.png") and "corrupt.png" in failures[0]["error"]
  text = log.getvalue()
  assert "1 failed" in text and "corrupt.png" in text and "ETA" in text
  assert "5/5" in text
  verdicts = {os.path.basename(r["path"]): r["defective"] for r in results}
  assert verdicts == {"slab900.jpg": True, "gray256.png": False, "rgba.png": False,
                      "deep16.png": False}
  for r in results:
    mask = np.asarray(Image.open(out / r["mask"]))
    overlay = np.asarray(Image.open(out / r["overlay"]))
    assert mask.shape == (r["height"], r["width"]) and set(np.unique(mask)) <= {0, 255}
    assert overlay.shape == (r["height"], r["width"], 3)
    assert r["defect_area_fraction"] == pytest.approx((mask > 0).mean())
  big = np.asarray(Image.open(out / "slab900_mask.png")) > 0
  assert big[900 // 3 + 20, 450 + 20] and not big[50, 50]


def test_exit_codes_clean_and_empty(folder, tmp_path):
  det = detector_lib.Detector(_brightness_model([]), SIZE, THRESHOLDS)
  log = io.StringIO()
  assert detector_lib.detect_inputs(det, [str(folder / "rgba.png")], str(tmp_path / "a"),
                                    stream=log) == 0
  empty = tmp_path / "empty"
  empty.mkdir()
  assert detector_lib.detect_inputs(det, [str(empty)], str(tmp_path / "b"), stream=log) == 2
  assert "no images found" in log.getvalue()


def test_duplicate_stems_do_not_overwrite(tmp_path):
  rng = np.random.default_rng(3)
  for sub in ("a", "b"):
    (tmp_path / sub).mkdir()
    Image.fromarray(_slab(rng, 40, 40)).save(tmp_path / sub / "same.png")
  det = detector_lib.Detector(_brightness_model([]), SIZE, THRESHOLDS)
  code = detector_lib.detect_inputs(det, [str(tmp_path / "a"), str(tmp_path / "b")],
                                    str(tmp_path / "out"), stream=io.StringIO())
  assert code == 0
  assert (tmp_path / "out" / "same_mask.png").exists()
  assert (tmp_path / "out" / "same-1_mask.png").exists()
