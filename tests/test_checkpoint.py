"""Checkpointing: exact resume across a real SIGTERM, the non-finite guard, keep-last-K + best.

The resume test runs this file as a script in subprocesses (so the signal is real): a small
Flax model trained by the library's own optimiser, state, step and `run_stage`.
"""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def toy_setup(workdir, nan_at_step=None):
  """(state, jitted train step, batches(start), checkpointer, abstract state) for a toy MLP."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import ml_collections
  from msd_jax import parallel
  from msd_jax.training import checkpoint, optim, state as state_lib, steps

  class Toy(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(16, name="encoder")(x)
      return nn.Dense(3, name="decoder")(jnp.tanh(x))

  model = Toy()
  train_cfg = ml_collections.ConfigDict(dict(
      warmup_steps=2, adam_b1=0.9, adam_b2=0.999, grad_clip_norm=1.0))
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), jax.devices()[:1])
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"]
  labels = optim.param_labels(params, ["decoder", "encoder/kernel"])
  tx = optim.make_optimizer(train_cfg, labels, 1e-2)

  def loss_fn(p, batch, rng):
    noise = 0.01 * jax.random.normal(rng, batch["y"].shape)
    err = model.apply({"params": p}, batch["x"]) - batch["y"] - noise
    return {"loss": jnp.mean(err ** 2)}

  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(1), use_ema=True)
  shardings = steps.state_shardings(state, mesh)
  train_step = steps.jit_train_step(
      steps.make_train_step(loss_fn, tx, labels, ema_decay=0.9), mesh, shardings)

  def batches(start):
    step = start
    while True:
      rng = np.random.default_rng(step)
      x = rng.normal(size=(4, 5)).astype(np.float32)
      if nan_at_step is not None and step + 1 == nan_at_step:
        x[0, 0] = np.nan
      yield parallel.shard_batch({"x": x, "y": np.sin(x[:, :3])}, mesh)
      step += 1

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "ckpt"), keep=2)
  return state, train_step, batches, ckpt, checkpoint.abstract_like(state, shardings)


def _main(workdir, num_steps, kill_at):
  """Resume from the latest checkpoint, train to num_steps; SIGTERM self after step kill_at."""
  import jax
  from msd_jax.training import loop

  state, train_step, batches, ckpt, abstract = toy_setup(workdir)
  if ckpt.latest_step() is not None:
    state, _ = ckpt.restore(abstract)
  hooks = [lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == kill_at else None]
  result = loop.run_stage("toy", state, train_step, batches, num_steps, ckpt,
                          checkpoint_every=100, hooks=hooks)
  ckpt.close()
  leaves = jax.tree_util.tree_leaves(jax.device_get(result.state))
  np.savez(os.path.join(workdir, "final.npz"), *leaves)
  print("PREEMPTED" if result.preempted else "DONE", int(result.state.step))


def _run(workdir, num_steps, kill_at=-1):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), str(workdir), str(num_steps), str(kill_at)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip().splitlines()[-1]


def _leaves(workdir):
  with np.load(os.path.join(workdir, "final.npz")) as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def test_exact_resume_after_sigterm(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  assert _run(straight, 6) == "DONE 6"
  assert _run(resumed, 6, kill_at=3) == "PREEMPTED 3"
  assert _run(resumed, 6) == "DONE 6"
  a, b = _leaves(straight), _leaves(resumed)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_planted_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
  import jax
  from msd_jax.training import loop, steps

  state, train_step, batches, ckpt, abstract = toy_setup(str(tmp_path / "nan"), nan_at_step=3)
  with pytest.raises(steps.NonFiniteLossError, match=r"non-finite loss at step 3"):
    loop.run_stage("toy", state, train_step, batches, 6, ckpt, checkpoint_every=2)
  assert ckpt.latest_step() == 2
  restored, meta = ckpt.restore(abstract)
  assert meta["step"] == 2 and meta["data_position"] == 2
  ckpt.close()

  ref_state, ref_step, ref_batches, ref_ckpt, _ = toy_setup(str(tmp_path / "ref"))
  it = ref_batches(0)
  for _ in range(2):
    ref_state, _ = ref_step(ref_state, next(it))
  ref_ckpt.close()
  for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(restored)),
                  jax.tree_util.tree_leaves(jax.device_get(ref_state))):
    np.testing.assert_array_equal(x, y)
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(jax.device_get(restored)))


def test_keeps_last_k_and_best(tmp_path):
  import jax
  from msd_jax.training import checkpoint

  state, _, _, _, abstract = toy_setup(str(tmp_path / "unused"))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "keep"), keep=2, best_metric="auroc")
  scores = {2: 0.5, 4: 0.9, 6: 0.7, 8: 0.6}
  for step in range(1, 10):
    metrics = {"auroc": scores[step]} if step in scores else None
    meta = {"step": step, "thresholds": {"image": step / 10}} if metrics else {"step": step}
    ckpt.save(step, state.replace(step=state.step + step), meta, metrics=metrics)
  ckpt.wait()
  assert ckpt.best_step() == 4
  assert sorted(ckpt.manager.all_steps()) == [4, 8, 9]
  restored, meta = ckpt.restore(abstract, step=ckpt.best_step())
  assert int(jax.device_get(restored.step)) == 4 and meta["thresholds"]["image"] == 0.4
  ckpt.close()


def test_restore_on_one_device_from_a_sharded_save(tmp_path):
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from msd_jax.training import checkpoint

  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  state = {"w": jax.device_put(np.arange(64, dtype=np.float32).reshape(8, 8),
                               NamedSharding(mesh, P("data"))),
           "step": jax.device_put(np.int32(3), NamedSharding(mesh, P()))}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "sharded"), keep=1)
  ckpt.save(3, state, {"step": 3})
  ckpt.wait()
  restored, meta = ckpt.restore_on_device(3)
  ckpt.close()
  assert meta["step"] == 3
  assert restored["w"].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
  assert int(restored["step"]) == 3


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  _main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
