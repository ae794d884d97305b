"""Mesh and sharding rules, and 8 devices vs 1 (data and fsdp) on the tiny MSD loss."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.msd import get_config
from msd_jax import parallel
from msd_jax.models import msd as msd_lib
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


def _tiny_msd():
  """The tiny config's MSD model, its initial params and a fixed stream of 8-image batches."""
  config = get_config("tiny")
  model = msd_lib.MSD(config)
  params = jax.device_get(model.init(jax.random.PRNGKey(0)))
  emb = msd_lib.teacher_embedding_shape(config)
  rng = np.random.default_rng(0)
  size, latent = config.data.image_size, model.latent_size
  batches = [{"image": rng.uniform(-1, 1, (8, size, size, 3)).astype(np.float32),
              "teacher_embedding": rng.normal(size=(8,) + emb).astype(np.float32),
              "grid": rng.uniform(0, 1, (8, latent, latent)).astype(np.float32)} for _ in range(3)]
  return config, model, params, batches


@pytest.fixture(scope="module")
def tiny_msd():
  return _tiny_msd()


def _losses(tiny_msd, mesh, fsdp_min_size):
  """3 steps of the tiny config's msd stage (L_MSD on its trained groups) on `mesh`."""
  config, model, params, batches = tiny_msd
  labels = optim.param_labels(params, config.stages.msd.trainable)
  tx = optim.make_optimizer(config.train, labels, config.train.learning_rate)
  loss_fn = model.msd_loss_from_config()
  abstract = jax.eval_shape(
      lambda: state_lib.create_train_state(params, tx, jax.random.PRNGKey(1)))
  shardings = steps.state_shardings(abstract, mesh, fsdp_min_size)
  state = jax.jit(lambda p: state_lib.create_train_state(p, tx, jax.random.PRNGKey(1)),
                  out_shardings=shardings)(params)
  step = steps.jit_train_step(steps.make_train_step(loss_fn, tx, labels), mesh, shardings)
  losses = []
  for batch in batches:
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return np.array(losses), state


@pytest.fixture(scope="module")
def single_device(tiny_msd):
  return _losses(tiny_msd, parallel.make_mesh(mesh_config(), jax.devices()[:1]), 2**14)


@pytest.mark.parametrize("fsdp", [1, 4])
def test_eight_devices_match_one(tiny_msd, single_device, fsdp):
  mesh = parallel.make_mesh(mesh_config(fsdp=fsdp))
  losses, state = _losses(tiny_msd, mesh, fsdp_min_size=256)
  kernel = state.params["unet"]["conv_out"]["kernel"]  # (3, 3, 16, 4): 576 elements, trained
  if fsdp > 1:
    assert kernel.sharding.spec == P(None, None, "fsdp", None)
    mu = state.opt_state.inner_states["trained"].inner_state[1][0].mu
    assert mu["unet"]["conv_out"]["kernel"].sharding.spec == P(None, None, "fsdp", None)
  else:
    assert kernel.sharding.is_fully_replicated
  np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
  assert len(set(losses.tolist())) == 3
  # Adam divides by sqrt(v): a gradient near zero moves its weight by up to lr whatever its
  # size, so summation-order noise moves a few weights in a thousand by a sizeable fraction of
  # lr. A sharding error (an unreduced or misplaced gradient) moves most of them.
  diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
      jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(single_device[1].params))])
  assert np.mean(diffs > 1e-5) < 2e-3
  frozen = lambda st: np.asarray(st.params["unet"]["conv_in"]["kernel"])
  np.testing.assert_array_equal(frozen(state), frozen(single_device[1]))
