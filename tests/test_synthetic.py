"""Synthetic stone generator: CLI output, exact masks through the StoneDD reader, determinism."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipeline import datasets, synthetic

NUM_NORMAL, NUM_DEFECT, SIZE, SEED = 20, 12, 256, 0


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.main(["--out", out, "--num_normal", str(NUM_NORMAL), "--num_defect", str(NUM_DEFECT),
                  "--size", str(SIZE), "--seed", str(SEED)])
  return out


def test_cli_writes_stonedd_layout_and_contact_sheet(generated):
  with open(os.path.join(generated, "annotations", "instances.json")) as f:
    coco = json.load(f)
  assert len(coco["images"]) == NUM_NORMAL + NUM_DEFECT
  assert [c["name"] for c in coco["categories"]] == list(datasets.STONEDD_DEFECT_TYPES)
  with Image.open(os.path.join(generated, "contact_sheet.png")) as sheet:
    assert sheet.width > 0 and sheet.height > 0


def test_reader_round_trip_gives_identical_masks(generated):
  records = datasets.validate_records(datasets.read_stonedd(generated))
  assert len(records) == NUM_NORMAL + NUM_DEFECT
  assert sum(r.label for r in records) == NUM_DEFECT
  assert {r.defect_type for r in records if r.label} == set(datasets.STONEDD_DEFECT_TYPES)
  for index, record in enumerate(records):  # file names sort in generation order
    defect_type = "" if record.defect_type == datasets.GOOD else record.defect_type
    image, mask = synthetic.make_slab(SEED, index, SIZE, defect_type)
    np.testing.assert_array_equal(datasets.load_image(record), image)
    np.testing.assert_array_equal(datasets.load_mask(record), mask.astype(np.uint8))
    assert mask.any() == bool(record.label)


@pytest.mark.parametrize("defect_type", datasets.STONEDD_DEFECT_TYPES)
def test_defect_changes_pixels_only_inside_its_mask(defect_type):
  for index in range(3):
    clean, empty = synthetic.make_slab(5, index, 128, "")
    defective, mask = synthetic.make_slab(5, index, 128, defect_type)
    assert not empty.any() and mask.any()
    diff = np.abs(defective.astype(np.int16) - clean.astype(np.int16)).max(-1)
    assert (diff[~mask] == 0).all()
    assert diff[mask].mean() > 4, f"{defect_type} barely visible: {diff[mask].mean():.2f}"


def test_deterministic_per_seed():
  a, ma = synthetic.make_slab(3, 7, 64, "gap")
  b, mb = synthetic.make_slab(3, 7, 64, "gap")
  c, _ = synthetic.make_slab(4, 7, 64, "gap")
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ma, mb)
  assert np.abs(a.astype(int) - c).mean() > 1


def test_900px_slab_has_matching_mask():
  image, mask = synthetic.make_slab(0, 1, 900, "oil_paper")
  assert image.shape == (900, 900, 3) and image.dtype == np.uint8 and mask.shape == (900, 900)
  assert 0.001 < mask.mean() < 0.2


def _runs(mask):
  flat = mask.ravel(order="F").tolist()
  runs, value, count = [], 0, 0
  for v in flat:
    if v == value:
      count += 1
    else:
      runs.append(count)
      value, count = v, 1
  return runs + [count]


@pytest.mark.parametrize("shape,first_on", [((17, 23), False), ((9, 5), True)])
def test_rle_round_trip(shape, first_on):
  rng = np.random.default_rng(0)
  mask = rng.random(shape) < 0.3
  mask[0, 0] = first_on
  mask[3:7, 2:4] = True  # a long run, needing several characters
  rle = datasets.rle_encode(mask)
  np.testing.assert_array_equal(datasets.rle_decode(rle["size"], rle["counts"]), mask)
  np.testing.assert_array_equal(datasets.rle_decode(shape, _runs(mask)), mask)
