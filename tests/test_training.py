"""Optimiser groups, EMA, config validation, and a one-step smoke test of the real loop."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.msd import get_config
from data_pipeline import datasets, input_pipeline
from msd_jax import parallel
from msd_jax.models import msd as msd_lib
from msd_jax.training import loop, optim, state as state_lib, steps


def test_frozen_groups_and_ema():
  params = {"vae": {"conv": {"kernel": jnp.ones((3, 2))}},
            "unet": {"up_blocks_0": {"w": jnp.ones((2,))}, "down_blocks_0": {"w": jnp.ones((2,))}}}
  labels = optim.param_labels(params, ["unet/up_blocks_"])
  assert labels == {"vae": {"conv": {"kernel": "frozen"}},
                    "unet": {"up_blocks_0": {"w": "trained"}, "down_blocks_0": {"w": "frozen"}}}
  cfg = get_config("tiny").train
  tx = optim.make_optimizer(cfg, labels, 0.1)

  def loss_fn(p, batch, rng):
    del rng
    total = sum(jnp.sum(x * batch["x"][0, 0]) for x in jax.tree_util.tree_leaves(p))
    return {"loss": total}

  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(0), use_ema=True)
  step = jax.jit(steps.make_train_step(loss_fn, tx, labels, ema_decay=0.5))
  new, metrics = step(state, {"x": jnp.ones((2, 1))})
  np.testing.assert_array_equal(new.params["vae"]["conv"]["kernel"], params["vae"]["conv"]["kernel"])
  np.testing.assert_array_equal(new.params["unet"]["down_blocks_0"]["w"], 1.0)
  trained = new.params["unet"]["up_blocks_0"]["w"]
  np.testing.assert_allclose(trained, 0.9, rtol=1e-5)  # Adam's first step moves by lr
  np.testing.assert_allclose(new.ema_params["unet"]["up_blocks_0"]["w"], 0.95, rtol=1e-5)
  assert float(metrics["grad_norm"]) == pytest.approx(np.sqrt(2.0))  # frozen leaves: no gradient
  assert int(new.step) == 1


def test_learning_rate_schedules():
  constant = optim.learning_rate_schedule(1e-3, 10)
  cosine = optim.learning_rate_schedule(1e-3, 10, "cosine", 110)
  for schedule in (constant, cosine):
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(constant(110)) == pytest.approx(1e-3)
  assert float(cosine(60)) == pytest.approx(5e-4)  # half way through the decay
  assert float(cosine(110)) == pytest.approx(0.0, abs=1e-12)
  values = [float(cosine(t)) for t in range(10, 111)]
  assert all(a >= b for a, b in zip(values, values[1:]))
  with pytest.raises(ValueError, match="num_steps"):
    optim.learning_rate_schedule(1e-3, 10, "cosine", 10)
  with pytest.raises(ValueError, match="unknown learning-rate decay"):
    optim.learning_rate_schedule(1e-3, 10, "linear", 100)


def test_config_validation_fails_before_compiling(tmp_path):
  mesh = parallel.make_mesh(get_config("tiny").mesh)
  config = get_config("tiny")
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    loop.validate_config(config, mesh)  # tiny batch 2 on 8 devices
  for key, value, message in [("data.image_size", 36, "multiple of 8"),
                              ("stages.order", ("vae", "nope"), "unknown stages"),
                              ("data.kind", "mvtec", "not a folder"),
                              ("stages.msd.max_t", 999, "must exceed diffusion.t_start"),
                              ("stages.msd.restore_min_t", 1000, "max_t=1000 must exceed"),
                              ("model.unet.in_channels", 8, "must equal model.vae.latent_channels"),
                              ("stages.vae.init_checkpoint", "sd-vae", None)]:
    config = get_config("tiny")
    config.train.batch_size = config.eval.batch_size = 8
    config.stages.order = ("vae",)
    *path, name = key.split(".")
    section = functools.reduce(lambda c, k: c[k], path, config)
    section[name] = value
    if message is None:  # valid as such; not with the patch shortcut
      loop.validate_config(config, mesh)
      config.model.vae.patch_shortcut, message = True, "patch_shortcut adds parameters"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      loop.validate_config(config, mesh)


@pytest.mark.slow
def test_per_image_scores_take_the_largest_tile():
  scores, labels = loop.per_image_scores(np.array([0.1, 0.7, 0.3, 0.2, 0.9]),
                                         np.array([1, 1, 0, 0, 0]), np.array([4, 4, 6, 6, 5]))
  np.testing.assert_array_equal(scores, [0.7, 0.9, 0.3])
  np.testing.assert_array_equal(labels, [1, 0, 0])


def test_one_step_of_every_stage_through_the_real_loop(tmp_path):
  config = get_config("tiny")
  config.mesh.data = 2  # 2 of the 8 host devices: the tiny batch of 2
  assert tuple(config.stages.order) == ("vae", "teacher_cache", "msd")
  config.stages.vae.num_steps = 1
  config.stages.vae.scale_per_channel = True
  config.stages.msd.num_steps = 1
  config.data.tile_size, config.data.tile_overlap = 32, 0  # 64 px slabs: 4 tiles each
  mesh_devices = jax.devices()[:2]
  workdir = str(tmp_path)
  original = parallel.make_mesh
  try:
    parallel.make_mesh = lambda cfg, devices=None: original(cfg, mesh_devices)
    state = loop.train_and_evaluate(config, workdir)
  finally:
    parallel.make_mesh = original
  assert int(state.step) == 1
  from msd_jax.training import checkpoint
  metas = {}
  for stage in ("vae", "msd"):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints", stage), best_metric="val_auroc")
    assert ckpt.latest_step() == 1 and ckpt.best_step() == 1
    metas[stage] = ckpt.restore_meta(1)
    if stage == "vae":
      vae_state, _ = ckpt.restore(None, 1)
    ckpt.close()
  for meta in metas.values():
    assert set(meta["thresholds"]) == {"image", "pixel"} and meta["data_position"] == 1
    assert 0.0 <= meta["val_metrics"]["val_auroc"] <= 1.0
  # msd: the VAE and the UNet encoder stay as the vae stage left them; the UNet decoder, SGEN and
  # the student moved.
  final = jax.device_get(state.params)
  before = vae_state["params"]
  np.testing.assert_array_equal(final["vae"]["encoder"]["conv_in"]["kernel"],
                                before["vae"]["encoder"]["conv_in"]["kernel"])
  np.testing.assert_array_equal(final["unet"]["conv_in"]["kernel"], before["unet"]["conv_in"]["kernel"])
  for group in ("sgen", "mgkd"):
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(final[group]), jax.tree.leaves(before[group]))]
    assert any(moved), group
  assert not np.array_equal(final["unet"]["conv_out"]["kernel"], before["unet"]["conv_out"]["kernel"])
  # scale_by_std: the stored latent scale gives the training latents unit variance.
  sources = datasets.load_splits(config.data, os.path.join(workdir, "data"))["train"]
  tiles = loop.training_tiles(config.data, sources, workdir, is_main=False)
  assert len(tiles) == 4 * len(sources)
  records = tiles[:config.stages.vae.scale_images]
  images = next(input_pipeline.eval_dataset(records, image_size=config.data.image_size,
                                            global_batch_size=len(records)).as_numpy_iterator())["image"]
  # scale_by_std per channel: the stored latent scales give every training latent channel unit
  # variance; one scale for all channels gives the latents as a whole unit variance.
  model = msd_lib.MSD(config)
  scale = np.asarray(final["latent_scale"])
  assert scale.shape == (config.model.unet.in_channels,) and np.ptp(scale) > 0
  np.testing.assert_allclose(np.std(model.encode(final, images), axis=(0, 1, 2)), 1.0, rtol=1e-3)
  shared = np.asarray(model.latent_scale_from_data(final, images))
  np.testing.assert_allclose(shared, shared[0])
  shared_latents = model.encode(dict(final, latent_scale=shared), images)
  assert float(np.std(shared_latents)) == pytest.approx(1.0, rel=1e-3)
  cache = os.path.join(workdir, "teacher_cache")
  assert len([f for f in os.listdir(cache) if f.endswith(".npz")]) == len(tiles)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["stages"]["msd"]["num_steps"] == 1
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  # Everything finished: a second run skips every stage and returns the same parameters.
  try:
    parallel.make_mesh = lambda cfg, devices=None: original(cfg, mesh_devices)
    again = loop.train_and_evaluate(config, workdir)
  finally:
    parallel.make_mesh = original
  assert int(again.step) == 1
  np.testing.assert_array_equal(jax.device_get(again.params["mgkd"]["context_proj"]["proj"]["kernel"]),
                                final["mgkd"]["context_proj"]["proj"]["kernel"])
