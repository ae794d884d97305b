"""Two processes joined by `jax.distributed.initialize` on 127.0.0.1 train 2 steps of the tiny
config's msd stage and agree.

Each process owns half of the devices and feeds only its own rows of every batch; the losses
must match. (tests/test_parallel.py checks the same loss on 8 devices against 1.)
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 2


def _main(process_id, num_processes, port):
  import jax
  jax.config.update("jax_disable_most_optimizations", True)  # compiles faster; agreement is the test
  if num_processes > 1:
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                      JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process_id),
                      JAX_INITIALIZATION_TIMEOUT="60")
  sys.path.insert(0, ROOT)
  import ml_collections
  from msd_jax import parallel
  from msd_jax.training import optim, state as state_lib, steps

  assert parallel.initialize_distributed() == (num_processes > 1)
  from tests.test_parallel import _tiny_msd  # its imports start the backend
  assert jax.process_count() == num_processes
  mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  config, model, params, batches = _tiny_msd()
  parallel.check_batch_size(len(batches[0]["image"]), mesh)
  labels = optim.param_labels(params, config.stages.msd.trainable)
  tx = optim.make_optimizer(config.train, labels, config.train.learning_rate)
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(1))
  shardings = steps.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  step = steps.jit_train_step(steps.make_train_step(model.msd_loss_from_config(), tx, labels), mesh,
                              shardings)
  losses = []
  for batch in batches[:NUM_STEPS]:
    rows = len(batch["image"]) // num_processes
    local = {k: v[process_id * rows:(process_id + 1) * rows] for k, v in batch.items()}
    state, metrics = step(state, parallel.shard_batch(local, mesh))
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
    out, err = proc.communicate(timeout=600)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  line = [l for l in out.splitlines() if l.startswith("LOSSES")][-1]
  return np.array(json.loads(line.split(" ", 1)[1]))


def test_two_processes_agree():
  port = _free_port()
  procs = [_spawn(i, 2, port, devices=2) for i in range(2)]
  a, b = (_losses(p) for p in procs)
  np.testing.assert_array_equal(a, b)
  assert np.isfinite(a).all()


if __name__ == "__main__":
  _main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
