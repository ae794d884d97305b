"""Dataset readers, validation of bad input, splits and the summary CLI."""
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from configs.msd import get_config
from data_pipeline import datasets, synthetic
from msd_jax import tiling

MAGNETIC_TILE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                             "magnetic_tile")


def _png(path, size=(16, 16), value=128, mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  channels = (size[0], size[1], 3) if mode == "RGB" else size
  Image.fromarray(np.full(channels, value, np.uint8)).save(path)
  return path


@pytest.fixture(scope="module")
def stonedd_root(tmp_path_factory):
  return synthetic.generate(str(tmp_path_factory.mktemp("stonedd")), 16, 12, size=64, seed=1)


@pytest.fixture(scope="module")
def records(stonedd_root):
  return datasets.validate_records(datasets.read_stonedd(stonedd_root))


def _mvtec(root, with_ground_truth=True):
  _png(os.path.join(root, "train", "good", "000.png"))
  _png(os.path.join(root, "train", "good", "001.png"))
  _png(os.path.join(root, "test", "good", "000.png"))
  _png(os.path.join(root, "test", "crack", "000.png"))
  if with_ground_truth:
    mask = np.zeros((16, 16), np.uint8)
    mask[4:9, 5:7] = 255
    os.makedirs(os.path.join(root, "ground_truth", "crack"))
    Image.fromarray(mask).save(os.path.join(root, "ground_truth", "crack", "000_mask.png"))
  return str(root)


# ----------------------------------------------------------------------------- readers


def test_mvtec_reader_with_masks(tmp_path):
  records = datasets.validate_records(datasets.read_mvtec(_mvtec(tmp_path)))
  assert [r.label for r in records] == [0, 0, 1, 0]  # train/good x2, test/crack, test/good
  crack = next(r for r in records if r.label)
  assert crack.defect_type == "crack"
  mask = datasets.load_mask(crack)
  assert mask.dtype == np.uint8 and mask.sum() == 10 and mask[4:9, 5:7].all()
  good = next(r for r in records if not r.label)
  assert datasets.load_mask(good).shape == (16, 16) and not datasets.load_mask(good).any()


def test_mvtec_without_ground_truth_is_image_level_only(tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    records = datasets.read_mvtec(_mvtec(tmp_path, with_ground_truth=False))
  assert "pixel metrics will be skipped" in caplog.text
  assert all(not r.has_pixel_labels and datasets.load_mask(r) is None for r in records)
  assert sum(r.label for r in records) == 1


def test_labelme_reader_rasterises_shapes(tmp_path):
  _png(str(tmp_path / "images" / "a.png"), size=(20, 30))
  _png(str(tmp_path / "images" / "b.png"), size=(20, 30))
  shapes = [{"label": "Oil-Paper", "shape_type": "rectangle", "points": [[2, 3], [8, 10]]}]
  with open(tmp_path / "images" / "a.json", "w") as f:
    json.dump({"shapes": shapes, "imagePath": "a.png"}, f)
  records = datasets.validate_records(datasets.read_stonedd(str(tmp_path)))
  a, b = records
  assert (a.label, a.defect_type, b.label, b.defect_type) == (1, "oil_paper", 0, "good")
  mask = datasets.load_mask(a)
  assert mask.shape == (20, 30)
  assert mask[3:11, 2:9].all() and mask.sum() == 8 * 7
  assert not datasets.load_mask(b).any()


def test_coco_polygon_and_rle_masks(tmp_path):
  _png(str(tmp_path / "images" / "x.png"), size=(12, 10))
  rle_mask = np.zeros((12, 10), bool)
  rle_mask[8:11, 1:3] = True
  coco = {"images": [{"id": 1, "file_name": "x.png", "height": 12, "width": 10}],
          "categories": [{"id": 3, "name": "Chromatic Aberration"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 3, "area": 6,
               "segmentation": datasets.rle_encode(rle_mask)},
              {"id": 2, "image_id": 1, "category_id": 3, "area": 12,
               "segmentation": [[1, 1, 4, 1, 4, 3, 1, 3]]}]}
  os.makedirs(tmp_path / "annotations")
  with open(tmp_path / "annotations" / "instances.json", "w") as f:
    json.dump(coco, f)
  (record,) = datasets.validate_records(datasets.read_stonedd(str(tmp_path)))
  assert record.defect_type == "chromatic_aberration"
  mask = datasets.load_mask(record).astype(bool)
  assert (mask[8:11, 1:3]).all() and mask[1:4, 1:5].all()
  assert mask.sum() == 6 + 12


@pytest.mark.skipif(not os.path.isdir(MAGNETIC_TILE), reason="Magnetic Tile data not present")
def test_magnetic_tile_counts_and_tiles():
  records = datasets.read_magnetic_tile(MAGNETIC_TILE)
  assert sum(1 for r in records if not r.label) == 952
  per_type = {}
  for r in records:
    per_type[r.defect_type] = per_type.get(r.defect_type, 0) + 1
  assert per_type == {"good": 952, "Blowhole": 115, "Break": 85, "Crack": 57, "Fray": 32,
                      "Uneven": 103}
  objects = {}
  for r in records:
    objects.setdefault(r.object_id, []).append(r)
  assert 150 < len(objects) < 300  # about six lightings per tile
  crack = next(r for r in records if r.defect_type == "Crack")
  assert set(np.unique(datasets.load_mask(crack)).tolist()) == {0, 1}
  splits = datasets.make_splits(records, seed=0)
  owner = {}
  for name, split in splits.items():
    for r in split:
      assert owner.setdefault(r.object_id, name) == name, f"{r.object_id} in two splits"


# ----------------------------------------------------------------------------- splits


def _check_disjoint(splits):
  seen_paths, seen_objects = {}, {}
  for name, split in splits.items():
    for r in split:
      assert seen_paths.setdefault(r.path, name) == name
      assert seen_objects.setdefault(r.object_id, name) == name


def test_make_splits_properties(records):
  splits = datasets.make_splits(records, seed=0)
  _check_disjoint(splits)
  assert sum(map(len, splits.values())) == len(records)
  assert splits["train"] and not any(r.label for r in splits["train"])
  assert any(r.label for r in splits["val"]) and any(not r.label for r in splits["val"])
  assert any(r.label for r in splits["test"]) and any(not r.label for r in splits["test"])
  assert splits == datasets.make_splits(list(reversed(records)), seed=0)
  assert splits != datasets.make_splits(records, seed=1)


def test_make_splits_keeps_objects_whole():
  records = [datasets.Record(f"/x/{o}_{k}.png", int(o >= 8), "good" if o < 8 else "crack",
                             f"obj{o}") for o in range(12) for k in range(3)]
  for seed in range(5):
    splits = datasets.make_splits(records, seed=seed)
    _check_disjoint(splits)
    assert all(len(s) % 3 == 0 for s in splits.values())


def test_k_shot_leaves_val_and_test_unchanged(records):
  full = datasets.make_splits(records, seed=2)
  few = datasets.make_splits(records, seed=2, k_shot=3)
  assert len(few["train"]) == 3 and set(few["train"]) <= set(full["train"])
  assert few["val"] == full["val"] and few["test"] == full["test"]
  with pytest.raises(datasets.DataError, match="k_shot"):
    datasets.make_splits(records, seed=2, k_shot=1000)


def test_load_splits_generates_synthetic_once(tmp_path):
  data = get_config("tiny").data
  data.root = str(tmp_path / "gen")
  splits = datasets.load_splits(data)
  assert sum(map(len, splits.values())) == data.synthetic.num_normal + data.synthetic.num_defect
  assert datasets.load_splits(data) == splits  # second call reuses the folder
  data.synthetic.seed = 9
  with pytest.raises(datasets.DataError, match=str(tmp_path / "gen")):
    datasets.load_splits(data)


def test_cut_tiles_matches_the_eval_grid(records, tmp_path):
  normal = [r for r in records if not r.label][:3]
  out = str(tmp_path / "tiles")
  tiles = datasets.cut_tiles(normal, tile_size=32, min_overlap=8, out_dir=out)
  grid = tiling.make_grid(64, 64, 32, 8)
  assert len(tiles) == 3 * grid.num_tiles == 27
  assert [t.object_id for t in tiles[:3]] == [r.object_id for r in normal]  # position-major
  for t in tiles:
    assert t.size == (32, 32) and t.label == 0 and datasets.load_mask(t).sum() == 0
  source = {r.object_id: tiling.split(datasets.load_image(r), grid) for r in normal}
  for k in range(grid.num_tiles):
    for j, r in enumerate(normal):
      np.testing.assert_array_equal(datasets.load_image(tiles[3 * k + j]), source[r.object_id][k])
  # a second call (resume) rewrites nothing; other processes only list the records
  stamps = {t.path: os.path.getmtime(t.path) for t in tiles}
  assert datasets.cut_tiles(normal, 32, 8, out) == tiles
  assert {t.path: os.path.getmtime(t.path) for t in tiles} == stamps
  assert datasets.cut_tiles(normal, 32, 8, str(tmp_path / "elsewhere"), write=False) != []
  assert not os.path.exists(tmp_path / "elsewhere")
  with pytest.raises(datasets.DataError, match="defect-free"):
    datasets.cut_tiles([r for r in records if r.label][:1], 32, 8, out)


def test_summary_cli(stonedd_root, capsys):
  datasets.main(["summary", "--kind", "stonedd", "--root", stonedd_root])
  out = json.loads(capsys.readouterr().out)
  assert out["total"]["defect_free"] == 16 and out["total"]["defective"] == 12
  assert sum(out["total"]["per_defect_type"].values()) == 12
  assert sum(s["images"] for s in out["splits"].values()) == 28
  assert out["splits"]["train"]["defective"] == 0 and out["binary_masks"] is True


# ----------------------------------------------------------------------------- bad input


def _stonedd_with(tmp_path, names):
  for name in names:
    _png(str(tmp_path / "images" / name))
  coco = {"images": [{"id": i, "file_name": n, "height": 16, "width": 16}
                     for i, n in enumerate(names)] +
                    [{"id": 99, "file_name": "ghost.png", "height": 16, "width": 16}],
          "annotations": [], "categories": []}
  os.makedirs(tmp_path / "annotations")
  with open(tmp_path / "annotations" / "instances.json", "w") as f:
    json.dump(coco, f)


def test_bad_unreadable_image(tmp_path):
  root = _mvtec(tmp_path)
  bad = os.path.join(root, "train", "good", "001.png")
  with open(bad, "wb") as f:
    f.write(b"this is not an image")
  with pytest.raises(datasets.DataError, match="001.png: unreadable image"):
    datasets.validate_records(datasets.read_mvtec(root))


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_bad_truncated_image(tmp_path, ext):
  root = _mvtec(tmp_path)
  bad = os.path.join(root, "train", "good", f"002.{ext}")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(bad)
  data = open(bad, "rb").read()
  with open(bad, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(datasets.DataError, match=f"002.{ext}: truncated"):
    datasets.validate_records(datasets.read_mvtec(root))


def test_bad_missing_mask(tmp_path):
  root = _mvtec(tmp_path)
  _png(os.path.join(root, "test", "crack", "001.png"))
  with pytest.raises(datasets.DataError, match="001_mask.png: missing mask"):
    datasets.validate_records(datasets.read_mvtec(root))


def test_bad_mask_of_another_size(tmp_path):
  root = _mvtec(tmp_path)
  _png(os.path.join(root, "ground_truth", "crack", "000_mask.png"), size=(8, 16), mode="L")
  with pytest.raises(datasets.DataError, match="000_mask.png: mask is 8x16 but its image"):
    datasets.validate_records(datasets.read_mvtec(root))


def test_bad_empty_folder(tmp_path):
  for kind in ("stonedd", "mvtec", "magnetic_tile"):
    with pytest.raises(datasets.DataError, match=str(tmp_path)):
      datasets.read_dataset(kind, str(tmp_path))
  with pytest.raises(datasets.DataError, match="empty folder"):
    datasets.read_stonedd(str(tmp_path))


def test_bad_unknown_layout(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(datasets.DataError, match=f"{tmp_path}: unknown layout"):
    datasets.read_stonedd(str(tmp_path))
  with pytest.raises(datasets.DataError, match=f"{tmp_path}: unknown layout"):
    datasets.read_mvtec(str(tmp_path))


def test_bad_coco_names_missing_image(tmp_path):
  _stonedd_with(tmp_path, ["a.png"])
  with pytest.raises(datasets.DataError, match=r"instances.json: names image 'ghost.png'"):
    datasets.read_stonedd(str(tmp_path))


def test_skip_bad_logs_each_file_and_count(tmp_path, caplog):
  root = _mvtec(tmp_path)
  with open(os.path.join(root, "train", "good", "001.png"), "wb") as f:
    f.write(b"junk")
  _png(os.path.join(root, "ground_truth", "crack", "000_mask.png"), size=(8, 8), mode="L")
  with caplog.at_level(logging.WARNING):
    kept = datasets.validate_records(datasets.read_mvtec(root), skip_bad=True)
  assert len(kept) == 2
  assert "001.png: unreadable image" in caplog.text and "000_mask.png: mask is 8x8" in caplog.text
  assert "skipped 2 bad of 4 images" in caplog.text


def test_tfds_builder_reads_manual_dir(stonedd_root, records, tmp_path):
  import tensorflow_datasets as tfds
  from data_pipeline.stonedd_tfds import StoneDD
  builder = StoneDD(data_dir=str(tmp_path))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=stonedd_root))
  splits = datasets.make_splits(records, seed=0)
  by_path = {r.path: r for r in records}
  for name in datasets.SPLITS:
    examples = list(tfds.as_numpy(builder.as_dataset(split=name)))
    assert len(examples) == len(splits[name])
    for ex in examples:
      record = by_path[ex["file_name"].decode()]
      np.testing.assert_array_equal(ex["mask"][..., 0] // 255, datasets.load_mask(record))
      assert ex["label"] == record.label
