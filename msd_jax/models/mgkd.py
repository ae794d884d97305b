"""MGKD: mask-guided knowledge distillation (student, L_KD, context tokens, teachers, teacher cache).

Choices where the paper is open (all in `config.model.mgkd`):
- Mask grid G (latent resolution, values in [0, 1]): `sam_amg.mask_grid` of the mask source, the
  fraction of each latent cell covered by mask interiors. Mask source `sam` = SAM automatic masks
  (low-resolution decoder masks); `slic` = SLIC superpixels of the image (each superpixel a mask,
  so G is 1 inside superpixels and drops along their boundaries).
- Student input: z0 * G (channels of the scaled VAE latent times G). Student = conv_in, residual
  blocks (GroupNorm, SiLU, 3x3 conv) at latent resolution, bilinear resize to the teacher grid,
  norm_out + SiLU + conv_out to the teacher channels.
- L_KD = alpha * MSE + beta * KL(softmax(zT / tau) || softmax(zS / tau)), softmax over channels at
  each location; both terms are weighted means over locations with weight w = 1 + mask_emphasis *
  G_T (G_T = G bilinearly resized to the teacher grid), i.e. sum_p w_p * term_p / sum_p w_p, where
  the MSE term of a location is the mean over channels and the KL term the sum over channels. No
  tau^2 factor.
- Context c: the student output resized (antialiased bilinear) to a k x k grid, k^2 =
  num_context_tokens, then a Dense layer to cross_attention_dim: (B, k^2, cross_attention_dim).
- Teacher embedding shape: SAM (`sam_vit_b`): the image resized to SAM's input size S (1024 for
  ViT-B), embedding (S/16, S/16, 256) = 64 x 64 x 256. EfficientNet-Lite0 stand-in: ImageNet
  features at the data image size, stride-8 (40 ch) and stride-16 (112 ch, bilinearly upsampled
  to the stride-8 grid) concatenated and normalised per location (zero mean, unit variance over
  channels, no parameters, like the LayerNorm that ends SAM's neck): (H/8, W/8, 152).

The teacher cache (`python -m msd_jax.models.mgkd cache --config=configs/msd.py:demo --out=DIR`)
stores per image `<sha256 of the file>.npz` holding `embedding` (float16) and `grid` (float32),
`index.json` (image path -> hash) and `meta.json` (teacher settings; a different teacher in the
same folder is an error). A changed file has a new hash and is recomputed; an interrupted run
resumes from the images already stored; entries no longer referenced are deleted at the end.
"""
import hashlib
import json
import math
import os
import sys
import time
from typing import Iterable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msd_jax.models import layers
from msd_jax.models import sam as sam_lib
from msd_jax.models import sam_amg

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _uses_sam(m) -> bool:
  return m.teacher == "sam_vit_b" or m.mask_source == "sam"


def latent_size(config) -> int:
  return config.data.image_size // 2 ** (len(config.model.vae.block_out_channels) - 1)


# ----------------------------------------------------------------------------- student and loss


class StudentResnetBlock(nn.Module):
  features: int
  num_groups: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.features, (3, 3), padding=1, name="conv1")(
        nn.silu(layers.group_norm(self.num_groups, 1e-6, jnp.float32, "norm1")(x)))
    h = nn.Conv(self.features, (3, 3), padding=1, name="conv2")(
        nn.silu(layers.group_norm(self.num_groups, 1e-6, jnp.float32, "norm2")(h)))
    return x + h


class MGKDStudent(nn.Module):
  """(B, h, w, 4) mask-weighted latent -> (B, *out_size, out_channels) teacher-shaped embedding."""
  out_size: tuple[int, int]
  out_channels: int
  width: int = 64
  depth: int = 2  # residual blocks
  num_groups: int = 16

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (3, 3), padding=1, name="conv_in")(x)
    for i in range(self.depth):
      x = StudentResnetBlock(self.width, self.num_groups, name=f"blocks_{i}")(x)
    if x.shape[1:3] != tuple(self.out_size):
      x = jax.image.resize(x, (x.shape[0], *self.out_size, x.shape[-1]), "bilinear")
    x = nn.silu(layers.group_norm(self.num_groups, 1e-6, jnp.float32, "norm_out")(x))
    return nn.Conv(self.out_channels, (3, 3), padding=1, name="conv_out")(x)


class ContextProjection(nn.Module):
  """(B, H, W, C) -> (B, num_tokens, dim): resize to a k x k grid (k^2 = num_tokens), then Dense."""
  num_tokens: int
  dim: int

  @nn.compact
  def __call__(self, z):
    k = math.isqrt(self.num_tokens)
    if k * k != self.num_tokens:
      raise ValueError(f"num_context_tokens={self.num_tokens} is not a square")
    b, _, _, c = z.shape
    pooled = jax.image.resize(z, (b, k, k, c), "linear", antialias=True).reshape(b, k * k, c)
    return nn.Dense(self.dim, name="proj")(pooled)


class MGKD(nn.Module):
  """Student + context projection: (z0, G) -> (zS, c). z0 (B, h, w, 4), G (B, h, w)."""
  student: MGKDStudent
  num_context_tokens: int
  context_dim: int

  @nn.compact
  def __call__(self, z0, grid):
    z_s = self.student(z0 * grid[..., None])
    c = ContextProjection(self.num_context_tokens, self.context_dim, name="context_proj")(z_s)
    return z_s, c


def from_config(config, embedding_shape: Sequence[int]) -> MGKD:
  """`MGKD` for `config` and the teacher's (H, W, C) embedding shape."""
  m = config.model.mgkd
  student = MGKDStudent(out_size=tuple(embedding_shape[:2]), out_channels=int(embedding_shape[2]),
                        width=m.student_width, depth=m.student_depth, num_groups=m.student_norm_num_groups)
  return MGKD(student, m.num_context_tokens, config.model.unet.cross_attention_dim)


def kd_loss(z_s, z_t, grid=None, *, alpha: float = 1.0, beta: float = 1.0, tau: float = 1.0,
            mask_emphasis: float = 1.0) -> dict:
  """L_KD of (B, H, W, C) student/teacher embeddings; `grid` (B, h, w) is G at any resolution.

  Returns {"loss", "mse", "kl"} (mse and kl are the weighted means before alpha/beta).
  """
  z_s = z_s.astype(jnp.float32)
  z_t = z_t.astype(jnp.float32)
  if grid is None:
    w = jnp.ones(z_t.shape[:3], jnp.float32)
  else:
    g = jax.image.resize(grid.astype(jnp.float32), z_t.shape[:3], "bilinear")
    w = 1.0 + mask_emphasis * g
  mse = jnp.mean(jnp.square(z_s - z_t), axis=-1)
  log_p_t = jax.nn.log_softmax(z_t / tau, axis=-1)
  log_p_s = jax.nn.log_softmax(z_s / tau, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  mean = lambda x: jnp.sum(w * x) / jnp.sum(w)
  mse, kl = mean(mse), mean(kl)
  return {"loss": alpha * mse + beta * kl, "mse": mse, "kl": kl}


def kd_loss_from_config(config, z_s, z_t, grid=None) -> dict:
  m = config.model.mgkd
  return kd_loss(z_s, z_t, grid, alpha=m.alpha, beta=m.beta, tau=m.tau, mask_emphasis=m.mask_emphasis)


# ----------------------------------------------------------------------------- teachers


def normalize_channels(x, eps: float = 1e-6):
  mu = x.mean(axis=-1, keepdims=True)
  var = x.var(axis=-1, keepdims=True)
  return (x - mu) * jax.lax.rsqrt(var + eps)


def efficientnet_embedding(module, variables, images):
  """EfficientNet-Lite stride-8/16 features of [-1, 1] images -> (B, H/8, W/8, C8 + C16)."""
  feats = module.apply(variables, module.preprocess(images))
  s8, s16 = feats["s8"], feats["s16"]
  s16 = jax.image.resize(s16, s8.shape[:3] + s16.shape[-1:], "bilinear")
  return normalize_channels(jnp.concatenate([s8, s16], axis=-1))


def slic_masks(image: np.ndarray, n_segments: int, compactness: float) -> np.ndarray:
  """SLIC superpixels of an (H, W, 3) image in [-1, 1] -> (K, H, W) bool, one mask per segment."""
  from skimage.segmentation import slic  # noqa: PLC0415 (host-only, cache building)
  labels = slic((np.asarray(image, np.float64) + 1) / 2, n_segments=n_segments, compactness=compactness,
                start_label=0, channel_axis=-1)
  return labels[None] == np.arange(labels.max() + 1)[:, None, None]


class Teacher:
  """The frozen teacher and mask source of `config.model.mgkd`.

  `embed(images)` -> (B, H_T, W_T, C_T) for [-1, 1] images (B, H, W, 3) at config.data.image_size;
  `grid(image)` -> (h, w) G at latent resolution for one image. SAM modules are built from
  `config.model.mgkd.sam.weights` (a transformers SamModel folder) unless `sam` = (module,
  variables) is given; the EfficientNet-Lite0 teacher loads the pip package's ImageNet weights.
  """

  def __init__(self, config, sam=None, efficientnet=None):
    m = config.model.mgkd
    if m.teacher not in ("sam_vit_b", "efficientnet_lite0"):
      raise ValueError(f"unknown MGKD teacher {m.teacher!r}; choose sam_vit_b or efficientnet_lite0")
    if m.mask_source not in ("sam", "slic"):
      raise ValueError(f"unknown MGKD mask source {m.mask_source!r}; choose sam or slic")
    self.config = config
    self.image_size = config.data.image_size
    self.latent_shape = (latent_size(config),) * 2
    if _uses_sam(m):
      if sam is None:
        if not m.sam.weights:
          raise ValueError("config.model.mgkd.sam.weights is empty: the SAM teacher/mask source needs a "
                           "transformers SamModel folder (for example facebook/sam-vit-base)")
        from msd_jax.convert.sam import load_sam  # noqa: PLC0415 (weight import reads torch files)
        sam = load_sam(m.sam.weights)
      self.sam_model, self.sam_variables = sam
      size = self.sam_model.config.vision_config.image_size
      self._sam_embed = jax.jit(lambda v, x: self.sam_model.apply(
          v, sam_lib.preprocess(x, size), method=sam_lib.SamModel.get_image_embeddings))
      self._sam_decode = sam_amg.point_decoder(self.sam_model)
    if m.teacher == "efficientnet_lite0":
      if efficientnet is None:
        from msd_jax.convert.efficientnet import load_efficientnet_lite0  # noqa: PLC0415
        efficientnet = load_efficientnet_lite0()
      module, variables = efficientnet
      self._effnet = jax.jit(lambda v, x: efficientnet_embedding(module, v, x))
      self._effnet_variables = variables

  @property
  def embedding_shape(self) -> tuple[int, int, int]:
    x = jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3), jnp.float32)
    return tuple(jax.eval_shape(self.embed, x).shape[1:])

  def embed(self, images):
    if self.config.model.mgkd.teacher == "sam_vit_b":
      return self._sam_embed(self.sam_variables, images)
    return self._effnet(self._effnet_variables, images)

  def masks(self, image: np.ndarray, sam_embedding=None) -> np.ndarray:
    """(K, H', W') bool masks of one (H, W, 3) image from the configured mask source."""
    m = self.config.model.mgkd
    if m.mask_source == "slic":
      return slic_masks(image, m.slic.n_segments, m.slic.compactness)
    if sam_embedding is None:
      sam_embedding = self._sam_embed(self.sam_variables, jnp.asarray(image)[None])
    amg = {k: m.amg[k] for k in ("points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                                 "stability_score_offset", "box_nms_thresh")}
    out = sam_amg.automatic_masks(self._sam_decode, self.sam_variables, sam_embedding,
                                  self.sam_model.config.vision_config.image_size,
                                  points_per_side=m.amg.points_per_side, **amg)
    return out["masks"]

  def grid(self, image: np.ndarray, sam_embedding=None) -> np.ndarray:
    return sam_amg.mask_grid(self.masks(image, sam_embedding), self.latent_shape)

  def fingerprint(self) -> dict:
    """What determines the cached values (compared when a cache folder is reused)."""
    m = self.config.model.mgkd
    out = {"teacher": m.teacher, "mask_source": m.mask_source, "image_size": self.image_size,
           "latent_shape": list(self.latent_shape), "embedding_shape": list(self.embedding_shape)}
    if _uses_sam(m):
      out["sam"] = {"model": m.sam.model, "weights": os.path.abspath(m.sam.weights) if m.sam.weights else ""}
    if m.mask_source == "sam":
      out["amg"] = m.amg.to_dict()
    else:
      out["slic"] = m.slic.to_dict()
    return out


# ----------------------------------------------------------------------------- teacher cache


def file_hash(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def load_image(path: str, size: int) -> np.ndarray:
  """Image file -> (size, size, 3) float32 in [-1, 1] (bilinear resize)."""
  from PIL import Image  # noqa: PLC0415

  from msd_jax.image_io import read_image  # noqa: PLC0415
  array = read_image(path)
  if array.shape[:2] != (size, size):
    array = np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR))
  return array.astype(np.float32) / 127.5 - 1.0


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _read_json(path: str, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


class _Progress:
  def __init__(self, total: int, stream=sys.stderr, every_s: float = 2.0):
    self.total, self.stream, self.every_s = total, stream, every_s
    self.start = self.last = time.time()

  def update(self, done: int, computed: int, skipped: int, force: bool = False):
    now = time.time()
    if not force and now - self.last < self.every_s:
      return
    self.last = now
    rate = computed / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    self.stream.write(f"teacher cache: {done}/{self.total} ({computed} computed, {skipped} already cached), "
                      f"{rate:.2f} img/s, ETA {eta:.0f} s\n")
    self.stream.flush()


def build_cache(teacher: Teacher, image_paths: Iterable[str], out_dir: str, progress: bool = True,
                stop_after: Optional[int] = None) -> dict:
  """Computes and stores teacher embeddings and mask grids for `image_paths`; resumes in `out_dir`.

  `stop_after` ends the run after that many newly computed images (to bound a run or test resume).
  Returns {"computed": n, "skipped": n, "removed": n}.
  """
  os.makedirs(out_dir, exist_ok=True)
  meta_path = os.path.join(out_dir, "meta.json")
  meta = {"fingerprint": teacher.fingerprint()}
  old = _read_json(meta_path, None)
  if old is not None and old != meta:
    raise ValueError(f"{out_dir} holds a teacher cache made with {old['fingerprint']}, not "
                     f"{meta['fingerprint']}; use another --out folder or delete it")
  _write_json(meta_path, meta)
  index_path = os.path.join(out_dir, "index.json")
  index = _read_json(index_path, {})
  paths = [os.path.abspath(p) for p in image_paths]
  bar = _Progress(len(paths)) if progress else None
  computed = skipped = 0
  finished = True
  for i, path in enumerate(paths):
    digest = file_hash(path)
    entry = os.path.join(out_dir, f"{digest}.npz")
    if index.get(path) == digest and os.path.exists(entry):
      skipped += 1
    else:
      if stop_after is not None and computed >= stop_after:
        finished = False
        break
      image = load_image(path, teacher.image_size)
      embedding = teacher.embed(jnp.asarray(image)[None])
      sam_embedding = embedding if teacher.config.model.mgkd.teacher == "sam_vit_b" else None
      grid = teacher.grid(image, sam_embedding)
      tmp = f"{entry}.{os.getpid()}.tmp.npz"
      np.savez(tmp, embedding=np.asarray(embedding[0], np.float16), grid=grid.astype(np.float32))
      os.replace(tmp, entry)
      index[path] = digest
      _write_json(index_path, index)
      computed += 1
    if bar:
      bar.update(i + 1, computed, skipped)
  removed = 0
  if finished:
    live = {f"{d}.npz" for d in index.values()}
    for name in os.listdir(out_dir):
      if name.endswith(".npz") and name not in live:
        os.remove(os.path.join(out_dir, name))
        removed += 1
  if bar:
    bar.update(len(paths) if finished else i, computed, skipped, force=True)
  return {"computed": computed, "skipped": skipped, "removed": removed}


class TeacherCache:
  """Read side of a cache folder: `get(path)` -> (embedding float32 (H_T, W_T, C_T), grid (h, w))."""

  def __init__(self, out_dir: str):
    self.dir = out_dir
    meta = _read_json(os.path.join(out_dir, "meta.json"), None)
    if meta is None:
      raise FileNotFoundError(f"{out_dir}: no teacher cache here (meta.json missing); run "
                              "`python -m msd_jax.models.mgkd cache`")
    self.fingerprint = meta["fingerprint"]
    self.embedding_shape = tuple(self.fingerprint["embedding_shape"])

  def get(self, path: str) -> tuple[np.ndarray, np.ndarray]:
    entry = os.path.join(self.dir, f"{file_hash(path)}.npz")
    if not os.path.exists(entry):
      raise KeyError(f"{path}: not in the teacher cache {self.dir} (new or changed since it was built)")
    with np.load(entry) as f:
      return f["embedding"].astype(np.float32), f["grid"]


def list_images(folder: str) -> list[str]:
  out = []
  for root, _, names in os.walk(folder):
    out += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
  if not out:
    raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
  return sorted(out)


def training_images(config, default_root: str = "") -> list[str]:
  """Paths of the training split of `config.data`."""
  from data_pipeline import datasets  # noqa: PLC0415
  return [r.path for r in datasets.load_splits(config.data, default_root or None)["train"]]


def main(argv: Sequence[str], config, out: str, images: str = "", workdir: str = "",
         stop_after: Optional[int] = None) -> dict:
  if len(argv) != 2 or argv[1] != "cache":
    raise SystemExit("usage: python -m msd_jax.models.mgkd cache --config=configs/msd.py:VARIANT --out=DIR "
                     "[--images=FOLDER] [--workdir=DIR]")
  if not out:
    raise SystemExit("--out is required")
  paths = list_images(images) if images else training_images(
      config, os.path.join(workdir, "data") if workdir else "")
  return build_cache(Teacher(config), paths, out, stop_after=stop_after)


if __name__ == "__main__":
  from absl import app, flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/msd.py:VARIANT", lock_config=True)
  _OUT = flags.DEFINE_string("out", "", "cache folder")
  _IMAGES = flags.DEFINE_string("images", "", "image folder (default: the training split of config.data)")
  _WORKDIR = flags.DEFINE_string("workdir", "", "synthetic data default root: <workdir>/data")
  _STOP = flags.DEFINE_integer("stop_after", None, "stop after this many newly computed images")
  app.run(lambda argv: print(json.dumps(main(argv, _CONFIG.value, _OUT.value, _IMAGES.value, _WORKDIR.value,
                                                 _STOP.value))))
