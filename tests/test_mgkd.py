"""MGKD: L_KD, the student, context tokens, teachers and the teacher cache."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from PIL import Image
from transformers import SamConfig as HFSamConfig
from transformers import SamModel as HFSamModel

from configs.msd import get_config
from data_pipeline.synthetic import make_slab
from msd_jax.convert.efficientnet import load_efficientnet_lite0
from msd_jax.models import mgkd, sam


def _np_kd(z_s, z_t, w, alpha, beta, tau):
  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  mse = ((z_s - z_t) ** 2).mean(-1)
  lt, ls = log_softmax(z_t / tau), log_softmax(z_s / tau)
  kl = (np.exp(lt) * (lt - ls)).sum(-1)
  return alpha * (w * mse).sum() / w.sum() + beta * (w * kl).sum() / w.sum()


def test_kd_loss_matches_numpy():
  rng = np.random.RandomState(0)
  z_s, z_t = rng.randn(2, 2, 4, 4, 16).astype(np.float32) * 2
  grid = rng.uniform(size=(2, 4, 4)).astype(np.float32)
  out = mgkd.kd_loss(jnp.asarray(z_s), jnp.asarray(z_t), jnp.asarray(grid), alpha=0.7, beta=1.3, tau=2.0,
                     mask_emphasis=3.0)
  np.testing.assert_allclose(float(out["loss"]), _np_kd(z_s, z_t, 1 + 3.0 * grid, 0.7, 1.3, 2.0), rtol=1e-5)
  plain = mgkd.kd_loss(jnp.asarray(z_s), jnp.asarray(z_t), alpha=1.0, beta=0.5, tau=0.5)
  np.testing.assert_allclose(float(plain["loss"]), _np_kd(z_s, z_t, np.ones((2, 4, 4)), 1.0, 0.5, 0.5), rtol=1e-5)
  # G at latent resolution is resized to the teacher grid: a constant G weighs all locations equally.
  const = mgkd.kd_loss(jnp.asarray(z_s), jnp.asarray(z_t), jnp.full((2, 2, 2), 0.5), alpha=1.0, beta=0.5, tau=0.5)
  np.testing.assert_allclose(float(const["loss"]), float(plain["loss"]), rtol=1e-5)


def test_kd_loss_zero_when_equal():
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8)) * 3
  out = mgkd.kd_loss(z, z, jnp.ones((2, 4, 4)), alpha=1.0, beta=1.0, tau=0.5)
  assert abs(float(out["loss"])) < 1e-6 and float(out["mse"]) == 0.0


def test_student_and_context_shapes():
  config = get_config("tiny")
  model = mgkd.from_config(config, (8, 8, 32))
  z0 = jnp.ones((2, 4, 4, 4))
  (z_s, c), params = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), z0, jnp.ones((2, 4, 4))))
  assert z_s.shape == (2, 8, 8, 32)
  assert c.shape == (2, config.model.mgkd.num_context_tokens, config.model.unet.cross_attention_dim)
  assert set(params["params"]) == {"student", "context_proj"}


@pytest.fixture(scope="module")
def effnet():
  return load_efficientnet_lite0()


def _slabs(n, size):
  return np.stack([make_slab(7, i, size)[0] for i in range(n)]).astype(np.float32) / 127.5 - 1


def test_student_distils_teacher(effnet):
  """A tiny student learns EfficientNet-Lite0 stand-in embeddings of synthetic slabs (5x lower L_KD).

  The input latent is a 4-channel 8x8 average pool of the image (no trained VAE in this test).
  """
  config = get_config("tiny")
  size = 64
  images = jnp.asarray(_slabs(4, size))
  module, variables = effnet
  z_t = jax.jit(lambda v, x: mgkd.efficientnet_embedding(module, v, x))(variables, images)
  assert z_t.shape == (4, size // 8, size // 8, 40 + 112)
  pooled = images.reshape(4, size // 8, 8, size // 8, 8, 3).mean((2, 4))
  z0 = jnp.concatenate([pooled, pooled.std(-1, keepdims=True)], -1)
  grid = jnp.asarray(np.stack([mgkd.sam_amg.mask_grid(mgkd.slic_masks(np.asarray(im), 8, 10.0), (8, 8))
                               for im in images]))
  model = mgkd.from_config(config, z_t.shape[1:])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), z0, grid)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  def loss_fn(p):
    z_s, _ = model.apply(p, z0, grid)
    return mgkd.kd_loss_from_config(config, z_s, z_t, grid)["loss"]

  @jax.jit
  def step(p, o):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, o = tx.update(g, o)
    return optax.apply_updates(p, u), o, loss

  first = None
  for _ in range(200):
    params, opt, loss = step(params, opt)
    first = float(loss) if first is None else first
  final = float(jax.jit(loss_fn)(params))
  assert final * 5 <= first, (first, final)


# ----------------------------------------------------------------------------- cache


def _write_images(folder, n, size, seed=3):
  os.makedirs(folder, exist_ok=True)
  for i in range(n):
    Image.fromarray(make_slab(seed, i, size)[0]).save(os.path.join(folder, f"slab_{i}.png"))
  return sorted(os.path.join(folder, f"slab_{i}.png") for i in range(n))


def _check_cache_lifecycle(teacher, folder, out):
  paths = _write_images(folder, 3, teacher.image_size)
  first = mgkd.build_cache(teacher, paths, out, progress=False, stop_after=2)  # interrupted run
  assert first["computed"] == 2
  second = mgkd.build_cache(teacher, paths, out, progress=False)  # resumes
  assert second == {"computed": 1, "skipped": 2, "removed": 0}
  cache = mgkd.TeacherCache(out)
  emb, grid = cache.get(paths[1])
  image = mgkd.load_image(paths[1], teacher.image_size)
  expected = np.asarray(teacher.embed(jnp.asarray(image)[None]))[0]
  assert emb.shape == tuple(cache.embedding_shape) == expected.shape
  np.testing.assert_allclose(emb, expected, atol=2e-3 * np.abs(expected).max())
  assert grid.shape == teacher.latent_shape and 0 <= grid.min() and grid.max() <= 1
  np.testing.assert_allclose(grid, teacher.grid(image, teacher.embed(jnp.asarray(image)[None])
                                                if teacher.config.model.mgkd.teacher == "sam_vit_b" else None))
  # A changed file invalidates its entry only; the stale entry is removed.
  Image.fromarray(make_slab(99, 0, teacher.image_size)[0]).save(paths[0])
  with pytest.raises(KeyError, match="slab_0"):
    cache.get(paths[0])
  third = mgkd.build_cache(teacher, paths, out, progress=False)
  assert third == {"computed": 1, "skipped": 2, "removed": 1}
  assert len([n for n in os.listdir(out) if n.endswith(".npz")]) == 3
  assert cache.get(paths[0])[0].shape == expected.shape
  return paths


def _hf_tiny_sam(path):
  torch.manual_seed(0)
  hf = HFSamModel(HFSamConfig(**sam.tiny(image_size=64).to_dict()))
  with torch.no_grad():  # transformers' init leaves the vision encoder near zero
    for p in hf.parameters():
      p.add_(0.1 * torch.randn_like(p))
  hf.save_pretrained(path)
  return str(path)


def test_cache_sam_teacher(tmp_path):
  config = get_config("tiny")
  with config.unlocked():
    config.model.mgkd.teacher = "sam_vit_b"
    config.model.mgkd.mask_source = "sam"
    config.model.mgkd.sam.weights = _hf_tiny_sam(tmp_path / "sam")
    config.model.mgkd.amg.pred_iou_thresh = -1e9  # random weights: keep every stable mask
    config.model.mgkd.amg.stability_score_offset = 1e-3
  teacher = mgkd.Teacher(config)
  assert teacher.embedding_shape == (8, 8, 32)  # tiny SAM: 64 px input, patch 8
  _check_cache_lifecycle(teacher, str(tmp_path / "images"), str(tmp_path / "cache"))
  other = get_config("tiny")  # the stand-in teacher may not reuse a SAM cache folder
  with pytest.raises(ValueError, match="teacher cache made with"):
    mgkd.build_cache(mgkd.Teacher(other, efficientnet=load_efficientnet_lite0()), [], str(tmp_path / "cache"))


def test_cache_efficientnet_slic_teacher(tmp_path, effnet):
  config = get_config("tiny")
  assert (config.model.mgkd.teacher, config.model.mgkd.mask_source) == ("efficientnet_lite0", "slic")
  teacher = mgkd.Teacher(config, efficientnet=effnet)
  s = config.data.image_size
  assert teacher.embedding_shape == (s // 8, s // 8, 152)
  paths = _check_cache_lifecycle(teacher, str(tmp_path / "images"), str(tmp_path / "cache"))
  # The command line: a fresh process finds everything cached and reports it.
  out = subprocess.run(
      [sys.executable, "-m", "msd_jax.models.mgkd", "cache", "--config=configs/msd.py:tiny",
       f"--out={tmp_path / 'cache'}", f"--images={os.path.dirname(paths[0])}"],
      capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)),
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert '"skipped": 3' in out.stdout and "teacher cache: 3/3" in out.stderr
