"""Checkpoints: the only module (with the converter's CLI) that touches Orbax.

One `CheckpointManager` per stage directory. Each checkpoint holds the `TrainState` and a
JSON `meta` item (stage, step, data position, and for validated steps the validation
metrics and the F1-optimal thresholds). Preservation keeps the last `keep` checkpoints plus
the best one by `best_metric` (higher is better) among those saved with validation metrics.
`StopSignal` turns SIGTERM/SIGINT into a flag the loop polls, so it can save and exit cleanly.
"""
import os
import signal
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies


class Checkpointer:
  """Save/restore `TrainState` + JSON meta under `directory`."""

  def __init__(self, directory: str, keep: int = 3, best_metric: Optional[str] = None):
    self.best_metric = best_metric
    keep_policies = [policies.LatestN(n=keep)]
    if best_metric:
      keep_policies.append(policies.BestN(
          get_metric_fn=lambda m: m[best_metric], n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep_policies), create=True,
        best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode="max")
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))

  def save(self, step: int, state, meta: dict, metrics: Optional[dict] = None):
    """Save (asynchronously) at `step`; `metrics` (validation) rank it for the best slot."""
    if step in self.manager.all_steps():
      return
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    """Step of the best validated checkpoint, or None when none carries metrics."""
    if not self.best_metric:
      return None
    scored = []
    for step in self.manager.all_steps():
      metrics = self.manager.metrics(step)
      if metrics and self.best_metric in metrics:
        scored.append((metrics[self.best_metric], step))
    return max(scored)[1] if scored else None

  def restore(self, abstract_state, step: Optional[int] = None):
    """(state, meta) at `step` (default latest); `abstract_state` carries target shardings."""
    step = self.manager.latest_step() if step is None else step
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"])

  def restore_on_device(self, step: Optional[int] = None, device=None):
    """(state, meta) at `step` onto one device, whatever mesh wrote it (evaluation, detection)."""
    step = self.manager.latest_step() if step is None else step
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    tree = ocp.StandardCheckpointer().metadata(
        os.path.join(str(self.manager.directory), str(step), "state")).item_metadata
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree,
        is_leaf=lambda m: hasattr(m, "shape"))
    return self.restore(abstract, step)

  def restore_meta(self, step: int) -> dict:
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with target shardings, for restoring onto a (possibly new) mesh."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def save_params(path: str, params):
  """Write a bare params pytree (used for converted weights)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, params, force=True)
  ckptr.wait_until_finished()


def load_params(path: str, abstract_params: Any = None):
  """Read a params pytree written by `save_params` (onto `abstract_params` shardings if given)."""
  return ocp.StandardCheckpointer().restore(path, abstract_params)


class StopSignal:
  """Context manager: SIGTERM/SIGINT set a flag instead of killing the process.

  `requested()` is collective on multi-host runs (any process signalled -> all stop at the
  same step), so every process must call it at the same points.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: Optional[int] = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.received = signum

  def __enter__(self):
    for s in self.SIGNALS:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    return False

  def requested(self) -> bool:
    flag = self.received is not None
    if jax.process_count() > 1:
      flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
    return flag
