"""The metrics table (console text and HTML) and the `index.html` that shows every picture.

Metrics come as a nested dict (msd_jax/metrics.py). Each innermost dict of numbers becomes a row,
labelled by its key path ("per_type / spot / pixel"); its keys are the columns, in order of first
appearance. Numbers print with 4 decimals; a missing entry (for example pixel metrics of a dataset
without masks) prints as "-".
"""
import html
import json
import numbers
import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from msd_jax import viz

GOOD = "good"

Row = Tuple[str, Mapping[str, Any]]


def _is_scalar(value) -> bool:
  return value is None or isinstance(value, (numbers.Number, str))


def table_rows(metrics: Mapping[str, Any], prefix: str = "") -> List[Row]:
  """Flattens nested metrics into (label, {column: value}) rows."""
  rows: List[Row] = []
  scalars = {k: v for k, v in metrics.items() if _is_scalar(v)}
  if scalars:
    rows.append((prefix or "overall", scalars))
  for key, value in metrics.items():
    if isinstance(value, Mapping):
      rows.extend(table_rows(value, f"{prefix} / {key}" if prefix else str(key)))
  return rows


def _columns(rows: Sequence[Row]) -> List[str]:
  columns: List[str] = []
  for _, values in rows:
    columns.extend(k for k in values if k not in columns)
  return columns


def _cell(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return str(value)
  if isinstance(value, numbers.Integral):
    return str(value)
  return f"{value:.4f}"


def format_table(metrics: Mapping[str, Any]) -> str:
  """The metrics as a fixed-width text table."""
  rows = table_rows(metrics)
  columns = _columns(rows)
  cells = [[label] + [_cell(values.get(c)) for c in columns] for label, values in rows]
  header = [""] + columns
  widths = [max(len(r[i]) for r in [header] + cells) for i in range(len(header))]
  lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in
                     enumerate(zip(header, widths)))]
  lines.append("  ".join("-" * w for w in widths))
  for r in cells:
    lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                           enumerate(zip(r, widths))))
  return "\n".join(lines)


def html_table(metrics: Mapping[str, Any]) -> str:
  rows = table_rows(metrics)
  columns = _columns(rows)
  out = ["<table>", "<tr><th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
         + "</tr>"]
  for label, values in rows:
    out.append(f"<tr><th>{html.escape(label)}</th>" + "".join(
        f"<td>{html.escape(_cell(values.get(c)))}</td>" for c in columns) + "</tr>")
  out.append("</table>")
  return "\n".join(out)


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; text-align: left; }
figure { margin: 0 0 2em 0; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def write_index(out_dir: str, title: str, metrics: Mapping[str, Any],
                pictures: Sequence[Tuple[str, str]], notes: Sequence[str] = ()) -> str:
  """Writes `out_dir/index.html`: `notes` lines, the metrics table, then each (caption,
  file name relative to out_dir) picture. Returns the path."""
  parts = [
      "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
      f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
      f"<h1>{html.escape(title)}</h1>",
  ]
  parts += [f"<p>{html.escape(line)}</p>" for line in notes]
  parts += ["<h2>Metrics</h2>", html_table(metrics), "<h2>Pictures</h2>"]
  for caption, name in pictures:
    parts.append(f"<figure><img src='{html.escape(name, quote=True)}' alt='{html.escape(caption)}'>"
                 f"<figcaption>{html.escape(caption)}</figcaption></figure>")
  parts.append("</body></html>")
  path = os.path.join(out_dir, "index.html")
  with open(path, "w") as f:
    f.write("\n".join(parts) + "\n")
  return path


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def write_eval_report(out_dir: str, *, images: np.ndarray, reconstructions: np.ndarray,
                      masks: Optional[np.ndarray], maps: np.ndarray, scores: np.ndarray,
                      labels: np.ndarray, defect_types: Sequence[str], paths: Sequence[str],
                      metrics: Mapping[str, Any], thresholds: Mapping[str, float],
                      info: Mapping[str, Any], title: str, rows_per_type: int = 4) -> List[str]:
  """Writes everything eval.py leaves in `out_dir`; returns the file names written.

  - metrics.json: {"metrics": the computed metrics, "thresholds": the image/pixel thresholds the
    pictures (and detect.py) use, "info": checkpoint and settings};
  - maps.npz: maps, scores, labels, masks, defect_types, paths, so every metric can be
    recomputed from the saved maps;
  - grid_<type>.png per defect type (and one of defect-free images), the first `rows_per_type`
    images of that type in path order: input | reconstruction | ground truth | heatmap |
    thresholded mask outline;
  - roc_pr.png, score_histogram.png, and index.html showing all of them with the metrics table.
  Heatmaps share one colour range over all test maps (`viz.map_range`).
  """
  os.makedirs(out_dir, exist_ok=True)
  labels = np.asarray(labels).astype(bool)
  types = np.asarray(list(defect_types))
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(jsonable({"metrics": metrics, "thresholds": dict(thresholds), "info": dict(info)}),
              f, indent=2)
  arrays = {"maps": np.asarray(maps, np.float32), "scores": np.asarray(scores, np.float32),
            "labels": labels, "defect_types": types, "paths": np.asarray(list(paths))}
  if masks is not None:
    arrays["masks"] = np.asarray(masks, bool)
  np.savez_compressed(os.path.join(out_dir, "maps.npz"), **arrays)
  written = ["metrics.json", "maps.npz"]

  pictures = []
  vmin, vmax = viz.map_range(maps, thresholds["pixel"])
  blank = np.zeros(np.shape(maps)[1:], bool)
  ordered_types = sorted(set(types[labels])) + ([GOOD] if (~labels).any() else [])
  for name in ordered_types:
    members = np.flatnonzero(~labels if name == GOOD else (types == name) & labels)
    chosen = members[:rows_per_type]
    file_name = f"grid_{_slug(name)}.png"
    viz.save_defect_grid(
        os.path.join(out_dir, file_name), f"{name}: {len(chosen)} of {len(members)} test images",
        [images[i] for i in chosen], [reconstructions[i] for i in chosen],
        [masks[i] if masks is not None else blank for i in chosen], [maps[i] for i in chosen],
        [float(scores[i]) for i in chosen], vmin, vmax, thresholds["pixel"])
    pictures.append((f"{name}: input | reconstruction | ground truth | heatmap | mask", file_name))
  aurocs = {level: metrics[level]["auroc"] for level in ("image", "pixel")
            if isinstance(metrics.get(level), Mapping) and metrics[level].get("auroc") is not None}
  viz.save_roc_pr(os.path.join(out_dir, "roc_pr.png"), scores, labels,
                  maps if masks is not None else None, masks, aurocs=aurocs)
  pictures.append(("ROC and precision-recall curves", "roc_pr.png"))
  viz.save_score_histogram(os.path.join(out_dir, "score_histogram.png"), scores, labels,
                           thresholds["image"])
  pictures.append(("image scores, defect-free vs defective", "score_histogram.png"))
  notes = [f"{k}: {v}" for k, v in info.items()]
  notes.append(f"thresholds used in the pictures: image {thresholds['image']:.4g}, "
               f"pixel {thresholds['pixel']:.4g}")
  write_index(out_dir, title, metrics, pictures, notes)
  return written + [name for _, name in pictures] + ["index.html"]


def jsonable(value):
  """JSON-ready copy: numpy scalars and arrays become Python values, NaN becomes null."""
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [jsonable(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value
