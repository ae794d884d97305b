"""Train MSD: `python train.py --config=configs/msd.py:demo --workdir=workdirs/demo`."""
from absl import app, flags
from ml_collections import config_flags

from msd_jax import parallel
from msd_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/msd.py", "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and data.", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-host; else JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
