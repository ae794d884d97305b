"""PatchCore baseline: coreset selection, nearest-neighbour distances, and a fitted detector
that finds a planted anomaly (EfficientNet-Lite0 with its pip ImageNet weights)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.msd import get_config
from msd_jax import patchcore


def test_greedy_coreset_takes_one_point_per_cluster():
  rng = np.random.default_rng(0)
  centres = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])
  points = np.concatenate([c + rng.normal(0, 0.5, (30, 2)) for c in centres]).astype(np.float32)
  chosen = np.asarray(patchcore.greedy_coreset(jnp.asarray(points), 4, jax.random.PRNGKey(3)))
  assert len(set(chosen.tolist())) == 4
  assert sorted(set(chosen // 30)) == [0, 1, 2, 3]


def test_greedy_coreset_adds_the_farthest_point_each_time():
  points = jnp.asarray(np.random.default_rng(1).normal(size=(200, 5)).astype(np.float32))
  chosen = np.asarray(patchcore.greedy_coreset(points, 12, jax.random.PRNGKey(0)))
  p = np.asarray(points)
  for k in range(1, len(chosen)):
    nearest = np.min(np.linalg.norm(p[:, None] - p[chosen[:k]][None], axis=-1), axis=1)
    assert nearest[chosen[k]] == pytest.approx(nearest.max(), rel=1e-5)


def test_nearest_distance_matches_brute_force():
  rng = np.random.default_rng(2)
  queries = rng.normal(size=(1000, 16)).astype(np.float32)
  bank = rng.normal(size=(300, 16)).astype(np.float32)
  got = np.asarray(patchcore.nearest_distance(jnp.asarray(queries), jnp.asarray(bank), chunk=256))
  want = np.min(np.linalg.norm(queries[:, None] - bank[None], axis=-1), axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _texture(rng, n, size=64):
  """Smooth random stone-like images in [-1, 1]."""
  noise = rng.normal(size=(n, size // 8, size // 8, 3))
  images = jax.image.resize(jnp.asarray(noise), (n, size, size, 3), "bicubic")
  return np.array(0.3 * jnp.tanh(images), np.float32)


def test_fitted_detector_marks_a_planted_square():
  config = get_config("tiny")
  rng = np.random.default_rng(0)
  model = patchcore.PatchCore(config.model.scorer, coreset_fraction=0.5)
  model.fit([_texture(rng, 4), _texture(rng, 4)])
  test = _texture(rng, 2)
  test[1, 24:40, 24:40] = 1.0
  maps, scores = model.predict(test)
  assert maps.shape == (2, 64, 64) and scores.shape == (2,)
  assert scores[1] > scores[0]
  peak = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
  assert 16 <= peak[0] < 48 and 16 <= peak[1] < 48


def test_run_writes_metrics_for_the_split(tmp_path):
  config = get_config("tiny")
  metrics = patchcore.run(config, str(tmp_path), split="val")
  with open(tmp_path / "patchcore" / "metrics_val.json") as f:
    saved = json.load(f)
  assert saved["image"]["auroc"] == pytest.approx(metrics["image"]["auroc"])
  assert 0.0 <= saved["image"]["auroc"] <= 1.0 and "pixel" in saved
  assert saved["setup"]["train_images"] > 0 and saved["setup"]["bank_size"] > 0
  assert os.path.isdir(tmp_path / "data")
