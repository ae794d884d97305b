"""SGEN: residual shapes, zero-init identity, training signal, control-encoder init, BPNet, SFF."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.msd import get_config
from msd_jax.models import sgen, unet


pytestmark = pytest.mark.usefixtures("fast_compile")


def _inputs(config, batch=2, seed=0):
  size, ucfg = config.data.image_size, config.model.unet
  k = jax.random.split(jax.random.key(seed), 4)
  image = jax.random.uniform(k[0], (batch, size, size, 3), minval=-1., maxval=1.)
  z_t = jax.random.normal(k[1], (batch, size // 8, size // 8, ucfg.in_channels))
  t = jax.random.randint(k[2], (batch,), 0, 1000)
  context = jax.random.normal(k[3], (batch, 6, ucfg.cross_attention_dim))
  return image, z_t, t, context


def _shapes(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


@pytest.mark.parametrize("variant,switches", [
    ("tiny", {}), ("tiny", {"use_bpnet": False}), ("tiny", {"use_sff": False}),
    ("tiny", {"latent_hint": True}), ("demo", {}), ("small", {}), ("full", {}),
])
def test_residual_shapes_match_unet_skips(variant, switches):
  config = get_config(variant)
  model = sgen.from_config(config.model.unet, config.model.sgen, **switches)
  net = unet.from_config(config.model.unet)
  image, z_t, t, context = jax.eval_shape(lambda: _inputs(config, batch=1))
  key = jax.random.key(0)
  params = jax.eval_shape(lambda k, x, z, t, c: model.init(k, x, z, t, c, latent=z),
                          key, image, z_t, t, context)
  down, mid = jax.eval_shape(lambda p, x, z, t, c: model.apply(p, x, z, t, c, latent=z),
                             params, image, z_t, t, context)
  unet_params = jax.eval_shape(net.init, key, z_t, t, context)
  unet_mid, skips, _ = jax.eval_shape(
      lambda *a: net.apply(*a, method=net.encode), unet_params, z_t, t, context)
  assert _shapes(down) == _shapes(skips)
  assert mid.shape == unet_mid.shape
  assert [s[1:] for s in _shapes(down)] == list(unet.skip_shapes(config.model.unet, z_t.shape[1:3])[0])
  if switches.get("use_bpnet", True):
    assert "bpnet" in params["params"] and "controlnet_cond_embedding" not in params["params"]
  else:
    assert "controlnet_cond_embedding" in params["params"] and "bpnet" not in params["params"]
  assert ("sff" in params["params"]) == switches.get("use_sff", True)
  assert ("latent_proj" in params["params"]) == model.latent_hint


def test_latent_hint_adds_the_projected_latent_and_is_required():
  config = get_config("tiny")
  model = sgen.from_config(config.model.unet, config.model.sgen, latent_hint=True)
  plain = sgen.from_config(config.model.unet, config.model.sgen)
  image, z_t, t, context = _inputs(config)
  params = model.init(jax.random.key(0), image, z_t, t, context, latent=z_t)
  hint = lambda m, p, latent=None: m.apply(p, image, z_t.shape[1:3], latent, method=sgen.SGEN.hint)
  without = {"params": {k: v for k, v in params["params"].items() if k != "latent_proj"}}
  proj = params["params"]["latent_proj"]
  want = hint(plain, without) + jnp.einsum("bhwc,cd->bhwd", z_t, proj["kernel"][0, 0]) + proj["bias"]
  np.testing.assert_allclose(hint(model, params, z_t), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="latent z0"):
    hint(model, params)


@pytest.fixture(scope="module")
def tiny():
  """Tiny UNet + SGEN with the control encoder copied from the UNet, and two Adam steps."""
  config = get_config("tiny")
  model = sgen.from_config(config.model.unet, config.model.sgen)
  net = unet.from_config(config.model.unet)
  image, z_t, t, context = _inputs(config)
  unet_params = jax.jit(net.init)(jax.random.key(1), z_t, t, context)
  fresh = jax.jit(model.init)(jax.random.key(2), image, z_t, t, context)
  params = sgen.init_control_from_unet(unet_params, fresh)
  eps = jax.random.normal(jax.random.key(3), z_t.shape)
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state):
    """One Adam step on the SGEN parameters (UNet frozen); returns the UNet output and gradients."""
    def loss(p):
      down, mid = model.apply(p, image, z_t, t, context)
      out = net.apply(unet_params, z_t, t, context, down, mid)
      return jnp.mean((out - eps) ** 2), out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, out, grads

  stepped, opt_state, out_before, _ = step(params, tx.init(params))
  _, _, out_after, grads_after = step(stepped, opt_state)
  return dict(model=model, net=net, inputs=(image, z_t, t, context), unet_params=unet_params,
              fresh=fresh, params=params, out_before=out_before, out_after=out_after,
              grads_after=grads_after)


def test_fresh_sgen_leaves_unet_output_bit_identical(tiny):
  model, net = tiny["model"], tiny["net"]
  image, z_t, t, context = tiny["inputs"]

  @jax.jit
  def steered(params, unet_params):
    return net.apply(unet_params, z_t, t, context, *model.apply(params, image, z_t, t, context))

  plain = jax.jit(lambda unet_params: net.apply(unet_params, z_t, t, context))(tiny["unet_params"])
  # XLA optimisations are off (fixture above), so both programs run the same kernels on the
  # UNet path and only the added residuals differ.
  np.testing.assert_array_equal(np.asarray(steered(tiny["params"], tiny["unet_params"])),
                                np.asarray(plain))


def test_one_step_changes_unet_output_and_every_group_gets_gradient(tiny):
  assert float(jnp.max(jnp.abs(tiny["out_after"] - tiny["out_before"]))) > 1e-6
  groups = tiny["grads_after"]["params"]
  assert {"bpnet", "semantic_0", "conv_in", "time_embedding", "down_blocks_0", "mid_block", "sff",
          "controlnet_down_blocks_0", "controlnet_mid_block"} <= set(groups)
  for name, group in groups.items():
    for path, leaf in jax.tree_util.tree_leaves_with_path(group):
      assert float(jnp.max(jnp.abs(leaf))) > 0, f"zero gradient for {name}{jax.tree_util.keystr(path)}"


def test_init_control_from_unet_reproduces_unet_encoder(tiny):
  model, net = tiny["model"], tiny["net"]
  _, z_t, t, context = tiny["inputs"]
  encode = lambda m: jax.jit(lambda p: m.apply(p, z_t, t, context, method=m.encode))
  control_encode = encode(model)
  mid_u, skips_u, temb_u = encode(net)(tiny["unet_params"])
  mid_c, skips_c, temb_c = control_encode(tiny["params"])
  for a, b in zip((mid_u, temb_u, *skips_u), (mid_c, temb_c, *skips_c)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  mid_fresh, _, _ = control_encode(tiny["fresh"])
  assert float(jnp.max(jnp.abs(mid_fresh - mid_u))) > 1e-3
  for name in ("bpnet", "sff", "controlnet_mid_block"):
    assert jax.tree.all(jax.tree.map(jnp.array_equal, tiny["params"]["params"][name],
                                     tiny["fresh"]["params"][name]))


def test_init_control_from_unet_rejects_mismatched_shapes(tiny):
  bad = jax.tree.map(lambda a: a, tiny["unet_params"])
  kernel = bad["params"]["conv_in"]["kernel"]
  bad["params"]["conv_in"]["kernel"] = jnp.zeros(kernel.shape[:-1] + (kernel.shape[-1] + 1,))
  with pytest.raises(ValueError, match="conv_in"):
    sgen.init_control_from_unet(bad, tiny["fresh"])


@pytest.mark.parametrize("variant", ["tiny", "demo", "full"])
def test_bpnet_levels_on_256(variant):
  c = get_config(variant).model.sgen
  model = sgen.BPNet(c.bpnet_widths, c.bpnet_depths, c.bpnet_norm_num_groups)
  image = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), image)
  levels = jax.eval_shape(model.apply, params, image)
  # The module docstring's table: strides 4, 8, 16, 32 at the configured widths.
  assert [tuple(l.shape) for l in levels] == [
      (1, 256 // s, 256 // s, w) for s, w in zip((4, 8, 16, 32), c.bpnet_widths)]
  names = set(params["params"])
  n = len(c.bpnet_widths)
  assert {f"top_down_{i}_{l}" for i in range(1, n) for l in range(i)} <= names
  assert {f"bottom_up_{i}_{l}" for i in range(1, n) for l in range(1, i + 1)} <= names


def _conv_direct(x, kernel, bias):
  """Stride-1 'same' conv with zero padding, written out as a sum over kernel offsets."""
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  h, w = x.shape[1:3]
  out = sum(xp[:, i:i + h, j:j + w, :] @ kernel[i, j] for i in range(kh) for j in range(kw))
  return out + bias


def _group_norm_direct(x, scale, bias, groups, eps=1e-5):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + eps)
  return g.reshape(x.shape) * scale + bias


@pytest.mark.parametrize("t_hw", [(4, 4), (16, 16)], ids=["top_down", "bottom_up"])
def test_add_multiply_fusion_matches_direct_computation(t_hw):
  keys = jax.random.split(jax.random.key(0), 3)
  s = jax.random.normal(keys[0], (2, 8, 8, 8))
  t = jax.random.normal(keys[1], (2, *t_hw, 12))
  fusion = sgen.AddMultiplyFusion(8, norm_num_groups=4)
  params = fusion.init(keys[2], s, t)
  p = jax.tree.map(np.asarray, params["params"])
  p["conv"]["kernel"] = p["conv"]["kernel"] + 0.1  # make the product term count
  got = np.asarray(fusion.apply({"params": p}, s, t))
  t_resized = np.asarray(jax.image.resize(t, (2, 8, 8, 12), "bilinear"))
  t_proj = t_resized @ p["proj"]["kernel"][0, 0] + p["proj"]["bias"]
  t_norm = _group_norm_direct(t_proj, p["norm"]["scale"], p["norm"]["bias"], 4)
  s = np.asarray(s)
  want = s + t_norm + _conv_direct(s * t_norm, p["conv"]["kernel"], p["conv"]["bias"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_sff_fuses_only_the_deepest_outputs():
  keys = jax.random.split(jax.random.key(0), 6)
  shallow = [jax.random.normal(keys[0], (1, 8, 8, 8)), jax.random.normal(keys[1], (1, 8, 8, 16))]
  deep = [jax.random.normal(keys[2], (1, 4, 4, 8)), jax.random.normal(keys[3], (1, 4, 4, 16))]
  finest = jax.random.normal(keys[4], (1, 16, 16, 8))
  features = [finest, *shallow, *deep]
  module = sgen.SFF(norm_num_groups=4)
  params = module.init(keys[5], features)["params"]
  out = module.apply({"params": params}, features)
  for a, b in zip(out[:3], features[:3]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for k, target in zip((3, 4), deep):
    width = target.shape[-1]
    fused = sum(sgen.SFFDown(width, 4).apply({"params": params[f"down_{j}_to_{width}"]}, s)
                for j, s in enumerate(shallow))
    np.testing.assert_allclose(np.asarray(out[k]), np.asarray(jax.nn.silu(target + fused)),
                               rtol=1e-5, atol=1e-5)


def test_plain_hint_encoder_matches_diffusers():
  torch = pytest.importorskip("torch")
  from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

  channels = (4, 8, 8, 16)
  torch.manual_seed(0)
  ref = ControlNetConditioningEmbedding(12, block_out_channels=channels).eval()
  torch.nn.init.normal_(ref.conv_out.weight, std=0.1)  # diffusers zero-initialises it
  image = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(image).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  params = {}
  for key, value in ref.state_dict().items():
    module, leaf = key.rsplit(".", 1)
    module = module.replace(".", "_")
    value = value.numpy()
    params.setdefault(module, {})["kernel" if leaf == "weight" else "bias"] = (
        value.transpose(2, 3, 1, 0) if leaf == "weight" else value)
  got = sgen.ControlNetConditioningEmbedding(12, channels).apply({"params": params}, image)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
