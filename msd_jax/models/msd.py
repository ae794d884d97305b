"""The assembled MSD model: pure functions over one params pytree.

    params = {"vae": ..., "unet": ..., "sgen": ..., "mgkd": ...}

Every stage trains this same tree; `config.stages.<stage>.trainable` picks the trained leaves
(msd_jax.training.optim), so a stage's checkpoint holds everything the next stage needs.

Stage losses:
- `vae_loss`: mean |x - D(E(x) sample)| + kl_weight * KL (summed over the latent, averaged over
  the batch), as the LDM autoencoder without its adversarial term.
"""
import jax
import jax.numpy as jnp

from msd_jax.models import sgen as sgen_lib
from msd_jax.models import unet as unet_lib
from msd_jax.models import vae as vae_lib


class MSD:
  """Modules of `config.model` and the pure functions of each stage."""

  def __init__(self, config):
    self.config = config
    self.image_size = config.data.image_size
    self.vae = vae_lib.from_config(config.model.vae)
    self.unet = unet_lib.from_config(config.model.unet)
    self.sgen = sgen_lib.from_config(config.model.unet, config.model.sgen)

  @property
  def latent_size(self) -> int:
    return self.image_size // 2 ** (len(self.config.model.vae.block_out_channels) - 1)

  def init(self, rng):
    """Random params; SGEN's control encoder starts as a copy of the UNet encoder."""
    return jax.jit(self._init)(rng)

  def _init(self, rng):
    k_vae, k_unet, k_sgen = jax.random.split(rng, 3)
    image = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    latent = jnp.zeros((1, self.latent_size, self.latent_size,
                        self.config.model.unet.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    context = jnp.zeros((1, 1, self.config.model.unet.cross_attention_dim), jnp.float32)
    vae = self.vae.init(k_vae, image)["params"]
    unet = self.unet.init(k_unet, latent, t, context)["params"]
    sgen = self.sgen.init(k_sgen, image, latent, t, context)["params"]
    sgen = sgen_lib.init_control_from_unet(unet, sgen)  # jit output: buffers not shared
    return {"vae": vae, "unet": unet, "sgen": sgen}

  def vae_loss(self, params, batch, rng, kl_weight: float):
    x = batch["image"]
    x_hat, posterior = self.vae.apply({"params": params["vae"]}, x, rng)
    l1 = jnp.mean(jnp.abs(x - x_hat))
    kl = jnp.mean(posterior.kl())
    return {"loss": l1 + kl_weight * kl, "l1": l1, "kl": kl}

  def vae_reconstruct(self, params, images, rng):
    del rng
    return jnp.clip(self.vae.apply({"params": params["vae"]}, images)[0], -1.0, 1.0)
