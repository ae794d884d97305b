"""Train state: a plain pytree that Orbax saves as is."""
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


class TrainState(struct.PyTreeNode):
  """Everything a resumed run needs besides the data position (which equals `step`).

  `rng` is raw uint32 key data (`jax.random.PRNGKey` layout) so it checkpoints as a plain
  array; per-step randomness is `fold_in(rng, step)`, which makes resume exact. `ema_params`
  is None when the EMA is off.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ema_params: Any = None


def create_train_state(params, tx, rng, use_ema: bool = False) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=rng,
      ema_params=jax.tree.map(jnp.copy, params) if use_ema else None)
