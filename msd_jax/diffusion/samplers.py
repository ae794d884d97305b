"""DDPM and DDIM reverse steps as pure functions, and the jitted partial-noising reconstruction.

The steps follow diffusers' `DDPMScheduler.step` and `DDIMScheduler.step` (same formulas, same
`set_alpha_to_one`, `clip_sample` and prediction types), with the noise passed in explicitly.

Timesteps of `reconstruct`: DDIM with "leading" spacing started at `t_start`. With step ratio
r = ceil((t_start + 1) / num_steps) the model is called at t_start, t_start - r, ..., and each
step goes to t - r; the last one lands below 0 and so on the final alpha (1 with
`set_alpha_to_one`, else alpha_bar_0), i.e. the clean sample. This is the trajectory diffusers'
`DDIMScheduler` (leading spacing, `set_timesteps(T // r)`, `steps_offset = t_start mod r`) takes
from `t_start` whenever r divides T, e.g. DiAD's t_start = 999 with 10 steps: 999, 899, ..., 99.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from msd_jax.diffusion import schedule as schedule_lib
from msd_jax.diffusion.schedule import Schedule


def _alpha_prev(schedule: Schedule, prev_t, set_alpha_to_one: bool):
  final = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
  prev_t = jnp.asarray(prev_t)
  return jnp.where(prev_t >= 0, jnp.take(schedule.alphas_cumprod, jnp.maximum(prev_t, 0)), final)


def _bcast(a, ndim):
  return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def ddim_step(schedule: Schedule, model_output, t, prev_t, x_t, eta: float = 0.0, noise=None,
              prediction_type: str = "epsilon", clip_sample: bool = False, set_alpha_to_one: bool = False):
  """One DDIM step t -> prev_t (prev_t < 0: the final step). Returns (x_prev, predicted x0).

  `eta` > 0 adds `eta * sigma_t * noise` (then `noise` is required), sigma_t being the DDPM
  posterior standard deviation between t and prev_t.
  """
  a_t = _bcast(jnp.take(schedule.alphas_cumprod, jnp.asarray(t)), x_t.ndim)
  a_prev = _bcast(_alpha_prev(schedule, prev_t, set_alpha_to_one), x_t.ndim)
  x0, eps = schedule_lib.to_x0_eps(schedule, x_t, t, model_output, prediction_type)
  if clip_sample:
    x0 = jnp.clip(x0, -1.0, 1.0)
  variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
  std = eta * jnp.sqrt(variance)
  x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - std**2) * eps
  if eta > 0:
    if noise is None:
      raise ValueError("ddim_step with eta > 0 needs `noise`")
    x_prev = x_prev + std * noise
  return x_prev, x0


def ddpm_step(schedule: Schedule, model_output, t, x_t, noise, prev_t=None, prediction_type: str = "epsilon",
              clip_sample: bool = False, variance_type: str = "fixed_small"):
  """One ancestral DDPM step t -> prev_t (default t - 1). Returns (x_prev, predicted x0).

  The posterior mean of q(x_prev | x_t, x0) plus sqrt(variance) * noise for t > 0, variance
  `fixed_small` (the posterior variance, clipped at 1e-20) or `fixed_large` (beta_t).
  """
  prev_t = jnp.asarray(t) - 1 if prev_t is None else prev_t
  a_t = _bcast(jnp.take(schedule.alphas_cumprod, jnp.asarray(t)), x_t.ndim)
  a_prev = _bcast(_alpha_prev(schedule, prev_t, True), x_t.ndim)
  current_alpha = a_t / a_prev
  current_beta = 1.0 - current_alpha
  x0, _ = schedule_lib.to_x0_eps(schedule, x_t, t, model_output, prediction_type)
  if clip_sample:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean = (jnp.sqrt(a_prev) * current_beta * x0 + jnp.sqrt(current_alpha) * (1.0 - a_prev) * x_t) / (1.0 - a_t)
  if variance_type == "fixed_small":
    variance = jnp.maximum((1.0 - a_prev) / (1.0 - a_t) * current_beta, 1e-20)
  elif variance_type == "fixed_large":
    variance = current_beta
  else:
    raise ValueError(f"unknown variance_type {variance_type!r}; choose fixed_small or fixed_large")
  t_pos = _bcast(jnp.asarray(t) > 0, x_t.ndim)
  return mean + jnp.where(t_pos, jnp.sqrt(variance) * noise, 0.0), x0


def ddim_timesteps(t_start: int, num_steps: int) -> tuple[np.ndarray, int]:
  """(timesteps the model is called at, step ratio) for `reconstruct`; see the module docstring."""
  if num_steps < 1 or t_start < 0:
    raise ValueError(f"need num_steps >= 1 and t_start >= 0, got {num_steps}, {t_start}")
  ratio = -(-(t_start + 1) // num_steps)
  timesteps = t_start - ratio * np.arange(num_steps)
  if timesteps[-1] < 0:
    raise ValueError(f"{num_steps} DDIM steps of {ratio} do not fit below t_start={t_start}; "
                     "use fewer steps or a larger t_start")
  return timesteps, ratio


def reconstruct(denoise_fn: Callable, z0, t_start: int, num_steps: int, key, schedule: Schedule, eta: float = 0.0,
                prediction_type: str = "epsilon", clip_sample: bool = False, set_alpha_to_one: bool = False,
                noise=None):
  """Noises `z0` to `t_start` with q_sample, then runs `num_steps` DDIM steps in one `lax.scan`.

  `denoise_fn(z_t, t)` gets t as a (B,) int32 array and returns the model output
  (`prediction_type`). `t_start`, `num_steps` and `eta` are static. `noise` is the q_sample
  noise, drawn from `key` when None. Returns the reconstruction.
  """
  timesteps, ratio = ddim_timesteps(t_start, num_steps)
  noise_key, step_key = jax.random.split(key)
  if noise is None:
    noise = jax.random.normal(noise_key, z0.shape, z0.dtype)
  z = schedule_lib.q_sample(schedule, z0, t_start, noise)
  batch = z0.shape[0]

  def body(z, xs):
    t, k = xs
    out = denoise_fn(z, jnp.full((batch,), t, jnp.int32))
    noise = jax.random.normal(k, z.shape, z.dtype) if eta > 0 else None
    z, _ = ddim_step(schedule, out, t, t - ratio, z, eta, noise, prediction_type, clip_sample, set_alpha_to_one)
    return z, None

  xs = (jnp.asarray(timesteps, jnp.int32), jax.random.split(step_key, num_steps))
  z, _ = jax.lax.scan(body, z, xs)
  return z
