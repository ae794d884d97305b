"""AutoencoderKL: parity with diffusers (posterior and decode), posterior maths, SD parameter count."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs.msd import get_config
from msd_jax.convert import diffusers as convert
from msd_jax.models import vae as vae_lib

B = 2


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def cfg():
  return get_config("tiny").model.vae


@pytest.fixture(scope="module")
def converted(cfg, tmp_path_factory):
  from diffusers import AutoencoderKL
  torch.manual_seed(0)
  ref = AutoencoderKL(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                      latent_channels=cfg.latent_channels, layers_per_block=cfg.layers_per_block,
                      block_out_channels=tuple(cfg.block_out_channels), down_block_types=tuple(cfg.down_block_types),
                      up_block_types=tuple(cfg.up_block_types), norm_num_groups=cfg.norm_num_groups,
                      scaling_factor=cfg.scaling_factor).eval()
  with torch.no_grad():  # move every tensor off its default (norm scales 1, zero biases, ...)
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  src = str(tmp_path_factory.mktemp("vae_diffusers"))
  ref.save_pretrained(src)
  model, variables = convert.load_pretrained(src)
  return ref, model, variables


@pytest.fixture(scope="module")
def image(cfg):
  size = get_config("tiny").data.image_size
  return np.random.default_rng(0).uniform(-1, 1, (B, size, size, cfg.in_channels)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


def _close(ours, ref, tol=1e-4):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  err = np.abs(ours - ref).max()
  assert err <= tol * max(1.0, np.abs(ref).max()), err


def test_posterior_parity(converted, image):
  ref, model, variables = converted
  post = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, image)
  with torch.no_grad():
    ref_post = ref.encode(_nchw(image)).latent_dist
  _close(post.mean, _nhwc(ref_post.mean))
  _close(post.logvar, _nhwc(ref_post.logvar))
  assert post.mean.shape == (B, image.shape[1] // 8, image.shape[2] // 8, 4)
  np.testing.assert_allclose(post.kl(), ref_post.kl().numpy(), rtol=1e-4)


def test_with_posterior_logvar(converted, image):
  _, model, variables = converted
  params = vae_lib.with_posterior_logvar(variables["params"], -10.0)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
  post, before = encode(params, image), encode(variables["params"], image)
  np.testing.assert_allclose(post.logvar, -10.0)
  np.testing.assert_array_equal(post.mean, before.mean)  # the mean half is untouched


def test_decode_parity(converted, image):
  ref, model, variables = converted
  z = np.random.default_rng(1).standard_normal((B, image.shape[1] // 8, image.shape[2] // 8, 4)).astype(np.float32)
  ours = jax.jit(lambda v, z: model.apply(v, z, method="decode"))(variables, z)
  with torch.no_grad():
    expected = _nhwc(ref.decode(_nchw(z)).sample)
  _close(ours, expected)


def test_posterior_sample_and_mode():
  mean = jnp.full((1, 2, 2, 4), 0.5)
  post = vae_lib.DiagonalGaussian.from_moments(jnp.concatenate([mean, jnp.full_like(mean, 100.0)], -1))
  assert float(post.logvar.max()) == 20.0  # clipped
  post = vae_lib.DiagonalGaussian(mean, jnp.full_like(mean, np.log(0.25)))
  np.testing.assert_array_equal(post.mode(), mean)
  draws = jax.vmap(post.sample)(jax.random.split(jax.random.key(0), 4000))
  np.testing.assert_allclose(draws.mean(0), mean, atol=0.05)
  np.testing.assert_allclose(draws.std(0), 0.5, atol=0.05)
  assert not np.allclose(post.sample(jax.random.key(1)), post.sample(jax.random.key(2)))


def test_full_config_parameter_count():
  model = vae_lib.from_config(get_config("full").model.vae)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 83_653_863


def test_space_to_depth_round_trip():
  x = np.random.default_rng(2).standard_normal((2, 8, 12, 3)).astype(np.float32)
  packed = vae_lib.space_to_depth(x, 4)
  assert packed.shape == (2, 2, 3, 48)
  np.testing.assert_array_equal(packed[1, 1, 2], x[1, 4:8, 8:12].reshape(-1))  # one patch, row-major
  np.testing.assert_array_equal(vae_lib.depth_to_space(packed, 4), x)


def _rank_k_patch_pca(images, k):
  """numpy's rank-k PCA reconstruction of the 2 x 2 patches of (4, 16, 16, 3) images."""
  patches = vae_lib.space_to_depth(images, 2).reshape(-1, 12)
  mean = patches.mean(0)
  basis = np.linalg.svd(patches - mean, full_matrices=False)[2][:k]
  return vae_lib.depth_to_space(((patches - mean) @ basis.T @ basis + mean).reshape(4, 8, 8, 12), 2)


@pytest.mark.parametrize("latent_channels", [12, 5])
def test_patch_pca_start(latent_channels):
  """With the deep paths zeroed the autoencoder is the PCA of 2 x 2 patches: lossless with all
  12 components, else exactly numpy's rank-k PCA reconstruction."""
  model = vae_lib.AutoencoderKL(latent_channels=latent_channels, layers_per_block=1,
                                block_out_channels=(8, 8), norm_num_groups=4, patch_shortcut=True)
  rng = np.random.default_rng(3)
  images = np.tanh(rng.standard_normal((4, 16, 16, 3)).cumsum(1) * 0.3).astype(np.float32)
  params = model.init(jax.random.key(0), images[:1])["params"]
  params = vae_lib.with_patch_pca(params, images, model.downsample_factor)
  recon = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])(params, images)
  np.testing.assert_allclose(recon, _rank_k_patch_pca(images, latent_channels), atol=1e-4)
  if latent_channels == 12:
    np.testing.assert_allclose(recon, images, atol=1e-4)


def test_patch_only_autoencoder():
  """deep=False keeps only the patch code: no SD encoder / decoder parameters, the PCA start is
  the exact rank-k reconstruction, and the posterior log-variance is one learnt value per
  channel."""
  model = vae_lib.AutoencoderKL(latent_channels=5, block_out_channels=(8, 8), norm_num_groups=4,
                                patch_shortcut=True, deep=False)
  rng = np.random.default_rng(4)
  images = np.tanh(rng.standard_normal((4, 16, 16, 3)).cumsum(1) * 0.3).astype(np.float32)
  params = model.init(jax.random.key(0), images[:1])["params"]
  assert set(params) == {"patch_encoder", "patch_decoder", "patch_logvar"}
  params = vae_lib.with_posterior_logvar(vae_lib.with_patch_pca(params, images, 2), -10.0)
  recon, posterior = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
  np.testing.assert_allclose(recon, _rank_k_patch_pca(images, 5), atol=1e-4)
  assert posterior.logvar.shape == posterior.mean.shape == (4, 8, 8, 5)
  np.testing.assert_array_equal(posterior.logvar, -10.0)
  with pytest.raises(ValueError, match="needs patch_shortcut"):
    vae_lib.AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, deep=False).init(
        jax.random.key(0), images[:1])
