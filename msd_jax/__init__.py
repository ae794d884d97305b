"""msd-jax: MSD latent-diffusion defect detection in JAX/Flax."""
