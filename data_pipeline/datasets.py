"""Dataset readers (StoneDD COCO/Labelme, MVTec layout, Magnetic Tile), validation and splits.

Every reader returns `Record`s; pixels are loaded lazily by `load_image` / `load_mask`.
Conventions:
- label 0 is defect-free (`defect_type == "good"`), 1 defective;
- masks are uint8 {0, 1}; a defect-free image without a mask file has an all-zero mask; a
  dataset with image-level labels only (an MVTec layout without `ground_truth/`) has
  `has_pixel_labels=False` and `load_mask` returns None, so pixel metrics are skipped;
- `object_id` names the physical object. Splits never put one object in two splits.
  Magnetic Tile shoots each tile under about six lightings: within a class folder, sorted by
  `num`, a run of increasing `exp` ids is one tile; tiles of different classes whose `num` ranges
  overlap are merged into one object (some `MT_Free` shots show a tile filed under a defect class).
  Elsewhere every image is its own object.
- StoneDD: an image with several defect categories gets the category of the largest total area.
Bad input (unreadable or truncated image, missing or mis-sized mask, empty folder, unknown
layout, a COCO file naming a missing image) raises `DataError` naming the file and the problem,
from `read_dataset` / `validate_records`, before any training; with `skip_bad=True` each bad file
is logged and skipped and the count is logged.
"""
import argparse
import collections
import dataclasses
import glob
import json
import logging
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from msd_jax import tiling
from msd_jax.image_io import read_image

GOOD = "good"
STONEDD_DEFECT_TYPES = ("spot", "stain", "bubble", "gap", "chromatic_aberration", "oil_paper")
MAGNETIC_TILE_CLASSES = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
KINDS = ("synthetic", "stonedd", "mvtec", "magnetic_tile")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


class DataError(ValueError):
  """Bad input; the message names the file (or folder) and the problem."""


def _error(path: str, problem: str) -> DataError:
  return DataError(f"{path}: {problem}")


@dataclasses.dataclass(frozen=True)
class Record:
  """One image of a dataset; pixels are read by `load_image` / `load_mask`."""
  path: str
  label: int  # 0 defect-free, 1 defective
  defect_type: str  # GOOD or the defect class
  object_id: str  # the physical object (splits keep objects whole)
  mask_path: Optional[str] = None  # mask image, binarised at > 127
  segments: Tuple = ()  # ("polygon", xy) | ("rle", (h, w), counts) | ("circle", (cx, cy, r))
  source: str = ""  # annotation file the segments come from
  has_pixel_labels: bool = True
  size: Optional[Tuple[int, int]] = None  # (height, width), filled by validate_records


# ----------------------------------------------------------------------------- COCO RLE


def rle_encode(mask: np.ndarray) -> dict:
  """Binary mask [H, W] -> COCO compressed RLE {"size": [H, W], "counts": str}."""
  flat = np.asarray(mask, bool).ravel(order="F")
  bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
  runs = np.diff(bounds).tolist()
  if flat.size and flat[0]:
    runs = [0] + runs
  chars = []
  for i, run in enumerate(runs):
    x = run - runs[i - 2] if i > 2 else run
    more = True
    while more:
      c = x & 0x1F
      x >>= 5
      more = x != -1 if c & 0x10 else x != 0
      chars.append(chr((c | 0x20 if more else c) + 48))
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": "".join(chars)}


def _rle_counts(counts) -> List[int]:
  if not isinstance(counts, str):
    return [int(c) for c in counts]
  runs, p = [], 0
  while p < len(counts):
    x, k, more = 0, 0, True
    while more:
      c = ord(counts[p]) - 48
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and c & 0x10:
        x |= -1 << (5 * k)
    if len(runs) > 2:
      x += runs[-2]
    runs.append(x)
  return runs


def rle_decode(size: Sequence[int], counts) -> np.ndarray:
  """COCO RLE (compressed string or list of run lengths) -> uint8 mask [H, W]."""
  h, w = int(size[0]), int(size[1])
  runs = _rle_counts(counts)
  if sum(runs) != h * w:
    raise ValueError(f"RLE runs cover {sum(runs)} pixels, size {h}x{w} has {h * w}")
  values = np.arange(len(runs)) % 2
  return np.repeat(values.astype(np.uint8), runs).reshape((w, h)).T.copy()


# ----------------------------------------------------------------------------- pixels


def load_image(record: Record) -> np.ndarray:
  """uint8 [H, W, 3]; raises `msd_jax.image_io.ImageReadError` (a ValueError) naming the file."""
  return read_image(record.path)


def _image_size(record: Record) -> Tuple[int, int]:
  if record.size is not None:
    return record.size
  with Image.open(record.path) as image:
    return image.height, image.width


def _rasterise(segments, size: Tuple[int, int]) -> np.ndarray:
  canvas = Image.new("L", (size[1], size[0]), 0)
  draw = ImageDraw.Draw(canvas)
  mask = np.zeros(size, np.uint8)
  for segment in segments:
    if segment[0] == "rle":
      mask |= rle_decode(segment[1], segment[2])
    elif segment[0] == "polygon":
      draw.polygon(list(segment[1]), fill=1, outline=1)
    else:
      cx, cy, r = segment[1]
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1, outline=1)
  return mask | np.asarray(canvas, np.uint8)


def load_mask(record: Record) -> Optional[np.ndarray]:
  """uint8 [H, W] in {0, 1}; None when the dataset has no pixel labels."""
  if not record.has_pixel_labels:
    return None
  if record.mask_path is not None:
    try:
      with Image.open(record.mask_path) as mask:
        return (np.asarray(mask.convert("L")) > 127).astype(np.uint8)
    except (OSError, SyntaxError) as e:
      raise _error(record.mask_path, f"unreadable mask ({e})") from e
  return _rasterise(record.segments, _image_size(record))


# ----------------------------------------------------------------------------- readers


def _list_images(folder: str) -> List[str]:
  return sorted(p for p in glob.glob(os.path.join(folder, "*"))
                if p.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(p))


def _check_folder(root: str) -> None:
  if not root:
    raise DataError("data.root is empty: set it to the dataset folder")
  if not os.path.isdir(root):
    raise _error(root, "no such folder")


def _normalise_category(name: str) -> str:
  return re.sub(r"[\s\-]+", "_", name.strip()).lower()


def _dominant(areas: Dict[str, float]) -> str:
  return max(sorted(areas), key=lambda k: areas[k])


def _coco_segments(annotation: dict, json_path: str):
  seg = annotation.get("segmentation")
  if isinstance(seg, dict):
    return [("rle", tuple(seg["size"]), seg["counts"] if isinstance(seg["counts"], str)
             else tuple(seg["counts"]))]
  if isinstance(seg, list) and seg:
    return [("polygon", tuple(float(v) for v in poly)) for poly in seg if len(poly) >= 6]
  raise _error(json_path, f"annotation {annotation.get('id')} has no usable segmentation")


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise _error(path, f"not a readable JSON file ({e})") from e


def _read_coco(json_path: str, root: str, coco: dict) -> List[Record]:
  categories = {c["id"]: _normalise_category(c["name"]) for c in coco.get("categories", [])}
  per_image = collections.defaultdict(list)
  for ann in coco["annotations"]:
    per_image[ann["image_id"]].append(ann)
  search = [os.path.join(root, "images"), root, os.path.dirname(json_path)]
  records = []
  for info in coco["images"]:
    name = info["file_name"]
    path = next((os.path.join(d, name) for d in search if os.path.isfile(os.path.join(d, name))),
                None)
    if path is None:
      raise _error(json_path, f"names image {name!r}, which does not exist "
                   f"(looked in {', '.join(search)})")
    anns = per_image.get(info["id"], [])
    segments, areas = [], collections.Counter()
    for ann in anns:
      if ann["category_id"] not in categories:
        raise _error(json_path, f"annotation {ann.get('id')} has unknown category_id "
                     f"{ann['category_id']}")
      segments += _coco_segments(ann, json_path)
      areas[categories[ann["category_id"]]] += float(ann.get("area", 1.0))
    size = (int(info["height"]), int(info["width"])) if "height" in info else None
    records.append(Record(
        path=path, label=int(bool(anns)), defect_type=_dominant(areas) if anns else GOOD,
        object_id=os.path.relpath(path, root), segments=tuple(segments), source=json_path,
        size=size))
  return records


def _labelme_segments(shape: dict, json_path: str):
  points = [tuple(map(float, p)) for p in shape.get("points", [])]
  kind = shape.get("shape_type") or "polygon"
  if kind == "polygon" and len(points) >= 3:
    return ("polygon", tuple(v for p in points for v in p))
  if kind == "rectangle" and len(points) == 2:
    (x0, y0), (x1, y1) = points
    return ("polygon", (x0, y0, x1, y0, x1, y1, x0, y1))
  if kind == "circle" and len(points) == 2:
    (cx, cy), (px, py) = points
    return ("circle", (cx, cy, float(np.hypot(px - cx, py - cy))))
  raise _error(json_path, f"unsupported Labelme shape {kind!r} with {len(points)} points "
               "(use polygon, rectangle or circle)")


def _read_labelme(root: str, json_paths: List[str]) -> List[Record]:
  folder = os.path.join(root, "images") if os.path.isdir(os.path.join(root, "images")) else root
  by_stem = {os.path.splitext(os.path.basename(p))[0]: p for p in json_paths}
  records = []
  for path in _list_images(folder):
    stem = os.path.splitext(os.path.basename(path))[0]
    json_path = by_stem.pop(stem, None)
    shapes = _read_json(json_path).get("shapes", []) if json_path else []
    areas = collections.Counter(_normalise_category(s.get("label", "defect")) for s in shapes)
    records.append(Record(
        path=path, label=int(bool(shapes)), defect_type=_dominant(areas) if shapes else GOOD,
        object_id=os.path.relpath(path, root),
        segments=tuple(_labelme_segments(s, json_path) for s in shapes),
        source=json_path or ""))
  for stem, json_path in sorted(by_stem.items()):
    raise _error(json_path, f"Labelme file has no image {stem}.* in {folder}")
  return records


def read_stonedd(root: str) -> List[Record]:
  """StoneDD: COCO json(s) in `root/annotations/` or `root/`, or Labelme per-image json files."""
  _check_folder(root)
  candidates = sorted(glob.glob(os.path.join(root, "annotations", "*.json")) +
                      glob.glob(os.path.join(root, "*.json")) +
                      glob.glob(os.path.join(root, "images", "*.json")))
  coco_files, labelme_files = [], []
  for path in candidates:
    content = _read_json(path)
    if isinstance(content, dict) and "images" in content and "annotations" in content:
      coco_files.append((path, content))
    elif isinstance(content, dict) and "shapes" in content:
      labelme_files.append(path)
  if coco_files:
    records = {}
    for path, coco in coco_files:
      for record in _read_coco(path, root, coco):
        records.setdefault(record.path, record)
    records = [records[k] for k in sorted(records)]
  elif labelme_files or _list_images(os.path.join(root, "images")) or _list_images(root):
    records = _read_labelme(root, labelme_files)
  else:
    if not os.listdir(root):
      raise _error(root, "empty folder: no images or annotations found")
    raise _error(root, "unknown layout: expected a COCO json in annotations/ (StoneDD) or "
                 "images with Labelme json files")
  if not records:
    raise _error(root, "empty folder: no images found")
  return records


def read_mvtec(root: str) -> List[Record]:
  """MVTec AD layout: train/good, test/<type>, optional ground_truth/<type>/<stem>_mask.png."""
  _check_folder(root)
  if not (os.path.isdir(os.path.join(root, "train")) or os.path.isdir(os.path.join(root, "test"))):
    raise _error(root, "unknown layout: expected train/good and test/<type> folders (MVTec)")
  gt_root = os.path.join(root, "ground_truth")
  pixel_labels = os.path.isdir(gt_root)
  if not pixel_labels:
    logging.warning("%s has no ground_truth/ folder: image-level labels only, pixel metrics "
                    "will be skipped", root)
  records = []
  for split in ("train", "test"):
    for folder in sorted(glob.glob(os.path.join(root, split, "*"))):
      defect_type = os.path.basename(folder)
      for path in _list_images(folder):
        mask_path = None
        if defect_type != GOOD and pixel_labels:
          stem = os.path.splitext(os.path.basename(path))[0]
          mask_path = os.path.join(gt_root, defect_type, f"{stem}_mask.png")
        records.append(Record(path=path, label=int(defect_type != GOOD), defect_type=defect_type,
                              object_id=os.path.relpath(path, root), mask_path=mask_path,
                              has_pixel_labels=pixel_labels))
  if not records:
    raise _error(root, "empty folder: no images in train/*/ or test/*/")
  return records


_MT_NAME = re.compile(r"exp(\d+)_num_(\d+)$")


def _magnetic_tile_objects(records: List[Record]) -> List[Record]:
  """Groups shots into tiles (see module docstring) and sets object_id."""
  runs = []  # [class, [num...], [record index...]]
  by_class = collections.defaultdict(list)
  for i, r in enumerate(records):
    match = _MT_NAME.search(os.path.splitext(os.path.basename(r.path))[0])
    if match:
      by_class[r.defect_type].append((int(match.group(2)), int(match.group(1)), i))
  for shots in by_class.values():
    last_exp = None
    for num, exp, i in sorted(shots):
      if last_exp is None or exp <= last_exp:
        runs.append([num, num, []])
      runs[-1][1] = num
      runs[-1][2].append(i)
      last_exp = exp
  object_ids = {}
  end = None
  for start, stop, members in sorted(runs):
    if end is None or start > end:
      tile = f"tile_{start}"
      end = stop
    end = max(end, stop)
    for i in members:
      object_ids[i] = tile
  return [dataclasses.replace(r, object_id=object_ids.get(i, r.object_id))
          for i, r in enumerate(records)]


def read_magnetic_tile(root: str) -> List[Record]:
  """Magnetic Tile: MT_<Class>/Imgs/<name>.jpg with its mask <name>.png (MT_Free: defect-free)."""
  _check_folder(root)
  folders = sorted(glob.glob(os.path.join(root, "MT_*")))
  if not folders:
    raise _error(root, "unknown layout: expected MT_<Class>/Imgs folders (Magnetic Tile)")
  records = []
  for folder in folders:
    cls = os.path.basename(folder)[3:]
    defect_type = GOOD if cls == "Free" else cls
    for path in sorted(glob.glob(os.path.join(folder, "Imgs", "*.jpg"))):
      records.append(Record(path=path, label=int(defect_type != GOOD), defect_type=defect_type,
                            object_id=os.path.relpath(path, root),
                            mask_path=os.path.splitext(path)[0] + ".png"))
  if not records:
    raise _error(root, "empty folder: no MT_*/Imgs/*.jpg images")
  return _magnetic_tile_objects(records)


READERS = {"synthetic": read_stonedd, "stonedd": read_stonedd, "mvtec": read_mvtec,
           "magnetic_tile": read_magnetic_tile}


def read_dataset(kind: str, root: str) -> List[Record]:
  if kind not in READERS:
    raise DataError(f"unknown data.kind {kind!r}; choose one of {KINDS}")
  return READERS[kind](root)


# ----------------------------------------------------------------------------- validation


def _file_problem(path: str) -> Optional[str]:
  """Cheap check: exists, Pillow reads the header, PNG/JPEG end with their end marker."""
  if not os.path.isfile(path):
    return "file does not exist"
  try:
    with Image.open(path) as image:  # parses the header only
      fmt = image.format
  except (OSError, SyntaxError, ValueError) as e:
    return f"unreadable image ({e})"
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 4096))
    tail = f.read()
  if fmt == "PNG" and b"IEND" not in tail[-64:]:
    return "truncated PNG (no IEND chunk)"
  if fmt == "JPEG" and b"\xff\xd9" not in tail:
    return "truncated JPEG (no end-of-image marker)"
  return None


def _header_size(path: str) -> Tuple[int, int]:
  with Image.open(path) as image:
    return image.height, image.width


def _record_problem(record: Record) -> Tuple[str, Optional[str], Optional[Tuple[int, int]]]:
  problem = _file_problem(record.path)
  if problem:
    return record.path, problem, None
  size = _header_size(record.path)
  if record.size is not None and tuple(record.size) != size:
    return record.path, (f"image is {size[0]}x{size[1]} but {record.source or 'its annotation'} "
                         f"says {record.size[0]}x{record.size[1]}"), None
  if record.mask_path is not None:
    problem = _file_problem(record.mask_path)
    if problem == "file does not exist":
      return record.mask_path, f"missing mask for {record.path}", None
    if problem:
      return record.mask_path, problem, None
    mask_size = _header_size(record.mask_path)
    if mask_size != size:
      return record.mask_path, (f"mask is {mask_size[0]}x{mask_size[1]} but its image "
                                f"{record.path} is {size[0]}x{size[1]}"), None
  for segment in record.segments:
    if segment[0] == "rle" and tuple(segment[1]) != size:
      return record.path, (f"RLE mask in {record.source} is {segment[1][0]}x{segment[1][1]} but "
                           f"the image is {size[0]}x{size[1]}"), None
  return record.path, None, size


def validate_records(records: Iterable[Record], skip_bad: bool = False) -> List[Record]:
  """Checks every image and mask up front and fills `Record.size`.

  Raises `DataError` listing each bad file and its problem; with skip_bad, logs each and skips it.
  """
  good, bad = [], []
  for record in records:
    path, problem, size = _record_problem(record)
    if problem:
      bad.append(f"{path}: {problem}")
    else:
      good.append(dataclasses.replace(record, size=size))
  if bad and not skip_bad:
    raise DataError(f"{len(bad)} bad input file(s) (set data.skip_bad=True to skip them):\n  " +
                    "\n  ".join(bad))
  for line in bad:
    logging.warning("skipping %s", line)
  if bad:
    logging.warning("skipped %d bad of %d images", len(bad), len(bad) + len(good))
  if not good:
    raise DataError("no usable images left after skipping bad input")
  return good


# ----------------------------------------------------------------------------- splits


def _count(fraction: float, n: int) -> int:
  return 0 if fraction <= 0 or n == 0 else max(1, int(round(fraction * n)))


def make_splits(records: Sequence[Record], seed: int, k_shot: Optional[int] = None,
                val_normal_fraction: float = 0.1, test_normal_fraction: float = 0.2,
                val_defect_fraction: float = 0.2) -> Dict[str, List[Record]]:
  """Splits by object: train = defect-free only, val = held-out defect-free + a few defects.

  Objects holding any defective image are defect objects. Defect-free objects are shuffled with
  `seed` and cut into val, test and the train pool by the fractions; defect objects are shuffled
  within their (dominant) defect type and dealt round-robin over types, the first
  `val_defect_fraction` going to val, so val sees as many types as possible. `k_shot` keeps only
  the first k images of the train pool; the rest of the pool is unused, so val and test do not
  depend on k. Each split is sorted by path.
  """
  groups = collections.defaultdict(list)
  for r in records:
    groups[r.object_id].append(r)
  rng = np.random.default_rng(seed)
  normal = sorted(o for o, rs in groups.items() if not any(r.label for r in rs))
  normal = [normal[i] for i in rng.permutation(len(normal))]
  n_val, n_test = _count(val_normal_fraction, len(normal)), _count(test_normal_fraction,
                                                                   len(normal))
  if len(normal) - n_val - n_test < 1:
    raise DataError(f"only {len(normal)} defect-free objects: too few for train, val and test")
  by_type = collections.defaultdict(list)
  for o in sorted(set(groups) - set(normal)):
    types = collections.Counter(r.defect_type for r in groups[o] if r.label)
    by_type[_dominant(types)].append(o)
  queues = [[objs[i] for i in rng.permutation(len(objs))] for _, objs in sorted(by_type.items())]
  dealt = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
  n_val_defect = min(_count(val_defect_fraction, len(dealt)), max(len(dealt) - 1, 0))
  pool = [r for o in normal[n_val + n_test:] for r in sorted(groups[o], key=lambda r: r.path)]
  if k_shot:
    if k_shot > len(pool):
      raise DataError(f"k_shot={k_shot} but only {len(pool)} defect-free training images")
    pool = pool[:k_shot]
  objects = {"val": normal[:n_val] + dealt[:n_val_defect],
             "test": normal[n_val:n_val + n_test] + dealt[n_val_defect:]}
  splits = {"train": pool}
  for name, objs in objects.items():
    splits[name] = [r for o in objs for r in groups[o]]
  return {name: sorted(splits[name], key=lambda r: r.path) for name in SPLITS}


def cut_tiles(records: Sequence[Record], tile_size: int, min_overlap: int, out_dir: str,
              write: bool = True) -> List[Record]:
  """Defect-free `records` cut into native-resolution tiles, saved as PNGs under `out_dir`.

  The tiles follow `msd_jax.tiling.make_grid`, the grid evaluation and detect.py score on, so a
  model trained on them sees texture at the scale it is later shown. Records come back ordered
  by grid position, then by source image, so any prefix spreads over all images (the patch
  PCA and the latent scale use a prefix). Files already present are kept (resume); with
  `write=False` (other processes of a multi-host run) only the records are returned.
  """
  if any(r.label for r in records):
    raise DataError("cut_tiles takes defect-free records only (training split)")
  if write:
    os.makedirs(out_dir, exist_ok=True)
  tiles = []
  for i, record in enumerate(records):
    grid = tiling.make_grid(*_image_size(record), tile_size, min_overlap)
    stem = f"{i:05d}_{os.path.splitext(os.path.basename(record.path))[0]}"
    image = None
    for k, (y, x) in enumerate((y, x) for y in grid.ys for x in grid.xs):
      path = os.path.join(out_dir, f"{stem}_y{y:04d}_x{x:04d}.png")
      if write and not os.path.exists(path):
        if image is None:
          image = tiling.split(load_image(record), grid)
        Image.fromarray(image[k]).save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
      tiles.append((k, i, dataclasses.replace(record, path=path, mask_path=None, segments=(),
                                              size=(tile_size, tile_size))))
  return [r for _, _, r in sorted(tiles, key=lambda t: t[:2])]


def defect_type_names(records: Iterable[Record]) -> Tuple[str, ...]:
  """The index vocabulary for defect types: GOOD first, then the others sorted."""
  return (GOOD,) + tuple(sorted({r.defect_type for r in records} - {GOOD}))


def _synthetic_root(data, default_root: Optional[str]) -> str:
  from data_pipeline import synthetic  # the generator imports this module
  root = data.root or default_root
  if not root:
    raise DataError("data.root is empty and no default folder was given for synthetic data")
  wanted = {"num_normal": data.synthetic.num_normal, "num_defect": data.synthetic.num_defect,
            "size": data.synthetic.size, "seed": data.synthetic.seed}
  annotations = os.path.join(root, "annotations", "instances.json")
  if not os.path.exists(annotations):
    logging.info("generating synthetic stone data %s into %s", wanted, root)
    synthetic.generate(root, **wanted)
  elif _read_json(annotations).get("info", {}).get("generator") != wanted:
    raise _error(root, f"holds a dataset that was not generated with {wanted}; "
                 "delete it or point data.root elsewhere")
  return root


def load_splits(data, default_root: Optional[str] = None) -> Dict[str, List[Record]]:
  """Reads, validates and splits the dataset that `config.data` names.

  synthetic: generated into `data.root` (or `default_root`) when missing, then read as StoneDD.
  """
  root = _synthetic_root(data, default_root) if data.kind == "synthetic" else data.root
  records = validate_records(read_dataset(data.kind, root), skip_bad=data.skip_bad)
  return make_splits(records, seed=data.seed, k_shot=data.k_shot or None,
                     val_normal_fraction=data.val_normal_fraction,
                     test_normal_fraction=data.test_normal_fraction,
                     val_defect_fraction=data.val_defect_fraction)


# ----------------------------------------------------------------------------- summary CLI


def _counts(records: Sequence[Record]) -> dict:
  types = collections.Counter(r.defect_type for r in records if r.label)
  return {"images": len(records), "objects": len({r.object_id for r in records}),
          "defect_free": sum(1 for r in records if not r.label),
          "defective": sum(1 for r in records if r.label),
          "per_defect_type": dict(sorted(types.items()))}


def summary(data) -> dict:
  """Counts per split and per defect type, and whether the masks are binary."""
  splits = load_splits(data)
  everything = [r for name in SPLITS for r in splits[name]]
  pixel_labels = all(r.has_pixel_labels for r in everything)
  binary = None
  if pixel_labels:
    binary = all(set(np.unique(load_mask(r)).tolist()) <= {0, 1} for r in everything)
  return {"kind": data.kind, "root": data.root, "seed": data.seed,
          "pixel_labels": pixel_labels, "binary_masks": binary,
          "total": _counts(everything), "splits": {name: _counts(splits[name]) for name in SPLITS}}


def main(argv=None) -> None:
  from configs.msd import get_config
  parser = argparse.ArgumentParser(description="Dataset tools.")
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("summary", help="print counts per split and defect type as one JSON object")
  p.add_argument("--kind", required=True, choices=KINDS)
  p.add_argument("--root", required=True)
  p.add_argument("--variant", default="demo", help="config variant for split fractions")
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--skip_bad", action="store_true")
  args = parser.parse_args(argv)
  data = get_config(args.variant).data
  data.kind, data.root, data.skip_bad = args.kind, args.root, args.skip_bad
  if args.seed is not None:
    data.seed = args.seed
  generated = os.path.join(args.root, "annotations", "instances.json")
  if args.kind == "synthetic" and os.path.exists(generated):  # describe it as generated
    data.synthetic.update(_read_json(generated).get("info", {}).get("generator", {}))
  print(json.dumps(summary(data), indent=1))


if __name__ == "__main__":
  main()
