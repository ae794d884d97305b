"""Training loop: `run_stage` (one resumable stage) and `train_and_evaluate` (all stages).

Stages (`config.stages.order`), each resumed from its own checkpoints and skipped when finished:
- `vae`: the autoencoder on the defect-free training images (or converted weights).
- `teacher_cache`: the MGKD teacher's embeddings and mask grids of the training split, stored once
  under `<workdir>/teacher_cache` (msd_jax.models.mgkd's hash-keyed cache: an interrupted run
  resumes, a complete cache only has its file hashes checked). On several hosts process 0 builds
  it; the workdir must be shared, as for the checkpoints.
- `msd`: L_MSD on SGEN, the UNet decoder, the MGKD student and its context projection (by default;
  `config.stages.msd.trainable`); each batch carries the cached teacher embedding and grid of its
  images. The input pipeline's geometric augmentation is off in this stage and applied inside the
  loss to the image and the cached maps together (msd_jax.models.msd).
"""
import dataclasses
import functools
import os
from typing import Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from data_pipeline import datasets, input_pipeline
from msd_jax import metrics as metrics_lib
from msd_jax import parallel, scoring
from msd_jax.models import mgkd as mgkd_lib
from msd_jax.models import msd as msd_lib
from msd_jax.models import vae as vae_lib
from msd_jax.training import checkpoint as ckpt_lib
from msd_jax.training import optim
from msd_jax.training import state as state_lib
from msd_jax.training import steps as steps_lib


@dataclasses.dataclass
class StageResult:
  state: object
  preempted: bool


def run_stage(name: str, state, train_step: Callable, batches: Callable[[int], Iterator],
              num_steps: int, checkpointer: ckpt_lib.Checkpointer, *, checkpoint_every: int,
              log_every: int = 0, eval_every: int = 0, validate: Optional[Callable] = None,
              writer=None, hooks: Sequence[Callable[[int], None]] = ()) -> StageResult:
  """Train `state` from its own step to `num_steps`.

  `batches(start_step)` yields global batches from that data position on; `validate(state,
  step)` returns (metrics, meta extras) and is run every `eval_every` steps and at the end.
  Checkpoints are written every `checkpoint_every` steps, after each validation, at the end,
  and when SIGTERM/SIGINT arrives (then the stage returns with `preempted=True`). A
  non-finite loss raises `NonFiniteLossError` after pending checkpoint writes finish, so the
  last good checkpoint stays on disk.
  """
  start = int(jax.device_get(state.step))
  if start >= num_steps:
    logging.info("stage %s: already finished at step %d", name, start)
    return StageResult(state, False)
  logging.info("stage %s: steps %d -> %d", name, start, num_steps)
  iterator = batches(start)
  with ckpt_lib.StopSignal() as stop:
    for step in range(start + 1, num_steps + 1):
      state, metrics = train_step(state, next(iterator))
      metrics = jax.device_get(metrics)
      try:
        steps_lib.check_finite(metrics, step)
      except steps_lib.NonFiniteLossError:
        checkpointer.wait()
        raise
      for hook in hooks:
        hook(step)
      if writer is not None and log_every and step % log_every == 0:
        writer.write_scalars(step, {f"{name}/{k}": float(np.mean(v)) for k, v in metrics.items()})
      val_metrics, meta = None, {"stage": name, "step": step, "data_position": step}
      if validate is not None and ((eval_every and step % eval_every == 0) or step == num_steps):
        val_metrics, extras = validate(state, step)
        meta.update(extras)
      preempted = stop.requested()
      if (val_metrics is not None or preempted or step == num_steps or
          step % checkpoint_every == 0):
        checkpointer.save(step, state, meta, metrics=val_metrics)
      if preempted:
        checkpointer.wait()
        logging.warning("stage %s: stop signal, checkpoint saved at step %d", name, step)
        return StageResult(state, True)
  checkpointer.wait()
  return StageResult(state, False)


def validate_config(config, mesh) -> None:
  """Fail before anything compiles on a config that cannot work."""
  if config.data.image_size % 8:
    raise ValueError(f"data.image_size={config.data.image_size} is not a multiple of 8")
  parallel.check_batch_size(config.train.batch_size, mesh)
  parallel.check_batch_size(config.eval.batch_size, mesh)
  unknown = [s for s in config.stages.order if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stages {unknown}; available: {sorted(STAGES)}")
  msd, num_t = config.stages.msd, config.diffusion.num_train_timesteps
  max_t = msd.get("max_t", 0) or num_t
  if not config.diffusion.t_start < max_t <= num_t or msd.restore_min_t >= max_t:
    raise ValueError(f"stages.msd.max_t={max_t} must exceed diffusion.t_start="
                     f"{config.diffusion.t_start} and stages.msd.restore_min_t={msd.restore_min_t}"
                     f", and be at most diffusion.num_train_timesteps={num_t}")
  vae, unet = config.model.vae, config.model.unet
  if not unet.in_channels == unet.out_channels == vae.latent_channels:
    raise ValueError(f"model.unet.in_channels / out_channels ({unet.in_channels} / "
                     f"{unet.out_channels}) must equal model.vae.latent_channels "
                     f"({vae.latent_channels})")
  if vae.get("patch_shortcut") and config.stages.vae.init_checkpoint:
    raise ValueError("model.vae.patch_shortcut adds parameters a converted checkpoint "
                     "(stages.vae.init_checkpoint) does not have; turn it off")
  if config.data.kind != "synthetic" and not os.path.isdir(config.data.root):
    raise FileNotFoundError(f"data.root={config.data.root!r} is not a folder "
                            f"(data.kind={config.data.kind})")


@dataclasses.dataclass
class Context:
  """What every stage needs: config, mesh, data splits, model, writer, workdir."""
  config: object
  workdir: str
  mesh: object
  splits: dict
  model: msd_lib.MSD
  writer: object
  is_main: bool


def _gather(x):
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def make_validator(ctx: Context, reconstruct: Callable, stage: str,
                   reference: Optional[Callable] = None):
  """`validate(state, step) -> (metrics, meta extras)` on the validation split.

  Reconstruction (`reconstruct(params, images, rng)`, jitted on the mesh) then the scorer's
  maps and image scores against `reference(params, images)` (default: the images); image and
  pixel AUROC, and the F1-optimal thresholds. Uses the EMA weights when kept. A whitened scorer
  and a combined image score (msd_jax.scoring) are first fitted on the reconstructions of the
  first `model.scorer.whitening_images` training images; the fits are saved with the checkpoint.
  """
  config, mesh = ctx.config, ctx.mesh
  records = ctx.splits["val"]
  module, variables = ctx.model.scorer  # the perceptual terms' scorer, built once
  # one compiled scorer for the fit and the validation images: maps and uncombined score parts
  score_parts = scoring.make_score_fn(module, variables, config.model.scorer, parts=True)
  recon = jax.jit(lambda params, x, rng: (
      x if reference is None else reference(params, x), reconstruct(params, x, rng)),
                  out_shardings=parallel.batch_sharding(mesh))
  whitened = scoring.uses_whitening(config.model.scorer)
  normed = scoring.uses_score_norm(config.model.scorer)
  moments = jax.jit(scoring.make_moments_fn(module, variables, config.model.scorer),
                    out_shardings=parallel.replicated(mesh))

  def batches(records):
    return input_pipeline.eval_iterator(records, config.data,
                                        global_batch_size=config.eval.batch_size,
                                        sharding=parallel.batch_sharding(mesh))

  def fit_scorer(params, rng):
    """(whitening, score_norm), each None when the scorer does not use it."""
    if not (whitened or normed):
      return None, None
    fit_records = ctx.splits["train"][:config.model.scorer.whitening_images]
    pairs = [(*recon(params, b["image"], rng), b["valid"]) for b in batches(fit_records)]
    whitening = (scoring.fit_whitening(moments, pairs, config.model.scorer.whitening_shrinkage)
                 if whitened else None)
    score_norm = scoring.fit_score_norm(
        lambda x_ref, x_hat, valid: (_gather(score_parts(x_ref, x_hat, whitening)[1]),
                                     _gather(valid)), pairs) if normed else None
    return whitening, score_norm

  def validate(state, step):
    params = state.ema_params if state.ema_params is not None else state.params
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), step)
    whitening, score_norm = fit_scorer(params, rng)
    rows = {k: [] for k in ("image", "x_hat", "map", "score", "label", "mask", "index",
                            "valid")}
    for batch in batches(records):
      x_ref, x_hat = recon(params, batch["image"], rng)
      maps, parts = score_parts(x_ref, x_hat, whitening)
      scores = scoring.image_scores(parts, config.model.scorer, score_norm)
      for k, v in (("image", batch["image"]), ("x_hat", x_hat), ("map", maps), ("score", scores),
                   ("label", batch["label"]), ("mask", batch["mask"]), ("index", batch["index"]),
                   ("valid", batch["valid"])):
        rows[k].append(_gather(v))
    host = {k: np.concatenate(v) for k, v in rows.items()}
    keep = host.pop("valid")
    host = {k: v[keep] for k, v in host.items()}
    scores, labels = per_image_scores(host["score"], host["label"], host["index"])
    m = metrics_lib.compute_metrics(scores, labels, host["map"], host["mask"])
    val = {"image_auroc": m["image"]["auroc"], "pixel_auroc": m["pixel"]["auroc"]}
    val["val_auroc"] = float(np.nanmean(list(val.values())))
    thresholds = {"image": m["image"]["threshold"], "pixel": m["pixel"]["threshold"]}
    if ctx.is_main:
      ctx.writer.write_scalars(step, {f"{stage}/val/{k}": v for k, v in val.items()})
      n = config.log.num_images
      heat = host["map"][:n] / max(float(host["map"].max()), 1e-8)
      ctx.writer.write_images(step, {
          f"{stage}/val/input": (host["image"][:n] + 1) / 2,
          f"{stage}/val/reconstruction": (np.clip(host["x_hat"][:n], -1, 1) + 1) / 2,
          f"{stage}/val/heatmap": heat[..., None]})
    logging.info("stage %s step %d validation: %s", stage, step, val)
    extras = {"thresholds": thresholds, "val_metrics": val}
    if whitened:
      extras["whitening"] = scoring.whitening_to_json(whitening)
    if normed:
      extras["score_norm"] = scoring.score_norm_to_json(score_norm)
    return val, extras

  return validate


def per_image_scores(scores, labels, index):
  """Image scores and labels per record from per-tile ones: a record's score is its largest tile
  score, as eval.py and detect.py take it (one tile per record: unchanged). Pixel metrics stay
  per tile, so a pixel covered by k overlapping tiles counts k times."""
  records = np.unique(index)
  return (np.array([scores[index == i].max() for i in records]),
          np.array([labels[index == i].max() for i in records]))


def _train(ctx: Context, stage: str, state, loss_fn: Callable, labels, tx, lr_schedule,
           num_steps: int, validate: Optional[Callable], data=None,
           extend_batch: Optional[Callable] = None) -> StageResult:
  """Shard, restore if a checkpoint exists, and run one stage.

  `data` replaces `config.data` for the training stream; `extend_batch(batch)` adds entries to
  each global training batch.
  """
  config, mesh = ctx.config, ctx.mesh
  shardings = steps_lib.state_shardings(state, mesh, config.mesh.fsdp_min_size)
  checkpointer = ckpt_lib.Checkpointer(
      os.path.join(ctx.workdir, "checkpoints", stage), keep=config.train.keep_checkpoints,
      best_metric=config.eval.best_metric)
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(ckpt_lib.abstract_like(state, shardings))
    logging.info("stage %s: resumed at step %d", stage, meta["step"])
  else:
    # Fresh buffers: the donated state must not share any with the caller's params.
    state = jax.device_put(state, shardings, may_alias=False)
  train_step = steps_lib.jit_train_step(
      steps_lib.make_train_step(loss_fn, tx, labels, lr_schedule, config.train.ema_decay),
      mesh, shardings)

  def batches(start):
    stream = input_pipeline.train_iterator(
        ctx.splits["train"], data or config.data, global_batch_size=config.train.batch_size,
        sharding=parallel.batch_sharding(mesh), seed=config.seed, start_step=start)
    return stream if extend_batch is None else map(extend_batch, stream)

  hooks = []
  if ctx.is_main:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=num_steps, writer=ctx.writer,
                                                 every_steps=config.log.every_steps))
  try:
    return run_stage(stage, state, train_step, batches, num_steps, checkpointer,
                     checkpoint_every=config.train.checkpoint_every,
                     log_every=config.log.every_steps if ctx.is_main else 0,
                     eval_every=config.eval.every_steps, validate=validate,
                     writer=ctx.writer if ctx.is_main else None, hooks=hooks)
  finally:
    checkpointer.close()


def _stage_state(ctx: Context, stage_config, params, rng):
  labels = optim.param_labels(params, stage_config.trainable)
  lr = stage_config.get("learning_rate", ctx.config.train.learning_rate)
  train = ctx.config.train
  tx = optim.make_optimizer(train, labels, lr, stage_config.num_steps)
  state = state_lib.create_train_state(params, tx, rng, use_ema=train.ema_decay > 0)
  return state, labels, tx, optim.schedule_from_config(train, lr, stage_config.num_steps)


def vae_stage(ctx: Context, params, rng) -> StageResult:
  """Autoencoder on the defect-free training images (or converted weights, then no training)."""
  cfg = ctx.config.stages.vae
  if cfg.init_checkpoint:
    params = dict(params, vae=ckpt_lib.load_params(cfg.init_checkpoint))
    return StageResult(state_lib.TrainState(step=0, params=params, opt_state=None, rng=rng), False)
  images = _training_images(ctx, cfg.scale_images)  # the patch PCA's and the latent scale's
  vae_params = vae_lib.with_posterior_logvar(params["vae"], cfg.init_logvar)
  if ctx.config.model.vae.patch_shortcut:
    vae_params = vae_lib.with_patch_pca(vae_params, images, ctx.model.vae.downsample_factor)
  params = dict(params, vae=vae_params)
  state, labels, tx, schedule = _stage_state(ctx, cfg, params, rng)
  loss = functools.partial(ctx.model.vae_loss, kl_weight=cfg.kl_weight,
                           perceptual_weight=cfg.perceptual_weight)
  validate = make_validator(ctx, ctx.model.vae_reconstruct, "vae")
  result = _train(ctx, "vae", state, loss, labels, tx, schedule, cfg.num_steps, validate)
  if cfg.scale_by_std and not result.preempted:
    result.state = result.state.replace(params=_with_latent_scale(ctx, result.state.params, images))
  return result


def _training_images(ctx: Context, count: int) -> np.ndarray:
  """The first `count` training images, as the model sees them (no augmentation)."""
  records = ctx.splits["train"][:count]
  return np.concatenate([
      b["image"][b["valid"]] for b in input_pipeline.eval_dataset(
          records, image_size=ctx.config.data.image_size,
          global_batch_size=len(records)).as_numpy_iterator()])


def _with_latent_scale(ctx: Context, params, images):
  """`params` with `latent_scale` = 1 / std of the trained VAE's latents on training `images`."""
  per_channel = ctx.config.stages.vae.scale_per_channel
  scale = jax.jit(functools.partial(ctx.model.latent_scale_from_data, per_channel=per_channel))(
      params, images)
  logging.info("latent scale 1/std of %d training latents%s: %s", len(images),
               " per channel" if per_channel else "", np.array2string(np.asarray(scale), precision=4))
  return dict(params, latent_scale=scale)


def teacher_cache_dir(workdir: str) -> str:
  return os.path.join(workdir, "teacher_cache")


def teacher_cache_stage(ctx: Context, params, rng) -> StageResult:
  """Teacher embeddings and mask grids of the training split (no parameters change)."""
  if ctx.is_main:
    teacher = mgkd_lib.Teacher(ctx.config)
    counts = mgkd_lib.build_cache(teacher, [r.path for r in ctx.splits["train"]],
                                  teacher_cache_dir(ctx.workdir), progress=False)
    logging.info("stage teacher_cache: %s", counts)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("teacher_cache")
  return StageResult(state_lib.TrainState(step=0, params=params, opt_state=None, rng=rng), False)


class TeacherTargets:
  """Host tables of the cached teacher embedding and grid per training record, added to batches.

  `__call__(batch)` looks up this process's rows by `batch["index"]` and returns the batch with
  global `teacher_embedding` (B, H_T, W_T, C_T) and `grid` (B, h, w) arrays.
  """

  def __init__(self, cache_dir: str, records, mesh, embedding_shape):
    cache = mgkd_lib.TeacherCache(cache_dir)
    if tuple(cache.embedding_shape) != tuple(embedding_shape):
      raise ValueError(f"{cache_dir}: cached teacher embeddings are {cache.embedding_shape}, the "
                       f"model's student expects {tuple(embedding_shape)}")
    pairs = [cache.get(r.path) for r in records]
    self.embeddings = np.stack([e for e, _ in pairs]).astype(np.float32)
    self.grids = np.stack([g for _, g in pairs]).astype(np.float32)
    self.mesh = mesh
    self.sharding = parallel.batch_sharding(mesh)

  def __call__(self, batch):
    index = multihost_utils.global_array_to_host_local_array(
        batch["index"], self.mesh, self.sharding.spec)
    index = np.asarray(index)
    extra = {"teacher_embedding": self.embeddings[index], "grid": self.grids[index]}
    return dict(batch, **{k: jax.make_array_from_process_local_data(self.sharding, v)
                          for k, v in extra.items()})


def msd_stage(ctx: Context, params, rng) -> StageResult:
  """L_MSD with the VAE frozen, teacher targets from the cache, validation through `reconstruct`."""
  config = ctx.config
  cfg = config.stages.msd
  targets = TeacherTargets(teacher_cache_dir(ctx.workdir), ctx.splits["train"], ctx.mesh,
                           msd_lib.teacher_embedding_shape(config))
  data = config.data.copy_and_resolve_references()
  data.augment.flip = data.augment.rot90 = False  # applied in the loss, with the cached maps
  state, labels, tx, schedule = _stage_state(ctx, cfg, params, rng)
  loss = ctx.model.msd_loss_from_config()
  validate = make_validator(ctx, ctx.model.reconstruct, "msd", ctx.model.scoring_reference)
  return _train(ctx, "msd", state, loss, labels, tx, schedule, cfg.num_steps, validate,
                data=data, extend_batch=targets)


STAGES = {"vae": vae_stage, "teacher_cache": teacher_cache_stage, "msd": msd_stage}


def training_tiles(data, records, workdir: str, is_main: bool):
  """With `data.tile_size > 0` every stage trains on native-resolution tiles of the training
  images (written once to `<workdir>/train_tiles`), as validation, eval.py and detect.py score."""
  tiles = datasets.cut_tiles(records, data.tile_size, data.tile_overlap,
                             os.path.join(workdir, "train_tiles"), write=is_main)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("train_tiles")
  logging.info("training on %d tiles of %d px from %d images", len(tiles), data.tile_size,
               len(records))
  return tiles


def train_and_evaluate(config, workdir: str):
  """Run `config.stages.order`; each stage resumes or is skipped when finished.

  Returns the final TrainState, or None when a stop signal ended the run early (after saving).
  """
  mesh = parallel.make_mesh(config.mesh)
  validate_config(config, mesh)
  splits = datasets.load_splits(config.data, default_root=os.path.join(workdir, "data"))
  for split in ("train", "val"):
    if not splits[split]:
      raise ValueError(f"the {split} split of data.kind={config.data.kind} is empty")
  is_main = jax.process_index() == 0
  if config.data.tile_size > 0:
    splits["train"] = training_tiles(config.data, splits["train"], workdir, is_main)
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  writer.write_hparams({k: str(v) for k, v in config.items() if not hasattr(v, "items")})
  ctx = Context(config, workdir, mesh, splits, msd_lib.MSD(config), writer, is_main)
  rng = jax.random.PRNGKey(config.seed)
  params = ctx.model.init(jax.random.fold_in(rng, 0))
  state = None
  for i, stage in enumerate(config.stages.order):
    result = STAGES[stage](ctx, params, jax.random.fold_in(rng, i + 1))
    if result.preempted:
      writer.flush()
      return None
    state, params = result.state, jax.device_get(result.state.params)
  writer.flush()
  return state
