"""Two processes joined by `jax.distributed.initialize` on 127.0.0.1 train 2 steps and agree.

Each process owns half of the devices and feeds only its own rows of every batch; the losses
must match each other and a single-process run on the same global batches.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH, NUM_STEPS = 8, 2


def _main(process_id, num_processes, port):
  import jax
  if num_processes > 1:
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                      JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process_id),
                      JAX_INITIALIZATION_TIMEOUT="60")
  sys.path.insert(0, ROOT)
  import flax.linen as nn
  import jax.numpy as jnp
  import ml_collections
  from configs.msd import get_config
  from msd_jax import parallel
  from msd_jax.training import optim, state as state_lib, steps

  assert parallel.initialize_distributed() == (num_processes > 1)
  assert jax.process_count() == num_processes
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  parallel.check_batch_size(GLOBAL_BATCH, mesh)
  model = nn.Sequential([nn.Dense(16), jnp.tanh, nn.Dense(3)])
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"]
  labels = optim.param_labels(params, [".*"])
  train_cfg = get_config("tiny").train
  tx = optim.make_optimizer(train_cfg, labels, train_cfg.learning_rate)

  def loss_fn(p, batch, rng):
    del rng
    return {"loss": jnp.mean((model.apply({"params": p}, batch["x"]) - batch["y"]) ** 2)}

  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(1))
  shardings = steps.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  step = steps.jit_train_step(steps.make_train_step(loss_fn, tx, labels), mesh, shardings)
  rows = GLOBAL_BATCH // num_processes
  losses = []
  for i in range(NUM_STEPS):
    x = np.random.default_rng(i).normal(size=(GLOBAL_BATCH, 5)).astype(np.float32)
    local = slice(process_id * rows, (process_id + 1) * rows)
    batch = parallel.shard_batch({"x": x[local], "y": np.cos(x[local, :3])}, mesh)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  print("LOSSES", json.dumps(losses), flush=True)
  if num_processes > 1:
    jax.distributed.shutdown()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(process_id, num_processes, port, devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), str(process_id), str(num_processes), str(port)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _losses(proc):
  try:
    out, err = proc.communicate(timeout=180)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  line = [l for l in out.splitlines() if l.startswith("LOSSES")][-1]
  return np.array(json.loads(line.split(" ", 1)[1]))


def test_two_processes_agree():
  port = _free_port()
  procs = [_spawn(i, 2, port, devices=2) for i in range(2)]
  reference = _losses(_spawn(0, 1, 0, devices=4))
  a, b = (_losses(p) for p in procs)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, reference, rtol=1e-5)
  assert a[1] < a[0]


if __name__ == "__main__":
  _main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
