"""Schedules, q_sample and prediction conversions, DDPM/DDIM steps and the scanned DDIM
reconstruction, against diffusers' DDPMScheduler / DDIMScheduler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from configs.msd import get_config
from msd_jax.diffusion import samplers
from msd_jax.diffusion import schedule as schedule_lib

SHAPE = (2, 4, 4, 3)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _rand(seed, shape=SHAPE):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _denoiser(alphas_cumprod, xp):
  """The optimal eps-predictor for data ~ N(0, 0.25 I), plus a small nonlinear term, written for
  numpy (`xp=np`, diffusers' alphas) and JAX alike; t is a (B,) array."""
  def denoise(z, t):
    a = alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return xp.sqrt(1 - a) * z / (0.25 * a + 1 - a) + 0.05 * xp.tanh(z)
  return denoise


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedules_match_diffusers(kind):
  ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=kind, beta_start=0.0001, beta_end=0.02)
  ours = schedule_lib.make_schedule(kind, 1000, 0.0001, 0.02)
  np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)
  assert ours.num_train_timesteps == 1000


def test_config_schedule_is_stable_diffusion():
  ours = schedule_lib.from_config(get_config("tiny").diffusion)
  ref = DDPMScheduler(num_train_timesteps=1000, **SD)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5)


def test_q_sample_velocity_and_conversions():
  sched = schedule_lib.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  ref = DDPMScheduler(num_train_timesteps=1000, **SD)
  x0, eps, t = _rand(0), _rand(1), np.array([5, 900])
  x_t = schedule_lib.q_sample(sched, x0, t, eps)
  expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(x_t, expected, atol=1e-6)
  v = schedule_lib.get_velocity(sched, x0, t, eps)
  expected_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(v, expected_v, atol=1e-6)
  for kind, out in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
    x0_hat, eps_hat = schedule_lib.to_x0_eps(sched, x_t, t, out, kind)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-3 if kind == "epsilon" else 1e-4)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-4)


@pytest.mark.parametrize("t_start,num_steps,prediction_type,set_alpha_to_one", [
    (999, 10, "epsilon", False), (249, 10, "v_prediction", False), (249, 5, "sample", True)])
def test_ddim_reconstruction_matches_diffusers(t_start, num_steps, prediction_type, set_alpha_to_one):
  timesteps, ratio = samplers.ddim_timesteps(t_start, num_steps)
  ref = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=set_alpha_to_one,
                      steps_offset=t_start % ratio, timestep_spacing="leading", prediction_type=prediction_type, **SD)
  ref.set_timesteps(1000 // ratio)
  ref_timesteps = ref.timesteps.numpy()[-num_steps:]
  np.testing.assert_array_equal(ref_timesteps, timesteps)
  assert timesteps[0] == t_start and timesteps[-1] - ratio < 0

  z0, noise = _rand(2), _rand(3)
  z = ref.add_noise(torch.from_numpy(z0), torch.from_numpy(noise), torch.tensor([t_start]))
  denoise_np = _denoiser(ref.alphas_cumprod.numpy(), np)
  for t in ref_timesteps:
    out = torch.from_numpy(denoise_np(z.numpy(), np.full(SHAPE[0], t)).astype(np.float32))
    z = ref.step(out, int(t), z).prev_sample
  sched = schedule_lib.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  run = jax.jit(lambda z0, key, noise: samplers.reconstruct(
      _denoiser(sched.alphas_cumprod, jnp), z0, t_start, num_steps, key, sched, prediction_type=prediction_type,
      noise=noise, set_alpha_to_one=set_alpha_to_one))
  ours = run(z0, jax.random.key(0), noise)
  np.testing.assert_allclose(ours, z.numpy(), atol=1e-5)
  assert np.abs(z.numpy() - z0).max() > 1e-2  # the denoiser is not the identity on this data


def test_ddim_step_with_eta_matches_diffusers():
  ref = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, **SD)
  ref.set_timesteps(20)
  sched = schedule_lib.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  x, out, noise, t = _rand(4), _rand(5), _rand(6), 550
  expected = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=0.7, variance_noise=torch.from_numpy(noise))
  ours, x0 = samplers.ddim_step(sched, out, t, t - 1000 // 20, x, eta=0.7, noise=noise)
  np.testing.assert_allclose(ours, expected.prev_sample.numpy(), atol=1e-5)
  np.testing.assert_allclose(x0, expected.pred_original_sample.numpy(), atol=1e-5)


@pytest.mark.parametrize("t", [0, 1, 500, 999])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_diffusers(t, variance_type):
  ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, variance_type=variance_type)
  # diffusers' own float32 tables, so that the step formula alone is compared: at t=1 the
  # variance 1 - a_1/a_0 cancels catastrophically and amplifies 1e-7 table differences.
  sched = schedule_lib.Schedule(*(jnp.asarray(x.numpy()) for x in (ref.betas, ref.alphas, ref.alphas_cumprod)))
  x, out = _rand(7), _rand(8)
  noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
  expected = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), generator=torch.Generator().manual_seed(3))
  ours, x0 = jax.jit(lambda o, x, n: samplers.ddpm_step(sched, o, t, x, n, variance_type=variance_type))(
      out, x, noise.numpy())
  np.testing.assert_allclose(ours, expected.prev_sample.numpy(), atol=1e-5)
  np.testing.assert_allclose(x0, expected.pred_original_sample.numpy(), atol=1e-4)


def test_ddim_timesteps_reject_too_many_steps():
  with pytest.raises(ValueError, match="t_start=5"):
    samplers.ddim_timesteps(5, 10)
