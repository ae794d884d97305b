"""Mesh and sharding rules, and 8 devices vs 1 (data and fsdp) on a small conv model."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.msd import get_config
from msd_jax import parallel
from msd_jax.training import optim, state as state_lib, steps


def mesh_config(data=-1, fsdp=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))


def test_mesh_axes_and_errors():
  mesh = parallel.make_mesh(mesh_config(fsdp=2))
  assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 4, "fsdp": 2}
  with pytest.raises(ValueError, match="does not divide"):
    parallel.make_mesh(mesh_config(fsdp=3))
  with pytest.raises(ValueError, match="needs 6 devices"):
    parallel.make_mesh(mesh_config(data=3, fsdp=2))
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    parallel.check_batch_size(12, mesh)


def test_fsdp_rule():
  assert parallel.fsdp_spec((3, 3, 64, 128), 4, 100) == P(None, None, None, "fsdp")
  assert parallel.fsdp_spec((3, 3, 64, 6), 4, 100) == P(None, None, "fsdp", None)
  assert parallel.fsdp_spec((7, 9), 4, 1) == P()
  assert parallel.fsdp_spec((64, 128), 4, 10**6) == P()
  assert parallel.fsdp_spec((64, 128), 1, 1) == P()


def test_initialize_distributed_is_a_noop_without_coordinator(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert parallel.initialize_distributed() is False


def test_shard_batch_splits_rows():
  mesh = parallel.make_mesh(mesh_config(fsdp=2))
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = parallel.shard_batch({"x": x}, mesh)["x"]
  assert g.shape == (16, 3) and len(g.addressable_shards) == 8
  assert all(s.data.shape == (2, 3) for s in g.addressable_shards)
  np.testing.assert_array_equal(np.asarray(g), x)


class SmallConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(32, (3, 3), name="conv_in")(x)
    x = nn.GroupNorm(8, name="norm")(x)
    x = nn.Conv(32, (3, 3), name="conv_mid")(jax.nn.silu(x))
    return nn.Conv(3, (3, 3), name="conv_out")(jax.nn.silu(x))


def _losses(mesh, fsdp_min_size, num_steps=3):
  train_cfg = get_config("tiny").train
  model = SmallConvNet()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
  labels = optim.param_labels(params, ["conv_mid", "conv_out"])
  tx = optim.make_optimizer(train_cfg, labels, train_cfg.learning_rate)

  def loss_fn(p, batch, rng):
    noisy = batch["x"] + 0.1 * jax.random.normal(rng, batch["x"].shape)
    recon = jnp.mean((model.apply({"params": p}, noisy) - batch["x"]) ** 2)
    return {"loss": recon + 0.0 * jnp.mean(p["norm"]["scale"]), "recon": recon}

  abstract = jax.eval_shape(
      lambda: state_lib.create_train_state(params, tx, jax.random.PRNGKey(1)))
  shardings = steps.state_shardings(abstract, mesh, fsdp_min_size)
  state = jax.jit(lambda p: state_lib.create_train_state(p, tx, jax.random.PRNGKey(1)),
                  out_shardings=shardings)(params)
  step = steps.jit_train_step(steps.make_train_step(loss_fn, tx, labels), mesh, shardings)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(num_steps):
    batch = parallel.shard_batch({"x": rng.normal(size=(8, 8, 8, 3)).astype(np.float32)}, mesh)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return np.array(losses), state


@pytest.fixture(scope="module")
def single_device():
  return _losses(parallel.make_mesh(mesh_config(), jax.devices()[:1]), 2**14)


@pytest.mark.parametrize("fsdp", [1, 4])
def test_eight_devices_match_one(single_device, fsdp):
  mesh = parallel.make_mesh(mesh_config(fsdp=fsdp))
  losses, state = _losses(mesh, fsdp_min_size=256)
  kernel = state.params["conv_mid"]["kernel"]
  if fsdp > 1:
    assert kernel.sharding.spec == P(None, None, "fsdp", None)  # ties: first axis
    assert state.opt_state.inner_states["trained"].inner_state[1][0].mu["conv_mid"]["kernel"] \
        .sharding.spec == P(None, None, "fsdp", None)
  else:
    assert kernel.sharding.is_fully_replicated
  np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
  assert len(set(losses.tolist())) == 3
  for a, b in zip(jax.tree_util.tree_leaves(state.params),
                  jax.tree_util.tree_leaves(single_device[1].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(state.params["conv_in"]["kernel"]),
                                np.asarray(single_device[1].params["conv_in"]["kernel"]))
