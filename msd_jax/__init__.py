"""msd-jax: MSD latent-diffusion defect detection in JAX/Flax."""
from msd_jax import xla_env as _xla_env

_xla_env.configure()  # before JAX starts its CPU backend; see msd_jax/xla_env.py


def __getattr__(name):
  # `msd_jax.Detector` without importing the models on `import msd_jax`.
  if name == "Detector":
    from msd_jax.detector import Detector
    return Detector
  raise AttributeError(f"module 'msd_jax' has no attribute {name!r}")
