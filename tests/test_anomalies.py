"""Synthetic anomalies for restoration training, its eps target, the scoring reference and the
perceptual terms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.msd import get_config
from msd_jax import anomalies
from msd_jax.diffusion import schedule as schedule_lib
from msd_jax.models import msd as msd_lib


def _images(batch=16, size=32):
  return jax.random.uniform(jax.random.PRNGKey(0), (batch, size, size, 3), minval=-1, maxval=1)


def test_corrupt_changes_only_masked_pixels():
  x = _images()
  bad, masks = jax.jit(anomalies.corrupt, static_argnums=2)(jax.random.PRNGKey(1), x, 1.0)
  masks = np.asarray(masks)
  assert set(np.unique(masks)) <= {0.0, 1.0}
  coverage = masks.mean(axis=(1, 2))
  assert (coverage > 0).all() and (coverage < 0.5).all(), coverage
  changed = np.abs(np.asarray(bad) - np.asarray(x)).max(-1) > 1e-6
  assert not (changed & (masks == 0)).any()  # nothing outside the masks
  assert changed.sum() > 0.5 * (masks > 0).sum()  # most masked pixels differ
  assert np.abs(np.asarray(bad)).max() <= 1.0


def test_corrupt_probability():
  x = _images(batch=64)
  same, masks = anomalies.corrupt(jax.random.PRNGKey(2), x, 0.0)
  np.testing.assert_array_equal(same, x)
  assert float(jnp.max(masks)) == 0.0
  _, masks = anomalies.corrupt(jax.random.PRNGKey(3), x, 0.5)
  hit = float(jnp.mean(jnp.max(masks, axis=(1, 2)) > 0))
  assert 0.25 < hit < 0.75, hit


def test_restoration_eps_leads_back_to_clean_latent():
  schedule = schedule_lib.make_schedule()
  k = jax.random.split(jax.random.PRNGKey(4), 3)
  z0, z0_bad, noise = (jax.random.normal(kk, (4, 8, 8, 4)) for kk in k)
  t = jnp.array([100, 400, 700, 999])
  restored = jnp.array([True, False, True, False])
  z_t = schedule_lib.q_sample(schedule, z0_bad, t, noise)
  eps = msd_lib.restoration_eps(schedule, z0, z_t, t, noise, restored)
  back = schedule_lib.x0_from_eps(schedule, z_t, t, eps)
  np.testing.assert_allclose(back[restored], z0[restored], atol=2e-4)
  np.testing.assert_array_equal(eps[~restored], noise[~restored])


def test_scoring_reference_is_autoencoder_reconstruction():
  config = get_config("tiny")
  model = msd_lib.MSD(config)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, s.dtype), params)
  x = _images(batch=2, size=config.data.image_size)
  ref = model.scoring_reference(params, x)
  np.testing.assert_allclose(ref, jnp.clip(model.decode(params, model.encode(params, x)), -1, 1))
  assert float(jnp.abs(ref - x).max()) > 0.1
  config.unlock()
  config.model.scorer.reference = "input"
  np.testing.assert_array_equal(msd_lib.MSD(config).scoring_reference(params, x), x)
  del config.model.scorer["reference"]  # a config saved before the option: the input
  np.testing.assert_array_equal(msd_lib.MSD(config).scoring_reference(params, x), x)


def test_area_fraction_averages_each_latent_cell():
  masks = np.zeros((1, 8, 8), np.float32)
  masks[0, :2, :2] = 1.0  # one whole 2 x 2 cell of a 4 x 4 latent
  masks[0, 2, 4] = 1.0  # a quarter of another
  frac = np.asarray(msd_lib._area_fraction(jnp.asarray(masks), (4, 4)))
  want = np.zeros((1, 4, 4))
  want[0, 0, 0], want[0, 1, 2] = 1.0, 0.25
  np.testing.assert_array_equal(frac, want)


@pytest.fixture(scope="module")
def tiny_msd():
  from tests.test_parallel import _tiny_msd
  return _tiny_msd()


def test_restore_weight_raises_the_loss_of_corrupted_images(tiny_msd):
  config, model, params, batches = tiny_msd

  @jax.jit
  def losses(params, batch):
    loss = lambda w: model.msd_loss(params, batch, jax.random.PRNGKey(5), kd_weight=0.0,
                                    restore_prob=1.0, restore_min_t=10, restore_weight=w)
    return loss(0.0)["diffusion"], loss(10.0)["diffusion"]

  plain, weighted = map(float, losses(params, batches[0]))
  assert weighted > 1.05 * plain


def test_perceptual_weight_adds_the_scorer_distance_of_the_decoded_prediction(tiny_msd, fast_compile):
  config, model, params, batches = tiny_msd
  batch = {k: v[:2] for k, v in batches[0].items()}
  rng = jax.random.PRNGKey(3)

  @jax.jit
  def terms(params):
    msd = lambda p, w: model.msd_loss(p, batch, rng, kd_weight=1.0, perceptual_weight=w)
    vae = lambda w: model.vae_loss(params, batch, rng, kl_weight=1e-6, perceptual_weight=w)
    grad = jax.grad(lambda p: msd(p, 1.0)["perceptual"])(params)
    return (msd(params, 0.0), msd(params, 0.5)), (vae(0.0), vae(0.5)), grad

  *pairs, grad = terms(params)
  for plain, with_term in pairs:
    assert "perceptual" not in plain and float(with_term["perceptual"]) > 0
    np.testing.assert_allclose(float(with_term["loss"]),
                               float(plain["loss"]) + 0.5 * float(with_term["perceptual"]), rtol=1e-5)
  # The term reaches the UNet through the decoded prediction.
  assert float(jnp.abs(grad["unet"]["conv_out"]["kernel"]).max()) > 0
