"""msd-jax: MSD latent-diffusion defect detection in JAX/Flax."""


def __getattr__(name):
  # `msd_jax.Detector` without importing the models on `import msd_jax`.
  if name == "Detector":
    from msd_jax.detector import Detector
    return Detector
  raise AttributeError(f"module 'msd_jax' has no attribute {name!r}")
