"""tf.data input pipelines handing globally sharded jax arrays to the training and eval loops.

Images are decoded (TF for PNG/JPEG/BMP/GIF, Pillow via `datasets.load_image` otherwise),
resized to `image_size` x `image_size` (bilinear, antialiased; aspect ratio is not kept) and
scaled to [-1, 1]. Masks are resized with nearest neighbour.

Training stream: epoch e visits the records in the order `argsort(stateless_uniform(seed, e))`,
epochs follow each other without a gap, and global batch s holds stream positions
[s * B, (s + 1) * B). Process p decodes only its rows [p * B / P, (p + 1) * B / P) of each global
batch. Augmentation (flip, 90-degree turn, mild brightness/contrast/saturation jitter) draws from
stateless ops seeded by (seed, position), so `start_step=s` yields exactly the batches a straight
run yields from step s on, on any number of hosts.

Evaluation stream: every record exactly once, in order (or, with `tile_size > 0`, every tile of
every record: `msd_jax.tiling` grids at native resolution, row-major, each tile resized to
`image_size`); the last global batch is padded and `valid` marks the real entries.
"""
from typing import Dict, Iterator, Optional, Sequence

import jax
import numpy as np
import tensorflow as tf

from data_pipeline.datasets import Record, defect_type_names, load_image, load_mask
from msd_jax import tiling

tf.config.set_visible_devices([], "GPU")  # TF only feeds; accelerators belong to JAX

_TF_DECODABLE = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
AUTOTUNE = tf.data.AUTOTUNE


def _reader(records: Sequence[Record]):
  """index -> uint8 [H, W, 3] tensor for records[index]."""
  paths = tf.constant([r.path for r in records])
  native = tf.constant([r.path.lower().endswith(_TF_DECODABLE) for r in records])

  def pillow(i):
    image = tf.numpy_function(lambda k: load_image(records[int(k)]), [i], tf.uint8)
    return tf.ensure_shape(image, [None, None, 3])

  def decode(i):
    image = tf.io.decode_image(tf.io.read_file(paths[i]), channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])

  return lambda i: tf.cond(native[i], lambda: decode(i), lambda: pillow(i))


def _to_unit_range(image, image_size: int):
  shape = tf.shape(image)
  image = tf.cond(
      tf.logical_and(shape[0] == image_size, shape[1] == image_size),
      lambda: tf.cast(image, tf.float32),
      lambda: tf.image.resize(image, [image_size, image_size], antialias=True))
  return tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)


def augment(image, seed, flip: bool = True, rot90: bool = True, color_jitter: float = 0.05):
  """Flip, 90-degree turn and colour jitter of a [-1, 1] square image, seeded by `seed` [2]."""
  seeds = tf.random.experimental.stateless_split(seed, 5)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, seeds[0])
  if rot90:
    image = tf.image.rot90(image, tf.random.stateless_uniform([], seeds[1], 0, 4, tf.int32))
  if color_jitter > 0:
    image = tf.image.stateless_random_brightness(image, 2 * color_jitter, seeds[2])
    image = tf.image.stateless_random_contrast(image, 1 - 2 * color_jitter, 1 + 2 * color_jitter,
                                               seeds[3])
    saturation = tf.random.stateless_uniform([], seeds[4], 1 - 2 * color_jitter,
                                             1 + 2 * color_jitter)
    gray = tf.reduce_mean(image, axis=-1, keepdims=True)
    image = gray + saturation * (image - gray)
  return tf.clip_by_value(image, -1.0, 1.0)


def _augment_kwargs(augment_config) -> Dict:
  if augment_config is None:
    return {"flip": False, "rot90": False, "color_jitter": 0.0}
  return {"flip": bool(augment_config.flip), "rot90": bool(augment_config.rot90),
          "color_jitter": float(augment_config.color_jitter)}


def _host_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} "
                     "processes")
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def train_dataset(records: Sequence[Record], *, image_size: int, global_batch_size: int,
                  seed: int, start_step: int = 0, augment_config=None, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
  """This process's infinite stream of {"image" [b, S, S, 3] f32, "index" [b] i32} batches."""
  if not records:
    raise ValueError("no training records")
  n = len(records)
  rows = _host_rows(global_batch_size, process_index, process_count)
  first = start_step * global_batch_size
  aug = _augment_kwargs(augment_config)
  read = _reader(records)

  def epoch(e):
    keys = tf.random.stateless_uniform([n], tf.stack([tf.cast(seed, tf.int64), 2 * e]))
    order = tf.argsort(keys)
    return tf.data.Dataset.from_tensor_slices(
        {"index": tf.cast(order, tf.int32), "position": e * n + tf.range(n, dtype=tf.int64)})

  def load(example):
    image = _to_unit_range(read(example["index"]), image_size)
    if any((aug["flip"], aug["rot90"], aug["color_jitter"] > 0)):
      aug_seed = tf.stack([tf.cast(seed, tf.int64), 2 * example["position"] + 1])
      image = augment(image, aug_seed, **aug)
    return {"image": image, "index": example["index"]}

  ds = tf.data.Dataset.range(first // n, np.iinfo(np.int64).max).flat_map(epoch)
  ds = ds.skip(first % n).batch(global_batch_size)
  ds = ds.map(lambda b: {k: v[rows] for k, v in b.items()}).unbatch()
  ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
  return ds.batch(rows.stop - rows.start, drop_remainder=True).prefetch(AUTOTUNE)


def eval_elements(records: Sequence[Record], global_batch_size: int, tile_size: int = 0,
                  tile_overlap: int = 0) -> Dict[str, np.ndarray]:
  """The padded evaluation stream as arrays: index, tile origin (y, x; -1 when resized), valid."""
  index, ys, xs = [], [], []
  for i, record in enumerate(records):
    if tile_size > 0:
      if record.size is None:
        raise ValueError(f"{record.path}: tiling needs Record.size (run validate_records)")
      grid = tiling.make_grid(*record.size, tile_size, tile_overlap)
      for y in grid.ys:
        for x in grid.xs:
          index.append(i), ys.append(int(y)), xs.append(int(x))
    else:
      index.append(i), ys.append(-1), xs.append(-1)
  valid = np.ones(len(index), bool)
  pad = -len(index) % global_batch_size
  return {"index": np.array(index + [0] * pad, np.int32),
          "tile_y": np.array(ys + [ys[0] if ys else -1] * pad, np.int32),
          "tile_x": np.array(xs + [xs[0] if xs else -1] * pad, np.int32),
          "valid": np.concatenate([valid, np.zeros(pad, bool)])}


def eval_dataset(records: Sequence[Record], *, image_size: int, global_batch_size: int,
                 tile_size: int = 0, tile_overlap: int = 0,
                 defect_types: Optional[Sequence[str]] = None, process_index: int = 0,
                 process_count: int = 1) -> tf.data.Dataset:
  """This process's finite stream of eval batches.

  Keys: image [b, S, S, 3] f32 in [-1, 1], mask [b, S, S] uint8 {0, 1} (zeros where
  has_mask is False), has_mask, label, defect_type (index into `defect_types`, default
  `defect_type_names(records)`: pass the vocabulary of all splits to compare across splits),
  index (into `records`), tile_y / tile_x (tile origin at native resolution, -1 when resized),
  valid (False on padding).
  """
  if not records:
    raise ValueError("no evaluation records")
  vocabulary = list(defect_types or defect_type_names(records))
  rows = _host_rows(global_batch_size, process_index, process_count)
  elements = eval_elements(records, global_batch_size, tile_size, tile_overlap)
  elements = {k: v.reshape(-1, global_batch_size)[:, rows].reshape(-1)
              for k, v in elements.items()}
  labels = tf.constant([r.label for r in records], tf.int32)
  types = tf.constant([vocabulary.index(r.defect_type) for r in records], tf.int32)
  has_mask = tf.constant([r.has_pixel_labels for r in records])
  read = _reader(records)

  def mask_of(k):
    record = records[int(k)]
    mask = load_mask(record)
    if mask is None:
      height, width = record.size or load_image(record).shape[:2]
      mask = np.zeros((height, width), np.uint8)
    return mask

  def load(example):
    i = example["index"]
    image = read(i)
    mask = tf.ensure_shape(tf.numpy_function(mask_of, [i], tf.uint8), [None, None])[..., None]
    if tile_size > 0:
      pad_h = tf.maximum(tile_size - tf.shape(image)[0], 0)
      pad_w = tf.maximum(tile_size - tf.shape(image)[1], 0)
      paddings = [[0, pad_h], [0, pad_w], [0, 0]]
      y, x = example["tile_y"], example["tile_x"]
      image = tf.pad(image, paddings, mode="SYMMETRIC")[y:y + tile_size, x:x + tile_size]
      mask = tf.pad(mask, paddings, mode="SYMMETRIC")[y:y + tile_size, x:x + tile_size]
    mask = tf.image.resize(mask, [image_size, image_size], method="nearest")[..., 0]
    return {"image": _to_unit_range(image, image_size), "mask": mask,
            "has_mask": has_mask[i], "label": labels[i], "defect_type": types[i],
            "index": tf.where(example["valid"], i, -1), "tile_y": example["tile_y"],
            "tile_x": example["tile_x"], "valid": example["valid"]}

  ds = tf.data.Dataset.from_tensor_slices(elements)
  ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
  return ds.batch(rows.stop - rows.start).prefetch(AUTOTUNE)


def _global(batch: Dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> Dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def train_iterator(records: Sequence[Record], data, *, global_batch_size: int,
                   sharding: jax.sharding.Sharding, seed: int,
                   start_step: int = 0) -> Iterator[Dict[str, jax.Array]]:
  """Training batches from `config.data` as global arrays, batch axis split by `sharding`."""
  ds = train_dataset(records, image_size=data.image_size, global_batch_size=global_batch_size,
                     seed=seed, start_step=start_step, augment_config=data.augment,
                     process_index=jax.process_index(), process_count=jax.process_count())
  for batch in ds.as_numpy_iterator():
    yield _global(batch, sharding)


def eval_iterator(records: Sequence[Record], data, *, global_batch_size: int,
                  sharding: jax.sharding.Sharding,
                  defect_types: Optional[Sequence[str]] = None) -> Iterator[Dict[str, jax.Array]]:
  """Evaluation batches (see `eval_dataset`) as global arrays sharded by `sharding`."""
  ds = eval_dataset(records, image_size=data.image_size, global_batch_size=global_batch_size,
                    tile_size=data.tile_size, tile_overlap=data.tile_overlap,
                    defect_types=defect_types, process_index=jax.process_index(),
                    process_count=jax.process_count())
  for batch in ds.as_numpy_iterator():
    yield _global(batch, sharding)
