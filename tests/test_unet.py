"""UNet2DConditionModel: parity with diffusers (with and without ControlNet residuals), SD-1.5
parameter count, the encoder API SGEN builds on, bf16 and remat."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs.msd import get_config
from msd_jax.convert import diffusers as convert
from msd_jax.models import unet as unet_lib

B, HW, L = 2, 8, 5


pytestmark = pytest.mark.usefixtures("fast_compile")


def _diffusers_kwargs(cfg):
  keys = ("in_channels", "out_channels", "layers_per_block", "block_out_channels", "down_block_types",
          "up_block_types", "cross_attention_dim", "attention_head_dim", "norm_num_groups")
  return {k: (tuple(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]) for k in keys}


@pytest.fixture(scope="module")
def cfg():
  c = get_config("tiny").model.unet
  # The parity model must exercise both block types, cross-attention to a context narrower
  # than the widths, and multi-head attention.
  assert set(c.down_block_types) == {"CrossAttnDownBlock2D", "DownBlock2D"}
  assert c.cross_attention_dim not in c.block_out_channels and c.attention_head_dim >= 2
  return c


@pytest.fixture(scope="module")
def converted(cfg, tmp_path_factory):
  from diffusers import UNet2DConditionModel
  torch.manual_seed(0)
  ref = UNet2DConditionModel(**_diffusers_kwargs(cfg), sample_size=HW).eval()
  with torch.no_grad():  # move every tensor off its default (norm scales 1, zero biases, ...)
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  src = str(tmp_path_factory.mktemp("unet_diffusers"))
  ref.save_pretrained(src)
  model, variables = convert.load_pretrained(src)
  return ref, model, variables


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((B, HW, HW, 4)).astype(np.float32)
  t = np.array([3, 777], np.int64)
  context = rng.standard_normal((B, L, 24)).astype(np.float32)
  return sample, t, context


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _close(ours, ref, tol):
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  assert ours.shape == ref.shape
  err = np.abs(ours - ref).max()
  assert err <= tol * max(1.0, np.abs(ref).max()), err


def _torch_eps(ref, sample, t, context, down=None, mid=None):
  with torch.no_grad():
    out = ref(_nchw(sample), torch.from_numpy(t), torch.from_numpy(context),
              down_block_additional_residuals=None if down is None else tuple(_nchw(d) for d in down),
              mid_block_additional_residual=None if mid is None else _nchw(mid)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def test_parity_without_residuals(converted, inputs):
  ref, model, variables = converted
  ours = jax.jit(model.apply)(variables, *inputs)
  _close(ours, _torch_eps(ref, *inputs), 1e-4)


def test_parity_with_residuals(converted, inputs, cfg):
  ref, model, variables = converted
  skips, mid = unet_lib.skip_shapes(cfg, (HW, HW))
  rng = np.random.default_rng(1)
  down = [rng.standard_normal((B,) + s).astype(np.float32) for s in skips]
  mid_res = rng.standard_normal((B,) + mid).astype(np.float32)
  ours = jax.jit(model.apply)(variables, *inputs, down, mid_res)
  expected = _torch_eps(ref, *inputs, down, mid_res)
  _close(ours, expected, 1e-4)
  # The residuals must matter, or the comparison above proves nothing about where they go.
  assert np.abs(expected - _torch_eps(ref, *inputs)).max() > 1e-2


def test_encoder_matches_skip_shapes_and_shares_param_names(converted, inputs, cfg):
  _, model, variables = converted
  encoder = unet_lib.UNetEncoder(**{f: getattr(model, f) for f in convert._UNET_FIELDS})
  enc_vars = jax.eval_shape(encoder.init, jax.random.key(0), *inputs)
  flat_enc = jax.tree_util.tree_flatten_with_path(enc_vars["params"])[0]
  flat_unet = dict(jax.tree_util.tree_flatten_with_path(variables["params"])[0])
  for path, leaf in flat_enc:
    assert path in flat_unet and flat_unet[path].shape == leaf.shape, path
  hint = jnp.ones((B, HW, HW, cfg.block_out_channels[0]))
  encode = jax.jit(lambda p, h: encoder.apply({"params": p}, *inputs, hint=h))
  mid, skips, temb = encode(variables["params"], hint)
  expected_skips, expected_mid = unet_lib.skip_shapes(cfg, (HW, HW))
  assert [s.shape[1:] for s in skips] == list(expected_skips)
  assert mid.shape[1:] == expected_mid and temb.shape == (B, 4 * cfg.block_out_channels[0])
  _, skips0, _ = encode(variables["params"], 0 * hint)
  np.testing.assert_allclose(skips[0] - skips0[0], 1.0, atol=1e-5)  # hint added right after conv_in


def test_full_config_parameter_count():
  model = unet_lib.from_config(get_config("full").model.unet)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)),
                          jnp.zeros((1, 77, 768)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 859_520_964


def test_bf16_forward_close_to_fp32(converted, inputs):
  _, model, variables = converted
  fp32 = jax.jit(model.apply)(variables, *inputs)
  bf16 = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(variables, *inputs)
  assert bf16.dtype == jnp.float32
  assert jax.tree.leaves(variables)[0].dtype == np.float32
  _close(bf16, fp32, 2e-2)


def test_remat_leaves_outputs_and_grads_unchanged(converted, inputs):
  _, model, variables = converted
  params = jax.tree.map(jnp.asarray, variables["params"])

  def loss_and_grad(m):
    def loss(p):
      eps = m.apply({"params": p}, *inputs)
      return jnp.mean(eps**2), eps
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  jaxpr = str(jax.make_jaxpr(lambda p: model.clone(remat=True).apply({"params": p}, *inputs))(params))
  assert "checkpoint" in jaxpr or "remat" in jaxpr
  (l0, eps0), g0 = loss_and_grad(model)
  (l1, eps1), g1 = loss_and_grad(model.clone(remat=True))
  # Equal up to float reassociation: the two programs are compiled differently.
  np.testing.assert_allclose(eps1, eps0, atol=2e-5)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), g1, g0)
