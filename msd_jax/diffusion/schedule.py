"""Discrete-time diffusion noise schedules and the conversions between model parameterisations.

A `Schedule` holds float32 `betas`, `alphas` and `alphas_cumprod` (index t = 0..T-1), as
diffusers' schedulers do. Schedules are computed in float64 and stored in float32, so they
agree with diffusers' float32 ones to about 1e-7.
"""
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")


@flax.struct.dataclass
class Schedule:
  betas: jax.Array  # (T,)
  alphas: jax.Array  # 1 - betas
  alphas_cumprod: jax.Array  # prod_{s<=t} alphas

  @property
  def num_train_timesteps(self) -> int:
    return self.betas.shape[0]


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal's cosine schedule, betas capped at `max_beta` (diffusers' squaredcos_cap_v2)."""
  alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  t = np.arange(num_train_timesteps)
  return np.array([min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
                   for i in t])


def make_schedule(kind: str = "scaled_linear", num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012) -> Schedule:
  """`linear` (DDPM), `scaled_linear` (Stable Diffusion: linear in sqrt(beta)) or `cosine`
  (alias `squaredcos_cap_v2`; ignores beta_start/beta_end)."""
  if kind == "linear":
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
  elif kind == "scaled_linear":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
  elif kind in ("squaredcos_cap_v2", "cosine"):
    betas = _cosine_betas(num_train_timesteps)
  else:
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of {SCHEDULES}")
  alphas = 1.0 - betas
  return Schedule(jnp.asarray(betas, jnp.float32), jnp.asarray(alphas, jnp.float32),
                  jnp.asarray(np.cumprod(alphas), jnp.float32))


def from_config(diffusion_cfg) -> Schedule:
  """The schedule of `config.diffusion`."""
  return make_schedule(diffusion_cfg.beta_schedule, diffusion_cfg.num_train_timesteps, diffusion_cfg.beta_start,
                       diffusion_cfg.beta_end)


def _coeffs(schedule: Schedule, t, ndim: int):
  """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), broadcastable against a rank-`ndim` batch."""
  a = jnp.take(schedule.alphas_cumprod, jnp.asarray(t))
  a = a.reshape(a.shape + (1,) * (ndim - a.ndim))
  return jnp.sqrt(a), jnp.sqrt(1.0 - a)


def q_sample(schedule: Schedule, x0, t, noise):
  """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; `t` a scalar or (B,) integer array."""
  sa, s1a = _coeffs(schedule, t, x0.ndim)
  return sa * x0 + s1a * noise


def get_velocity(schedule: Schedule, x0, t, noise):
  """The v-prediction target v = sqrt(a_t) noise - sqrt(1 - a_t) x0."""
  sa, s1a = _coeffs(schedule, t, x0.ndim)
  return sa * noise - s1a * x0


def x0_from_eps(schedule: Schedule, x_t, t, eps):
  sa, s1a = _coeffs(schedule, t, x_t.ndim)
  return (x_t - s1a * eps) / sa


def eps_from_x0(schedule: Schedule, x_t, t, x0):
  sa, s1a = _coeffs(schedule, t, x_t.ndim)
  return (x_t - sa * x0) / s1a


def x0_from_v(schedule: Schedule, x_t, t, v):
  sa, s1a = _coeffs(schedule, t, x_t.ndim)
  return sa * x_t - s1a * v


def eps_from_v(schedule: Schedule, x_t, t, v):
  sa, s1a = _coeffs(schedule, t, x_t.ndim)
  return sa * v + s1a * x_t


def to_x0_eps(schedule: Schedule, x_t, t, model_output, prediction_type: str = "epsilon"):
  """(predicted x0, predicted eps) from a model output of the given `prediction_type`
  (`epsilon`, `v_prediction` or `sample`)."""
  if prediction_type == "epsilon":
    return x0_from_eps(schedule, x_t, t, model_output), model_output
  if prediction_type == "v_prediction":
    return x0_from_v(schedule, x_t, t, model_output), eps_from_v(schedule, x_t, t, model_output)
  if prediction_type == "sample":
    return model_output, eps_from_x0(schedule, x_t, t, model_output)
  raise ValueError(f"unknown prediction_type {prediction_type!r}; choose epsilon, v_prediction or sample")
