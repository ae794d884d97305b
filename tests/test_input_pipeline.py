"""tf.data pipelines: global sharded batches, deterministic order, exact resume, eval coverage."""
import jax
import numpy as np
import pytest
from PIL import Image
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs.msd import get_config
from data_pipeline import datasets, input_pipeline, synthetic
from msd_jax import tiling

SIZE = 32


@pytest.fixture(scope="module")
def data():
  return get_config("tiny").data


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  root = synthetic.generate(str(tmp_path_factory.mktemp("stone")), 11, 6, size=64, seed=0)
  return datasets.validate_records(datasets.read_stonedd(root))


@pytest.fixture(scope="module")
def normal(records):
  return [r for r in records if not r.label]


def _train(records, data, seed=0, start_step=0, steps=4, batch=4, **kw):
  ds = input_pipeline.train_dataset(records, image_size=SIZE, global_batch_size=batch, seed=seed,
                                    start_step=start_step, augment_config=data.augment, **kw)
  return list(ds.take(steps).as_numpy_iterator())


def test_global_batch_sharded_on_data_axis(normal, data):
  assert jax.device_count() == 8
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  batch = next(input_pipeline.train_iterator(normal, data, global_batch_size=16,
                                             sharding=sharding, seed=0))
  image = batch["image"]
  assert isinstance(image, jax.Array) and image.shape == (16, data.image_size,
                                                          data.image_size, 3)
  assert image.sharding.spec == P("data") and len(image.addressable_shards) == 8
  assert {s.data.shape[0] for s in image.addressable_shards} == {2}
  assert -1 <= float(image.min()) and float(image.max()) <= 1
  assert batch["index"].shape == (16,)


def test_same_seed_same_order_other_seed_differs(normal, data):
  a, b = _train(normal, data, seed=3), _train(normal, data, seed=3)
  c = _train(normal, data, seed=4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])
  assert any((x["index"] != z["index"]).any() for x, z in zip(a, c))


def test_every_epoch_visits_each_record_once(normal, data):
  n = len(normal)
  indices = np.concatenate([b["index"] for b in _train(normal, data, steps=n, batch=3)])
  for epoch in range(3):
    assert sorted(indices[epoch * n:(epoch + 1) * n]) == list(range(n))
  assert (indices[:n] != indices[n:2 * n]).any()  # reshuffled per epoch


def test_start_step_resumes_the_straight_run(normal, data):
  straight = _train(normal, data, seed=1, steps=9, batch=4)  # 11 records: crosses epochs
  resumed = _train(normal, data, seed=1, start_step=5, steps=4, batch=4)
  for x, y in zip(straight[5:], resumed):
    np.testing.assert_array_equal(x["index"], y["index"])
    np.testing.assert_array_equal(x["image"], y["image"])


def test_processes_split_each_global_batch(normal, data):
  whole = _train(normal, data, steps=3, batch=4)
  parts = [_train(normal, data, steps=3, batch=4, process_index=p, process_count=2)
           for p in range(2)]
  for step in range(3):
    for key in ("index", "image"):
      joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
      np.testing.assert_array_equal(joined, whole[step][key])


def test_augmentation_is_off_without_config(normal, data):
  plain = input_pipeline.train_dataset(normal, image_size=SIZE, global_batch_size=4, seed=0)
  batch = next(plain.as_numpy_iterator())
  for image, index in zip(batch["image"], batch["index"]):
    pixels = Image.fromarray(datasets.load_image(normal[index])).resize((SIZE, SIZE),
                                                                         Image.BILINEAR)
    reference = np.asarray(pixels, np.float32) / 127.5 - 1  # Pillow also antialiases
    np.testing.assert_allclose(image, reference, atol=0.02)
  augmented = _train(normal, data, steps=1)[0]
  np.testing.assert_array_equal(augmented["index"], batch["index"])
  assert np.abs(augmented["image"] - batch["image"]).max() > 0.1


def test_eval_yields_every_record_once_with_padding(records):
  vocab = datasets.defect_type_names(records)
  ds = input_pipeline.eval_dataset(records, image_size=SIZE, global_batch_size=5)
  batches = list(ds.as_numpy_iterator())
  valid = np.concatenate([b["valid"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert len(valid) == 20 and valid.sum() == len(records)
  assert list(index[valid]) == list(range(len(records))) and (index[~valid] == -1).all()
  for b in batches:
    for k in np.flatnonzero(b["valid"]):
      record = records[b["index"][k]]
      assert b["label"][k] == record.label and vocab[b["defect_type"][k]] == record.defect_type
      assert b["mask"][k].shape == (SIZE, SIZE) and bool(b["mask"][k].any()) == bool(record.label)


def test_eval_tiles_cover_the_image(records):
  tile, overlap = 24, 4
  some = records[:3]
  ds = input_pipeline.eval_dataset(some, image_size=tile, global_batch_size=4, tile_size=tile,
                                   tile_overlap=overlap)
  batches = list(ds.as_numpy_iterator())
  valid = np.concatenate([b["valid"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])[valid]
  index = np.concatenate([b["index"] for b in batches])[valid]
  grid = tiling.make_grid(64, 64, tile, overlap)
  assert len(images) == 3 * grid.num_tiles
  for i, record in enumerate(some):
    stitched = tiling.stitch(images[index == i], grid)
    expected = datasets.load_image(record).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(stitched, expected, atol=1e-5)
