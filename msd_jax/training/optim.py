"""Optimiser from the config: Adam with linear warmup, global-norm clipping, frozen groups.

Parameter groups are regular expressions over '/'-joined parameter paths (`re.match`, so a
pattern is a path prefix unless it says otherwise). Leaves matched by a stage's `trainable`
patterns get Adam; the rest go through `optax.set_to_zero()` inside `optax.multi_transform`
and carry no optimiser state.
"""
import re
from typing import Sequence

import jax
import optax

TRAINED, FROZEN = "trained", "frozen"


def path_str(path) -> str:
  """'/'-joined key path ('unet/up_blocks_0/resnets_0/conv1/kernel')."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def param_labels(params, trainable: Sequence[str]):
  """Pytree of TRAINED/FROZEN labels; `trainable` is a sequence of path regexes."""
  patterns = [re.compile(p) for p in trainable]

  def label(path, _):
    name = path_str(path)
    return TRAINED if any(p.match(name) for p in patterns) else FROZEN

  return jax.tree_util.tree_map_with_path(label, params)


def learning_rate_schedule(learning_rate: float, warmup_steps: int, decay: str = "constant",
                           num_steps: int = 0) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then `decay`: constant (the
  paper) or cosine, reaching 0 at `num_steps`."""
  if decay == "cosine":
    if num_steps <= warmup_steps:
      raise ValueError(
          f"cosine decay needs num_steps ({num_steps}) > warmup_steps ({warmup_steps})")
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, num_steps, 0.0)
  if decay != "constant":
    raise ValueError(f"unknown learning-rate decay {decay!r}; use 'constant' or 'cosine'")
  if warmup_steps <= 0:
    return optax.constant_schedule(learning_rate)
  return optax.linear_schedule(0.0, learning_rate, warmup_steps)


def schedule_from_config(train_config, learning_rate: float, num_steps: int = 0) -> optax.Schedule:
  """`learning_rate_schedule` with the warmup and decay of `config.train`; `num_steps` is the
  stage's length, for a decaying schedule."""
  return learning_rate_schedule(learning_rate, train_config.warmup_steps,
                                train_config.get("lr_decay", "constant"), num_steps)


def make_optimizer(train_config, labels, learning_rate: float,
                   num_steps: int = 0) -> optax.GradientTransformation:
  """Adam (b1, b2 from the config) with clipping, applied to the TRAINED leaves of `labels`,
  on `schedule_from_config`."""
  schedule = schedule_from_config(train_config, learning_rate, num_steps)
  trained = [optax.adam(schedule, b1=train_config.adam_b1, b2=train_config.adam_b2)]
  if train_config.grad_clip_norm > 0:
    trained.insert(0, optax.clip_by_global_norm(train_config.grad_clip_norm))
  return optax.multi_transform(
      {TRAINED: optax.chain(*trained), FROZEN: optax.set_to_zero()}, labels)
