"""PatchCore-style baseline (Roth et al., 2022) on the scorer's backbone: the reference that an
MSD model on the same data, splits, features and metrics should beat.

  python -m msd_jax.patchcore --config=configs/msd.py:demo --workdir=DIR \
      [--config.data.image_size=128] [--coreset_fraction=0.01]

No reconstruction: each position's feature vector of a test image is compared with a memory
bank of the defect-free training images' vectors, and its distance to the nearest one is the
anomaly map. Choices (the paper's where it has one):
- Features: the backbone of `model.scorer` (EfficientNet-Lite0 by default, not the paper's
  WideResNet50) at layers s4 and s8, PatchCore's mid-level pair. Each layer is averaged over
  3 x 3 neighbourhoods, upsampled (bilinear) to the first layer's grid and concatenated.
- Memory bank: a greedy k-center coreset of `coreset_fraction` of all training vectors, selected
  in a fixed random projection to 128 dimensions (the paper's 1-10% and its projection).
- Map and score: the nearest-neighbour distance, upsampled to the image, smoothed and pooled
  exactly as MSD's maps (`model.scorer.sigma`, `pool_size`), so the two differ only in how the
  map is made. The paper's re-weighting of the image score by the neighbour's neighbourhood is
  left out.
- Images: the `data` config's splits and preprocessing (`image_size`, no tiling).

Writes `DIR/patchcore/metrics.json` and prints the same table as eval.py.
"""
import functools
import json
import os
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import datasets
from data_pipeline import input_pipeline
from msd_jax import metrics as metrics_lib
from msd_jax import report
from msd_jax import scoring
from msd_jax.models import scorer as scorer_lib

LAYERS = ("s4", "s8")
PROJECTION_DIM = 128


def patch_features(module, variables, images, layers: Sequence[str] = LAYERS) -> jax.Array:
  """[B, S, S, 3] images in [-1, 1] -> [B, h, w, C]: each layer's features averaged over 3 x 3
  neighbourhoods (zero padding counted, as the paper's `AvgPool2d(3, 1, 1)`), resized to the first
  layer's h x w and concatenated over channels."""
  feats = scoring.extract_features(module, variables, images, tuple(layers))
  h, w = feats[layers[0]].shape[1:3]
  out = []
  for name in layers:
    f = feats[name].astype(jnp.float32)
    f = jax.lax.reduce_window(f, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME") / 9.0
    out.append(jax.image.resize(f, (f.shape[0], h, w, f.shape[-1]), "bilinear"))
  return jnp.concatenate(out, axis=-1)


@functools.partial(jax.jit, static_argnums=1)
def greedy_coreset(vectors: jax.Array, size: int, key: jax.Array) -> jax.Array:
  """Indices of `size` rows of `vectors` [N, C] chosen by greedy k-center selection: start at a
  random row, then repeatedly add the row farthest from every row chosen so far. Distances are
  taken in a fixed Gaussian random projection to `PROJECTION_DIM` dimensions when C is larger."""
  n, c = vectors.shape
  start_key, proj_key = jax.random.split(key)
  if c > PROJECTION_DIM:
    proj = jax.random.normal(proj_key, (c, PROJECTION_DIM)) / np.sqrt(PROJECTION_DIM)
    vectors = vectors @ proj
  first = jax.random.randint(start_key, (), 0, n)
  sq_dist = lambda i: jnp.sum(jnp.square(vectors - vectors[i]), axis=-1)

  def add(k, carry):
    chosen, nearest = carry
    pick = jnp.argmax(nearest)
    return chosen.at[k].set(pick), jnp.minimum(nearest, sq_dist(pick))

  chosen = jnp.zeros((size,), jnp.int32).at[0].set(first)
  chosen, _ = jax.lax.fori_loop(1, size, add, (chosen, sq_dist(first)))
  return chosen


@functools.partial(jax.jit, static_argnames="chunk")
def nearest_distance(queries: jax.Array, bank: jax.Array, chunk: int = 4096) -> jax.Array:
  """Euclidean distance of each row of `queries` [M, C] to its nearest row of `bank` [K, C],
  computed `chunk` queries at a time."""
  m = queries.shape[0]
  pad = -m % chunk
  bank_sq = jnp.sum(jnp.square(bank), axis=-1)

  def one(q):
    d = jnp.sum(jnp.square(q), -1)[:, None] - 2.0 * q @ bank.T + bank_sq[None]
    return jnp.sqrt(jnp.maximum(jnp.min(d, axis=-1), 0.0))

  q = jnp.pad(queries, ((0, pad), (0, 0))).reshape(-1, chunk, queries.shape[1])
  return jax.lax.map(one, q).reshape(-1)[:m]


class PatchCore:
  """Memory bank of `fit` images; `predict` gives (maps, scores) as MSD's scorer does."""

  def __init__(self, scorer_config, layers: Sequence[str] = LAYERS, coreset_fraction: float = 0.1,
               seed: int = 0):
    self.config = scorer_config
    self.module, self.variables = scorer_lib.build_scorer(scorer_config)
    self.layers = tuple(layers)
    self.coreset_fraction = coreset_fraction
    self.seed = seed
    self.bank = None
    self._features = jax.jit(lambda v, x: patch_features(self.module, v, x, self.layers))
    self._predict = jax.jit(self._maps_and_scores)

  def features(self, images) -> jax.Array:
    return self._features(self.variables, jnp.asarray(images))

  def fit(self, batches) -> "PatchCore":
    """`batches`: an iterable of [B, S, S, 3] defect-free images in [-1, 1]."""
    feats = [self.features(b) for b in batches]
    if not feats:
      raise ValueError("PatchCore.fit: no training images")
    vectors = jnp.concatenate([f.reshape(-1, f.shape[-1]) for f in feats])
    size = max(1, int(round(self.coreset_fraction * vectors.shape[0])))
    logging.info("PatchCore: memory bank of %d of %d training vectors", min(size, vectors.shape[0]),
                 vectors.shape[0])
    if size >= vectors.shape[0]:
      self.bank = vectors
    else:
      self.bank = vectors[greedy_coreset(vectors, size, jax.random.PRNGKey(self.seed))]
    return self

  def _maps_and_scores(self, variables, bank, images):
    f = patch_features(self.module, variables, images, self.layers)
    b, h, w, c = f.shape
    d = nearest_distance(f.reshape(-1, c), bank).reshape(b, h, w)
    d = jax.image.resize(d, (b, *images.shape[1:3]), "bilinear")
    maps = scoring.smooth(d, self.config.sigma)
    return maps, scoring.image_score(maps, self.config.pool_size, self.config.border_margin)

  def predict(self, images):
    """[B, S, S, 3] in [-1, 1] -> (maps [B, S, S], scores [B]), numpy."""
    if self.bank is None:
      raise ValueError("PatchCore.predict before fit")
    maps, scores = self._predict(self.variables, self.bank, jnp.asarray(images))
    return np.asarray(maps), np.asarray(scores)


def _batches(config, records):
  return input_pipeline.eval_dataset(records, image_size=config.data.image_size,
                                     global_batch_size=config.eval.batch_size).as_numpy_iterator()


def run(config, workdir: str, split: str = "test", coreset_fraction: float = 0.1,
        layers: Sequence[str] = LAYERS) -> dict:
  """Fits on the training split of `config.data`, evaluates on `split`; writes and returns the
  metrics (`workdir/patchcore/metrics.json`, or `metrics_<split>.json`)."""
  splits = datasets.load_splits(config.data, default_root=os.path.join(workdir, "data"))
  model = PatchCore(config.model.scorer, layers, coreset_fraction, seed=config.seed)
  model.fit(b["image"][b["valid"]] for b in _batches(config, splits["train"]))
  records = splits[split]
  maps, scores, masks = [], [], []
  for b in _batches(config, records):
    m, s = model.predict(b["image"])
    valid = b["valid"]
    maps.append(m[valid]), scores.append(s[valid]), masks.append(b["mask"][valid])
  has_masks = all(r.has_pixel_labels for r in records)
  metrics = metrics_lib.compute_metrics(
      np.concatenate(scores), np.array([r.label for r in records], bool),
      np.concatenate(maps) if has_masks else None,
      np.concatenate(masks).astype(bool) if has_masks else None,
      [r.defect_type for r in records])
  metrics["setup"] = {"split": split, "image_size": int(config.data.image_size),
                      "backbone": config.model.scorer.backbone, "layers": list(layers),
                      "bank_size": int(model.bank.shape[0]), "coreset_fraction": coreset_fraction,
                      "train_images": len(splits["train"])}
  out_dir = os.path.join(workdir, "patchcore")
  os.makedirs(out_dir, exist_ok=True)
  name = "metrics.json" if split == "test" else f"metrics_{split}.json"
  with open(os.path.join(out_dir, name), "w") as f:
    json.dump(metrics, f, indent=1, default=float)
  return metrics


if __name__ == "__main__":
  from absl import app, flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  _CONFIG = config_flags.DEFINE_config_file("config", "configs/msd.py:demo", "configs/msd.py:VARIANT")
  _WORKDIR = flags.DEFINE_string("workdir", None, "output folder (synthetic data: <workdir>/data)",
                                 required=True)
  _SPLIT = flags.DEFINE_enum("split", "test", ["test", "val"], "split to evaluate")
  _CORESET = flags.DEFINE_float("coreset_fraction", 0.1, "memory bank size / training vectors")
  _LAYERS = flags.DEFINE_list("layers", list(LAYERS), "scorer layers")

  def main(argv):
    del argv
    metrics = run(_CONFIG.value, _WORKDIR.value, _SPLIT.value, _CORESET.value, _LAYERS.value)
    print(json.dumps(metrics["setup"]))
    print(report.format_table({k: v for k, v in metrics.items() if k != "setup"}))

  app.run(main)
