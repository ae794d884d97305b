"""Shared test setup: 8 host CPU devices for sharding tests and a persistent compilation cache."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

import msd_jax  # noqa: E402,F401  (its XLA:CPU flags, before the backend starts below)

_CACHE = os.environ.get("MSD_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "jax"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# Start the backend now, while XLA_FLAGS holds the device count: tests that edit the environment
# for their subprocesses must not change the devices of this process.
jax.devices()


@pytest.fixture(scope="module")
def fast_compile():
  """XLA without most optimisations, for a module: compiles 2-3x faster on tiny models."""
  prev = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", prev)
