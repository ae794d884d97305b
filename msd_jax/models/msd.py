"""The assembled MSD model: pure functions over one params pytree.

    params = {"vae": ..., "unet": ..., "sgen": ..., "mgkd": ...}

Every stage trains this same tree; `config.stages.<stage>.trainable` picks the trained leaves
(msd_jax.training.optim), so a stage's checkpoint holds everything the next stage needs.

Stage losses:
- `vae_loss`: mean |x - D(E(x) sample)| + kl_weight * KL (summed over the latent, averaged over
  the batch) + perceptual_weight * the scorer's 1 - cos between the features of x and the
  reconstruction (`scoring.feature_loss`), as the LDM autoencoder with the scorer's features in
  place of LPIPS and without its adversarial term.
- `msd_loss`: L_MSD = mean ||target - UNet(z_t, t, c, SGEN(x, z_t, t, c))||^2 + kd_weight * L_KD
  with z0 = scaling_factor * mode of E(x) (the VAE is frozen, so its posterior mean is used, as in
  LDM's cached-latent training), t uniform over [0, max_t) (default: all training timesteps;
  reconstruction only ever runs the denoiser below `diffusion.t_start`), target = eps (or v, or
  z0, after `config.diffusion.prediction_type`), c the context tokens of the MGKD student fed
  z0 * G, and L_KD against the cached teacher embedding (`batch["teacher_embedding"]`, mask grid
  `batch["grid"]`).
  With `perceptual_weight` > 0 (not in the paper) the loss adds that weight times the scorer's
  1 - cos between the features of the clean image x and the decoded predicted clean latent, for
  every drawn t: the squared latent error alone is minimised by the average of the plausible
  latents, a soft image, while the scorer compares in a feature space that marks soft texture as
  anomalous, so the reconstruction is also trained in the space it is judged in.
  With `restore_prob` > 0 (restoration training, msd_jax.anomalies; not in the paper), that
  fraction of the images gets synthetic anomalies: SGEN, the student and z_t see the corrupted
  image, the target is the eps that leads back to the clean z0, and t is drawn from
  [restore_min_t, max_t), since the first reverse steps at inference are the ones that must repair.
  The anomalies cover a small part of each image, so the squared error at each latent position is
  weighted by 1 + restore_weight * (the fraction of that position's pixels that were corrupted).

Choices where the paper is silent:
- Geometric augmentation in the msd stage: the teacher cache holds the embedding and grid of the
  un-augmented image, so the input pipeline's flip / 90-degree turn are switched off for this
  stage and `msd_loss` applies the same random flip / turn (per `config.data.augment`) jointly to
  the image, the embedding map and the grid. The teacher's channels are not rotation-equivariant,
  so a turned embedding map only approximates the teacher on the turned image; the stone textures
  are close to isotropic and L_KD is the auxiliary term.
- Mask grid at inference: the mask source (SAM or SLIC) runs only when the teacher cache is
  built, so `reconstruct` feeds the student z0 * 1 (G = 1 everywhere), the grid of an image that
  is a single mask. SLIC grids average about 0.6, so in training each image's student input is
  z0 * 1 instead of z0 * G with probability `config.stages.msd.grid_dropout`, which keeps the
  inference input in the training distribution; L_KD is always weighted by the real G.
"""
import functools

import jax
import jax.numpy as jnp

from msd_jax import anomalies, scoring
from msd_jax.diffusion import samplers
from msd_jax.diffusion import schedule as schedule_lib
from msd_jax.models import mgkd as mgkd_lib
from msd_jax.models import sam as sam_lib
from msd_jax.models import scorer as scorer_lib
from msd_jax.models import sgen as sgen_lib
from msd_jax.models import unet as unet_lib
from msd_jax.models import vae as vae_lib


def teacher_embedding_shape(config) -> tuple[int, int, int]:
  """(H_T, W_T, C_T) of the configured MGKD teacher, without loading its weights."""
  m = config.model.mgkd
  if m.teacher == "sam_vit_b":
    vision = sam_lib.get_sam_config(m.sam.model).vision_config
    side = vision.image_size // vision.patch_size
    return side, side, vision.output_channels
  module = scorer_lib.efficientnet_lite0()
  image = jax.ShapeDtypeStruct((1, config.data.image_size, config.data.image_size, 3), jnp.float32)
  shape = jax.eval_shape(
      lambda x: mgkd_lib.efficientnet_embedding(module, module.init(jax.random.PRNGKey(0), x), x),
      image).shape
  return tuple(int(s) for s in shape[1:])


def _random_flip_rot90(key, arrays, flip: bool, rot90: bool):
  """The same random horizontal flip and 90-degree turn per sample on each (B, H, W, ...) array."""
  k_flip, k_rot = jax.random.split(key)
  batch = arrays[0].shape[0]
  flips = jax.random.bernoulli(k_flip, 0.5, (batch,)) if flip else jnp.zeros((batch,), bool)
  turns = jax.random.randint(k_rot, (batch,), 0, 4) if rot90 else jnp.zeros((batch,), jnp.int32)

  def one(x, f, k):
    x = jnp.where(f, jnp.flip(x, axis=1), x)
    return jax.lax.switch(k, [lambda y, n=n: jnp.rot90(y, n, axes=(0, 1)) for n in range(4)], x)

  return [jax.vmap(one)(x, flips, turns) for x in arrays]


def _area_fraction(masks, latent_hw):
  """(B, S, S) masks -> (B, h, w): the corrupted fraction of the pixels under each latent cell."""
  b, s = masks.shape[0], masks.shape[1]
  h, w = latent_hw
  return jnp.mean(masks.astype(jnp.float32).reshape(b, h, s // h, w, s // w), axis=(2, 4))


def restoration_eps(schedule, z0, z_t, t, noise, restored):
  """eps target per sample: `noise` where not `restored`, else the eps that leads from z_t back
  to the clean z0 (x0_from_eps(z_t, t, eps) = z0)."""
  back = schedule_lib.eps_from_x0(schedule, z_t, t, z0)
  return jnp.where(restored.reshape((-1,) + (1,) * (z0.ndim - 1)), back, noise)


class MSD:
  """Modules of `config.model` and the pure functions of each stage."""

  def __init__(self, config):
    self.config = config
    self.image_size = config.data.image_size
    self.vae = vae_lib.from_config(config.model.vae)
    self.unet = unet_lib.from_config(config.model.unet)
    self.sgen = sgen_lib.from_config(config.model.unet, config.model.sgen)
    self.mgkd = mgkd_lib.from_config(config, teacher_embedding_shape(config))
    self.schedule = schedule_lib.from_config(config.diffusion)

  @functools.cached_property
  def scorer(self):
    """(module, variables) of `config.model.scorer`, built on first use (perceptual terms,
    validation)."""
    return scorer_lib.build_scorer(self.config.model.scorer)

  def with_perceptual(self, terms, weight: float, x, x_hat):
    """`terms` plus, when `weight` > 0, the scorer's feature distance of x and x_hat as
    'perceptual', added to 'loss' with that weight."""
    if weight <= 0:
      return terms
    module, variables = self.scorer
    term = scoring.feature_loss(module, variables, x, x_hat, self.config.model.scorer)
    return dict(terms, loss=terms["loss"] + weight * term, perceptual=term)

  @property
  def latent_size(self) -> int:
    return self.image_size // self.vae.downsample_factor

  def init(self, rng):
    """Random params; SGEN's control encoder starts as a copy of the UNet encoder."""
    return jax.jit(self._init)(rng)

  def _init(self, rng):
    k_vae, k_unet, k_sgen, k_mgkd = jax.random.split(rng, 4)
    image = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    latent = jnp.zeros((1, self.latent_size, self.latent_size,
                        self.config.model.unet.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    context = jnp.zeros((1, 1, self.config.model.unet.cross_attention_dim), jnp.float32)
    vae = self.vae.init(k_vae, image)["params"]
    unet = self.unet.init(k_unet, latent, t, context)["params"]
    sgen = self.sgen.init(k_sgen, image, latent, t, context, latent=latent)["params"]
    sgen = sgen_lib.init_control_from_unet(unet, sgen)  # jit output: buffers not shared
    mgkd = self.mgkd.init(k_mgkd, latent, jnp.ones(latent.shape[:3]))["params"]
    latent_scale = jnp.full((self.config.model.unet.in_channels,),
                            self.config.model.vae.scaling_factor, jnp.float32)  # per channel
    return {"vae": vae, "unet": unet, "sgen": sgen, "mgkd": mgkd, "latent_scale": latent_scale}

  # --------------------------------------------------------------------------- autoencoder

  def vae_loss(self, params, batch, rng, kl_weight: float, perceptual_weight: float = 0.0):
    x = batch["image"]
    x_hat, posterior = self.vae.apply({"params": params["vae"]}, x, rng)
    l1 = jnp.mean(jnp.abs(x - x_hat))
    kl = jnp.mean(posterior.kl())
    return self.with_perceptual({"loss": l1 + kl_weight * kl, "l1": l1, "kl": kl},
                                perceptual_weight, x, x_hat)

  def vae_reconstruct(self, params, images, rng):
    del rng
    return jnp.clip(self.vae.apply({"params": params["vae"]}, images)[0], -1.0, 1.0)

  def encode(self, params, images):
    """Scaled latents z0 = latent_scale * mode of the posterior."""
    posterior = self.vae.apply({"params": params["vae"]}, images, method="encode")
    return posterior.mode() * params["latent_scale"]

  def latent_scale_from_data(self, params, images, per_channel: bool = False):
    """LDM's `scale_by_std`: 1 / std of the unscaled latents of `images`, so that z0 has unit
    variance and the noise schedule's signal-to-noise ratios (and `t_start`) mean what they say.
    SD's 0.18215 fits SD's own VAE only; a VAE trained here has latents of another scale.
    `per_channel`: one scale per latent channel, so every channel has unit variance. For a
    principal-component patch code (model.vae.patch_shortcut) whose first channel (the patch's
    brightness) holds most of the variance, this weights the fine-texture channels in the
    diffusion loss as much as the brightness and gives them the same signal-to-noise ratio."""
    mode = self.vae.apply({"params": params["vae"]}, images, method="encode").mode()
    std = jnp.std(mode, axis=(0, 1, 2)) if per_channel else jnp.full(mode.shape[-1:], jnp.std(mode))
    return 1.0 / std

  def decode(self, params, z0):
    z = z0 / params["latent_scale"]
    return self.vae.apply({"params": params["vae"]}, z, method="decode")

  # --------------------------------------------------------------------------- MSD

  def guided_output(self, params, images, z_t, t, context, hint=None, z0=None):
    """UNet output (eps for the default prediction type) with SGEN's residuals; `hint` is SGEN's
    image-only conditioning when computed beforehand, else computed from `images` (and their
    latent `z0`, for `sgen.latent_hint`)."""
    down, mid = self.sgen.apply({"params": params["sgen"]}, images, z_t, t, context, hint, z0)
    return self.unet.apply({"params": params["unet"]}, z_t, t, context, down, mid)

  def msd_loss(self, params, batch, rng, kd_weight: float, grid_dropout: float = 0.0,
               restore_prob: float = 0.0, restore_min_t: int = 0, max_t: int = 0,
               restore_weight: float = 0.0, perceptual_weight: float = 0.0):
    x, z_t_emb, grid = batch["image"], batch["teacher_embedding"], batch["grid"]
    k_aug, k_t, k_noise, k_drop, k_bad = jax.random.split(rng, 5)
    aug = self.config.data.augment
    if aug.flip or aug.rot90:
      x, z_t_emb, grid = _random_flip_rot90(k_aug, [x, z_t_emb, grid], aug.flip, aug.rot90)
    num_t = max_t or self.schedule.num_train_timesteps
    t = jax.random.randint(k_t, (x.shape[0],), 0, num_t)
    z0 = jax.lax.stop_gradient(self.encode(params, x))
    x_in, z0_in, weight = x, z0, 1.0
    if restore_prob > 0:
      x_in, masks = anomalies.corrupt(k_bad, x, restore_prob)
      restored = jnp.max(masks, axis=(1, 2)) > 0
      z0_in = jax.lax.stop_gradient(self.encode(params, x_in))
      t = jnp.where(restored, restore_min_t + t * (num_t - restore_min_t) // num_t, t)
      weight = 1.0 + restore_weight * _area_fraction(masks, z0.shape[1:3])[..., None]
    drop = jax.random.bernoulli(k_drop, grid_dropout, (x.shape[0], 1, 1))
    z_s, context = self.mgkd.apply({"params": params["mgkd"]}, z0_in, jnp.where(drop, 1.0, grid))
    noise = jax.random.normal(k_noise, z0.shape, z0.dtype)
    z_t = schedule_lib.q_sample(self.schedule, z0_in, t, noise)
    prediction = self.guided_output(params, x_in, z_t, t, context, z0=z0_in)
    eps = noise
    if restore_prob > 0:
      eps = restoration_eps(self.schedule, z0, z_t, t, noise, restored)
    kind = self.config.diffusion.prediction_type
    if kind == "epsilon":
      target = eps
    elif kind == "v_prediction":
      target = schedule_lib.get_velocity(self.schedule, z0, t, eps)
    elif kind == "sample":
      target = z0
    else:
      raise ValueError(f"unknown prediction_type {kind!r}; choose epsilon, v_prediction or sample")
    diffusion = jnp.mean(weight * jnp.square(prediction - target))
    kd = mgkd_lib.kd_loss_from_config(self.config, z_s, z_t_emb, grid)
    terms = {"loss": diffusion + kd_weight * kd["loss"], "diffusion": diffusion,
             "kd": kd["loss"], "kd_mse": kd["mse"], "kd_kl": kd["kl"]}
    if perceptual_weight <= 0:
      return terms
    z0_hat, _ = schedule_lib.to_x0_eps(self.schedule, z_t, t, prediction, kind)
    return self.with_perceptual(terms, perceptual_weight, x, self.decode(params, z0_hat))

  def msd_loss_from_config(self):
    """`msd_loss` with the msd stage's settings (`config.stages.msd`)."""
    cfg = self.config.stages.msd
    return functools.partial(self.msd_loss, kd_weight=cfg.kd_weight, grid_dropout=cfg.grid_dropout,
                             restore_prob=cfg.restore_prob, restore_min_t=cfg.restore_min_t,
                             max_t=cfg.get("max_t", 0), restore_weight=cfg.get("restore_weight", 0.0),
                             perceptual_weight=cfg.get("perceptual_weight", 0.0))

  def scoring_reference(self, params, images):
    """What a reconstruction is compared with (`config.model.scorer.reference`): the input
    (`input`, the paper), or its autoencoder reconstruction D(E(x)) (`autoencoder`), so the
    detail the autoencoder loses on every image is lost on both sides of the comparison. Configs
    saved before the option existed meant `input`."""
    kind = self.config.model.scorer.get("reference", "input")
    if kind == "input":
      return images
    if kind == "autoencoder":
      return jnp.clip(self.decode(params, self.encode(params, images)), -1.0, 1.0)
    raise ValueError(f"unknown scorer.reference {kind!r}; choose input or autoencoder")

  def reconstruct(self, params, images, rng):
    """Encode, noise to `diffusion.t_start`, DDIM back in one scan with SGEN and student
    guidance, decode; [-1, 1] images (B, S, S, 3) -> reconstructions of the same shape."""
    d = self.config.diffusion
    z0 = self.encode(params, images)
    _, context = self.mgkd.apply({"params": params["mgkd"]}, z0, jnp.ones(z0.shape[:3], z0.dtype))
    hint = self.sgen.apply({"params": params["sgen"]}, images, z0.shape[1:3], z0,
                           method=sgen_lib.SGEN.hint)  # the image's, the same at every step
    denoise = lambda z_t, t: self.guided_output(params, images, z_t, t, context, hint)
    z0_hat = samplers.reconstruct(denoise, z0, d.t_start, d.num_inference_steps, rng, self.schedule,
                                  eta=d.eta, prediction_type=d.prediction_type,
                                  set_alpha_to_one=d.get("set_alpha_to_one", False))
    return jnp.clip(self.decode(params, z0_hat), -1.0, 1.0)
