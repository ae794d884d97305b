"""Synthetic stone slabs with the six StoneDD defect types and exact masks.

Textures (one per slab, drawn at random):
- marble: a light or dark base with sinusoidal veins warped by fractal noise, plus fine crystal
  grain;
- granite: a speckle of three or four mineral colours (argmax of band-limited noise fields);
- gravel: a random crop, turn and tint of scikit-image's CC0 `gravel` photograph.

Defects (each defective slab carries one type, one to a few instances):
- spot: small dark blobs with slightly irregular outlines;
- stain: one large irregular, translucent discoloured patch whose strength fades towards its rim;
- bubble: small round pits, shaded as a concave hemisphere lit from the top left;
- gap: a thin dark crack (random-walk polyline, sometimes branching);
- chromatic_aberration: a smooth local colour shift that keeps the texture;
- oil_paper: a translucent, fibrous sheet of paper (a jittered quadrilateral) stuck on the slab.

"Exact" means: the written mask is the set of pixels the defect changed (a defect never alters a
pixel outside its mask; inside it the change fades to zero only at the rim of stain and chromatic
aberration). Sizes scale with the image side, so 256 and 900 px look alike.
Slab `index` draws its texture, defect and sensor noise from `numpy.random.default_rng` seeded
with [seed, index], [seed, index, 1] and [seed, index, 2], so it does not depend on how many
others are generated, and the same slab with and without its defect differ only inside the mask.
Output is the StoneDD COCO layout read by `datasets.read_stonedd`:
`images/*.png`, `annotations/instances.json` (one RLE annotation per connected defect region,
defect-free slabs carry none) and `contact_sheet.png`.
"""
import argparse
import json
import os
from typing import Callable, Dict, Tuple

import numpy as np
from PIL import Image, ImageDraw
from scipy import fft, ndimage
from skimage import data as skimage_data

from data_pipeline.datasets import STONEDD_DEFECT_TYPES, rle_encode

Array = np.ndarray


def fractal_noise(rng: np.random.Generator, shape: Tuple[int, int], beta: float,
                  cutoff: float = 0.5) -> Array:
  """Zero-mean, unit-variance noise with power spectrum 1/f^beta, low-passed at `cutoff`/px."""
  h, w = shape
  spectrum = fft.rfft2(rng.standard_normal((h, w), dtype=np.float32))
  fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
  fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
  radius = np.sqrt(fy * fy + fx * fx)
  radius[0, 0] = 1.0
  gain = radius ** (-beta / 2) * (radius < cutoff)
  gain[0, 0] = 0.0
  noise = fft.irfft2(spectrum * gain, s=(h, w))
  return ((noise - noise.mean()) / (noise.std() + 1e-8)).astype(np.float32)


def _grid(size: int) -> Tuple[Array, Array]:
  coords = np.arange(size, dtype=np.float32)
  return coords[:, None], coords[None, :]


_MARBLE_BASES = np.array([[236, 234, 228], [222, 208, 184], [176, 176, 172], [58, 62, 58],
                          [214, 196, 196]], np.float32) / 255
_MARBLE_VEINS = np.array([[120, 120, 125], [150, 120, 90], [70, 70, 72], [225, 225, 220],
                          [150, 110, 110]], np.float32) / 255
_MINERALS = np.array([[30, 30, 32], [200, 198, 195], [170, 120, 110], [120, 118, 112],
                      [90, 80, 70], [225, 215, 200]], np.float32) / 255
_TINTS = np.array([[1.0, 0.97, 0.92], [0.95, 0.95, 0.97], [1.02, 0.94, 0.88], [0.9, 0.92, 0.9]],
                  np.float32)


def marble(rng: np.random.Generator, size: int) -> Array:
  palette = rng.integers(len(_MARBLE_BASES))
  y, x = _grid(size)
  angle = rng.uniform(0, np.pi)
  u = (x * np.cos(angle) + y * np.sin(angle)) / size
  warp = fractal_noise(rng, (size, size), beta=4.0)
  phase = np.pi * (rng.uniform(1.0, 3.0) * u + rng.uniform(0.3, 0.6) * warp)
  veins = np.exp(-np.abs(np.sin(phase)) / rng.uniform(0.04, 0.12))
  veins *= np.clip(0.6 + fractal_noise(rng, (size, size), 3.5), 0, 1)  # veins fade in and out
  fine = (1 - np.abs(np.sin(3.1 * phase + 2 * fractal_noise(rng, (size, size), 2.8)))) ** 20
  strength = np.clip(0.6 * veins + 0.3 * fine, 0, 1)[..., None]
  base = _MARBLE_BASES[palette] * (1 + 0.04 * fractal_noise(rng, (size, size), 2.5)[..., None])
  image = base * (1 - strength) + _MARBLE_VEINS[palette] * strength
  grain = 0.015 * fractal_noise(rng, (size, size), 0.5)[..., None]
  return image + grain


def granite(rng: np.random.Generator, size: int) -> Array:
  n = int(rng.integers(3, 5))
  colours = _MINERALS[rng.choice(len(_MINERALS), n, replace=False)]
  weights = rng.dirichlet(np.full(n, 2.0)).astype(np.float32)
  cutoff = rng.uniform(40, 90) / size  # grains of 1/40 to 1/90 of the side
  fields = np.stack([fractal_noise(rng, (size, size), 1.0, cutoff=min(cutoff, 0.5))
                     for _ in range(n)])
  fields += 2.0 * np.log(weights)[:, None, None]
  image = colours[np.argmax(fields, axis=0)]
  shade = 1 + 0.05 * fractal_noise(rng, (size, size), 2.5)[..., None]
  return image * shade + 0.02 * fractal_noise(rng, (size, size), 0.3)[..., None]


def gravel(rng: np.random.Generator, size: int) -> Array:
  photo = skimage_data.gravel()  # ships with scikit-image (CC0)
  crop = int(rng.integers(200, photo.shape[0] + 1))
  y0, x0 = rng.integers(0, photo.shape[0] - crop + 1, size=2)
  patch = np.rot90(photo[y0:y0 + crop, x0:x0 + crop], int(rng.integers(4)))
  patch = np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((size, size),
                                                                         Image.BILINEAR))
  gray = patch.astype(np.float32)[..., None] / 255
  tint = _TINTS[rng.integers(len(_TINTS))]
  return np.clip(0.15 + 0.8 * gray, 0, 1) * tint


TEXTURES: Dict[str, Callable[[np.random.Generator, int], Array]] = {
    "marble": marble, "granite": granite, "gravel": gravel}
_TEXTURE_P = (0.45, 0.35, 0.2)


def _blob_depth(rng, size, cy, cx, ry, rx, roughness, angle=0.0):
  """Approximate inside depth in px of a noisy ellipse (> 0 inside), evaluated on a window."""
  y, x = _grid(size)
  c, s = np.cos(angle), np.sin(angle)
  dy, dx = y - cy, x - cx
  u = (dx * c + dy * s) / rx
  v = (-dx * s + dy * c) / ry
  radius = np.sqrt(u * u + v * v)
  wobble = roughness * fractal_noise(rng, (size, size), 4.5) if roughness else 0.0
  return (1 - radius + wobble) * min(rx, ry)


def _apply(image, mask, target, alpha):
  alpha = (alpha * mask)[..., None]
  return image * (1 - alpha) + target * alpha


def spot(rng, image, size):
  mask = np.zeros((size, size), bool)
  for _ in range(int(rng.integers(1, 4))):
    r = rng.uniform(0.012, 0.035) * size
    depth = _blob_depth(rng, size, *rng.uniform(0.1, 0.9, 2) * size, r * rng.uniform(0.7, 1),
                        r, 0.15, rng.uniform(0, np.pi))
    mask |= depth > 0
  colour = np.array([[0.1, 0.09, 0.08], [0.3, 0.22, 0.15], [0.2, 0.2, 0.22]],
                    np.float32)[rng.integers(3)]
  alpha = rng.uniform(0.5, 0.8)
  return _apply(image, mask, colour, alpha), mask


def stain(rng, image, size):
  r = rng.uniform(0.08, 0.2) * size
  depth = _blob_depth(rng, size, *rng.uniform(0.25, 0.75, 2) * size, r * rng.uniform(0.5, 1), r,
                      0.35, rng.uniform(0, np.pi))
  mask = depth > 0
  fade = np.clip(depth / (0.25 * r), 0, 1)
  texture = 1 + 0.3 * fractal_noise(rng, (size, size), 2.0)
  colour = np.array([[0.55, 0.45, 0.25], [0.35, 0.35, 0.38], [0.5, 0.3, 0.2]],
                    np.float32)[rng.integers(3)]
  target = image * colour / colour.max()
  return _apply(image, mask, target, rng.uniform(0.35, 0.6) * fade * texture.clip(0.5, 1.5)), mask


def bubble(rng, image, size):
  y, x = _grid(size)
  mask = np.zeros((size, size), bool)
  shading = np.zeros((size, size), np.float32)
  for _ in range(int(rng.integers(1, 6))):
    r = rng.uniform(0.008, 0.025) * size + 1.5
    cy, cx = rng.uniform(0.08, 0.92, 2) * size
    dy, dx = (y - cy) / r, (x - cx) / r
    inside = dy * dy + dx * dx < 1
    # concave pit lit from the top left: the far (bottom-right) wall catches the light
    shading = np.where(inside, 0.5 + 0.45 * (dx + dy) / np.sqrt(2), shading)
    mask |= inside
  target = (0.25 + 0.7 * shading)[..., None] * np.ones(3, np.float32)
  return _apply(image, mask, target, 0.75), mask


def gap(rng, image, size):
  canvas = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(canvas)
  width = max(1, int(round(rng.uniform(0.003, 0.01) * size)))
  for branch in range(int(rng.integers(1, 3))):
    n = int(rng.integers(12, 30))
    step = rng.uniform(0.015, 0.03) * size
    heading = rng.uniform(0, 2 * np.pi)
    turns = np.cumsum(rng.normal(0, 0.35, n)) + heading
    start = rng.uniform(0.15, 0.85, 2) * size
    points = start + np.cumsum(step * np.stack([np.cos(turns), np.sin(turns)], 1), 0)
    points = np.concatenate([start[None], points])
    draw.line([tuple(p) for p in points], fill=255, width=width if branch == 0 else
              max(1, width - 1), joint="curve")
  mask = np.asarray(canvas) > 0
  darkness = rng.uniform(0.55, 0.8) * (1 + 0.15 * fractal_noise(rng, (size, size), 1.5))
  return _apply(image, mask, np.float32(0.06), darkness.clip(0, 1)), mask


def chromatic_aberration(rng, image, size):
  r = rng.uniform(0.1, 0.28) * size
  depth = _blob_depth(rng, size, *rng.uniform(0.25, 0.75, 2) * size, r * rng.uniform(0.6, 1), r,
                      0.3, rng.uniform(0, np.pi))
  mask = depth > 0
  shifts = np.array([[1.18, 1.0, 0.8], [0.82, 0.95, 1.15], [1.12, 0.86, 0.86],
                     [0.88, 1.1, 0.9]], np.float32)
  target = np.clip(image * shifts[rng.integers(len(shifts))], 0, 1)
  fade = np.clip(depth / (0.3 * r), 0, 1)
  return _apply(image, mask, target, rng.uniform(0.7, 1.0) * fade), mask


def oil_paper(rng, image, size):
  side = rng.uniform(0.12, 0.3) * size
  aspect = rng.uniform(0.5, 1.0)
  angle = rng.uniform(0, np.pi)
  corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float32) * [side / 2,
                                                                            aspect * side / 2]
  corners += rng.normal(0, 0.06 * side, corners.shape)
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)
  centre = rng.uniform(0.25, 0.75, 2) * size
  polygon = corners @ rot.T + centre
  canvas = Image.new("L", (size, size), 0)
  ImageDraw.Draw(canvas).polygon([tuple(p) for p in polygon], fill=255)
  mask = np.asarray(canvas) > 0
  fibres = ndimage.gaussian_filter1d(rng.standard_normal((size, size)).astype(np.float32),
                                     sigma=max(1.0, size / 128), axis=int(rng.integers(2)))
  paper = np.array([[0.93, 0.9, 0.8], [0.85, 0.78, 0.6], [0.95, 0.95, 0.92]],
                   np.float32)[rng.integers(3)]
  target = paper * (1 + 0.06 * fibres / (fibres.std() + 1e-8))[..., None]
  edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, size // 200))
  target = np.where(edge[..., None], target * 0.7, target)
  return _apply(image, mask, target, rng.uniform(0.55, 0.8)), mask


DEFECTS = {"spot": spot, "stain": stain, "bubble": bubble, "gap": gap,
           "chromatic_aberration": chromatic_aberration, "oil_paper": oil_paper}


def make_slab(seed: int, index: int, size: int, defect_type: str = "") -> Tuple[Array, Array]:
  """One slab as (uint8 [size, size, 3], bool mask [size, size]); no defect when defect_type=''."""
  rng = np.random.default_rng([seed, index])
  texture = rng.choice(list(TEXTURES), p=_TEXTURE_P)
  image = TEXTURES[texture](rng, size).astype(np.float32)
  image *= 1 + 0.06 * (_grid(size)[1] / size - 0.5)[..., None] * rng.normal()  # light falloff
  mask = np.zeros((size, size), bool)
  if defect_type:
    image, mask = DEFECTS[defect_type](np.random.default_rng([seed, index, 1]), image, size)
  noise = np.random.default_rng([seed, index, 2]).standard_normal(image.shape, np.float32)
  image = image + 0.006 * noise  # sensor noise
  return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), mask


def _annotations(mask: Array, image_id: int, category_id: int, next_id: int):
  regions, count = ndimage.label(mask)
  out = []
  for k in range(1, count + 1):
    region = regions == k
    ys, xs = np.nonzero(region)
    x0, y0 = int(xs.min()), int(ys.min())
    out.append({"id": next_id + len(out), "image_id": image_id, "category_id": category_id,
                "segmentation": rle_encode(region), "area": int(region.sum()),
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "iscrowd": 0})
  return out


def contact_sheet(samples, path: str, thumb: int = 160, columns: int = 6) -> None:
  """Saves a grid of (image, mask, caption) thumbnails with the mask outlines drawn in red."""
  rows = (len(samples) + columns - 1) // columns
  sheet = Image.new("RGB", (columns * thumb, rows * (thumb + 14)), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  for i, (image, mask, caption) in enumerate(samples):
    outline = mask & ~ndimage.binary_erosion(mask, iterations=max(1, mask.shape[0] // thumb))
    shown = np.where(outline[..., None], np.array([255, 0, 0], np.uint8), image)
    x, y = (i % columns) * thumb, (i // columns) * (thumb + 14)
    sheet.paste(Image.fromarray(shown).resize((thumb, thumb), Image.NEAREST), (x, y))
    draw.text((x + 2, y + thumb), caption, fill=(0, 0, 0))
  sheet.save(path)


def generate(out: str, num_normal: int, num_defect: int, size: int = 256, seed: int = 0) -> str:
  """Writes the StoneDD layout to `out` (images, COCO annotations, contact sheet); returns `out`.

  Slab i < num_normal is defect-free; defect slab j carries type j mod 6, so every type appears
  once num_defect >= 6.
  """
  os.makedirs(os.path.join(out, "images"), exist_ok=True)
  os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
  categories = [{"id": k + 1, "name": name, "supercategory": "defect"}
                for k, name in enumerate(STONEDD_DEFECT_TYPES)]
  images, annotations, samples = [], [], []
  shown = {}
  for index in range(num_normal + num_defect):
    j = index - num_normal
    defect_type = STONEDD_DEFECT_TYPES[j % len(STONEDD_DEFECT_TYPES)] if j >= 0 else ""
    image, mask = make_slab(seed, index, size, defect_type)
    file_name = f"slab_{index:05d}.png"
    Image.fromarray(image).save(os.path.join(out, "images", file_name), compress_level=1)
    image_id = index + 1
    images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    if defect_type:
      annotations += _annotations(mask, image_id, j % len(STONEDD_DEFECT_TYPES) + 1,
                                  len(annotations) + 1)
    caption = defect_type or "good"
    if shown.get(caption, 0) < (2 if defect_type else 6):
      shown[caption] = shown.get(caption, 0) + 1
      samples.append((image, mask, caption))
  info = {"description": "synthetic stone slabs (data_pipeline/synthetic.py)",
          "generator": {"num_normal": num_normal, "num_defect": num_defect, "size": size,
                        "seed": seed}}
  coco = {"info": info,
          "images": images, "annotations": annotations, "categories": categories}
  with open(os.path.join(out, "annotations", "instances.json"), "w") as f:
    json.dump(coco, f)
  contact_sheet(samples, os.path.join(out, "contact_sheet.png"))
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_normal", type=int, default=60)
  parser.add_argument("--num_defect", type=int, default=30)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  generate(args.out, args.num_normal, args.num_defect, args.size, args.seed)
  print(f"wrote {args.num_normal} defect-free and {args.num_defect} defective {args.size} px "
        f"slabs to {args.out} (contact sheet: {os.path.join(args.out, 'contact_sheet.png')})")


if __name__ == "__main__":
  main()
