"""The fast formulations in msd_jax/models/layers.py equal the plain ones, gradients included
(the diffusers parity tests check forward outputs only)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msd_jax.models import layers


def _plain_attention(q, k, v, heads):
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1)
  return jax.nn.dot_product_attention(split(q), split(k), split(v)).reshape(q.shape)


@pytest.mark.parametrize("tokens,context", [(40, 40), (50, 7)])
@pytest.mark.parametrize("heads_per_chunk", [1, 4, None, 0.25])  # None: all 2 x 3 heads at once;
def test_attend_matches_plain_attention_with_gradients(tokens, context, heads_per_chunk, monkeypatch):
  """0.25 heads per chunk: one head's scores split into blocks of query rows."""
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, tokens, 12))
  k, v = (3 * jax.random.normal(kk, (2, context, 12)) for kk in keys[1:3])
  d_out = jax.random.normal(keys[3], q.shape)
  if heads_per_chunk:
    monkeypatch.setattr(layers, "_SCORES_PER_CHUNK", int(heads_per_chunk * tokens * context))
  fast = jax.vjp(lambda *a: layers.attend(*a, heads=3), q, k, v)
  plain = jax.vjp(lambda *a: _plain_attention(*a, heads=3), q, k, v)
  np.testing.assert_allclose(fast[0], plain[0], rtol=1e-5, atol=1e-5)
  for g_fast, g_plain in zip(fast[1](d_out), plain[1](d_out)):
    np.testing.assert_allclose(g_fast, g_plain, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(g_plain))))


def test_upsample_conv_matches_nearest_upsampling_then_conv():

  class Plain(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      return nn.Conv(6, (3, 3), padding=1, name="conv")(x)

  x = jax.random.normal(jax.random.key(1), (2, 5, 7, 4))
  fast, plain = layers.Upsample2D(6), Plain()
  params = fast.init(jax.random.key(2), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, plain.init(jax.random.key(2), x))
  params = jax.tree.map(lambda p: p + 0.1, params)  # nonzero bias too
  out_fast, vjp_fast = jax.vjp(lambda p, x: fast.apply(p, x), params, x)
  out_plain, vjp_plain = jax.vjp(lambda p, x: plain.apply(p, x), params, x)
  np.testing.assert_allclose(out_fast, out_plain, rtol=1e-5, atol=1e-5)
  d_out = jax.random.normal(jax.random.key(3), out_plain.shape)
  for g_fast, g_plain in zip(jax.tree.leaves(vjp_fast(d_out)), jax.tree.leaves(vjp_plain(d_out))):
    np.testing.assert_allclose(g_fast, g_plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 8), 4), ((3, 7, 12), 3)])
def test_group_norm_matches_linen_with_gradients(shape, groups):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(shape) * 3.0 + 2.0, jnp.float32)
  ours = layers.GroupNorm(groups, epsilon=1e-5)
  linen = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False)
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
                        linen.init(jax.random.key(0), x))
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(params)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  np.testing.assert_allclose(ours.apply(params, x), linen.apply(params, x), rtol=1e-5, atol=1e-5)
  for g_ours, g_linen in zip(jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(params, x)),
                             jax.tree.leaves(jax.grad(loss(linen), argnums=(0, 1))(params, x))):
    np.testing.assert_allclose(g_ours, g_linen, rtol=1e-4, atol=1e-4)
  half = layers.GroupNorm(groups, epsilon=1e-5, dtype=jnp.bfloat16).apply(params, x.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(np.float32), linen.apply(params, x), atol=0.1)
  with pytest.raises(ValueError, match="divisible"):
    layers.GroupNorm(5).init(jax.random.key(0), x)
