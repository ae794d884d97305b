"""Pure train and eval steps, and their jitted, sharded forms.

A loss function has the signature `loss_fn(params, batch, rng) -> dict` of scalar terms with
the total under 'loss'. Frozen leaves are wrapped in `stop_gradient` before the loss sees
them, so no backward pass is spent on them; the optimiser zeroes their (zero) updates too.
A step whose loss terms or gradient norm are not finite returns the input state unchanged;
the loop then stops and names the term (`check_finite`).
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from msd_jax import parallel
from msd_jax.training.optim import TRAINED
from msd_jax.training.state import TrainState


class NonFiniteLossError(FloatingPointError):
  """Raised by the loop when a step produced a non-finite loss term."""


def stop_frozen_gradients(params, labels):
  return jax.tree.map(
      lambda p, label: p if label == TRAINED else jax.lax.stop_gradient(p), params, labels)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, labels,
                    lr_schedule: Optional[optax.Schedule] = None, ema_decay: float = 0.0):
  """Pure `train_step(state, batch) -> (state, metrics)`."""

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)

    def objective(params):
      terms = loss_fn(stop_frozen_gradients(params, labels), batch, rng)
      return terms["loss"], terms

    (_, terms), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = jax.tree.map(
          lambda e, p, label: e + (1.0 - ema_decay) * (p - e) if label == TRAINED else e,
          ema, params, labels)
    grad_norm = optax.global_norm(grads)
    finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in terms.values()] +
                               [jnp.isfinite(grad_norm)]))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
    metrics = dict(terms, grad_norm=grad_norm)
    if lr_schedule is not None:
      metrics["learning_rate"] = lr_schedule(state.step)
    return new_state, metrics

  return train_step


def state_shardings(abstract_state, mesh, fsdp_min_size: int = 2**14):
  """Params, optimiser moments and EMA share the fsdp rule (it depends only on shape)."""
  return parallel.param_shardings(abstract_state, mesh, fsdp_min_size)


def jit_train_step(train_step, mesh, shardings):
  """jit with explicit in/out shardings; the input state is donated."""
  return jax.jit(
      train_step,
      in_shardings=(shardings, parallel.batch_sharding(mesh)),
      out_shardings=(shardings, parallel.replicated(mesh)),
      donate_argnums=(0,))


def jit_eval_step(eval_fn, mesh, params_shardings, out_batch_axis: bool = True):
  """jit `eval_fn(params, batch, rng)`; outputs keep the batch split unless told otherwise."""
  out = parallel.batch_sharding(mesh) if out_batch_axis else parallel.replicated(mesh)
  return jax.jit(
      eval_fn,
      in_shardings=(params_shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
      out_shardings=out)


def check_finite(metrics, step: int):
  """Host-side: raise NonFiniteLossError naming the step and the first non-finite term."""
  bad = [k for k, v in metrics.items() if not jnp.isfinite(jnp.asarray(v)).all()]
  if bad:
    terms = [k for k in bad if k != "grad_norm"] or bad
    raise NonFiniteLossError(
        f"non-finite {terms[0]} at step {step} (non-finite terms: {', '.join(bad)}); "
        "parameters of the last good step kept, run stopped")
