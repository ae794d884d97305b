"""Shared helpers of the side-by-side benchmarks: worker processes, timing, peak RSS, tables.

Each framework runs in its own worker process (the benchmark script re-run with `--worker=...`),
so each one's peak RSS is its own. The parent drives the workers over JSON lines on their
stdin/stdout and interleaves their timed rounds ("alternating runs"), so load from other
processes on the machine falls on both frameworks alike. Worker logs go to stderr.
"""
import ctypes
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PyTorch's OpenMP threads spin at barriers by default; on a 2-core machine shared with anything
# else that makes eager steps many times slower. Passive waiting is the stronger reference.
TORCH_ENV = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def peak_rss_mib() -> float:
  """Peak resident set size of this process over its whole life, MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> None:
  """Returns freed heap to the OS (glibc `malloc_trim`) and restarts the kernel's high-water
  mark of this process (`VmHWM`), so `window_peak_rss_mib` sees only what follows (the timed
  steps, without compilation or warm-up)."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def window_peak_rss_mib() -> float:
  """Peak RSS since the last `reset_peak_rss` (or since start), MiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  raise RuntimeError("no VmHWM in /proc/self/status")


def rss_stats() -> dict:
  return {"peak_rss_mib": peak_rss_mib(), "steps_peak_rss_mib": window_peak_rss_mib()}


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return platform.processor() or "unknown CPU"
  for line in out.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return "unknown CPU"


def machine() -> str:
  return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def timed(fn: Callable[[], object], steps: int) -> tuple[list[float], list[object]]:
  """Runs `fn` `steps` times; returns the wall times (s) and the results. `fn` must block
  until its work is done."""
  times, results = [], []
  for _ in range(steps):
    start = time.perf_counter()
    results.append(fn())
    times.append(time.perf_counter() - start)
  return times, results


def summary(times: Sequence[float]) -> dict:
  """Median and spread (interquartile range and min/max) of step times, seconds."""
  t = np.asarray(times, np.float64)
  q25, med, q75 = np.percentile(t, [25, 50, 75])
  return {"n": int(t.size), "median": float(med), "iqr": float(q75 - q25), "min": float(t.min()),
          "max": float(t.max())}


def fmt_time(s: Mapping) -> str:
  """'123.4 ms +- 5.6' (median +- half the interquartile range)."""
  return f"{1e3 * s['median']:.1f} ms +- {0.5e3 * s['iqr']:.1f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  cells = [[str(c) for c in r] for r in [headers, *rows]]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def matmul_peak_flops(n: int = 2048, repeats: int = 7) -> float:
  """Measured float32 matmul rate of this machine (jitted `jnp.dot` of n x n matrices, best of
  `repeats`), FLOP/s: the practical compute limit used for the utilisation figure."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  import msd_jax  # noqa: PLC0415,F401  (the XLA:CPU flags msd-jax's programs run with)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times, _ = timed(lambda: dot(a, b).block_until_ready(), repeats)
  return 2.0 * n**3 / min(times)


class Worker:
  """A benchmark worker process: `python SCRIPT --worker=NAME ARGS...`, one JSON request and one
  JSON reply per line. `request` raises with the worker's stderr tail if it dies."""

  def __init__(self, script: str, name: str, args: Sequence[str], env: Mapping[str, str] | None = None):
    self.name = name
    self.proc = subprocess.Popen(
        [sys.executable, script, f"--worker={name}", *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=None, text=True, cwd=REPO, env={**os.environ, **(env or {})})

  def request(self, cmd: str, **kwargs) -> dict:
    self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      code = self.proc.wait()
      raise RuntimeError(f"{self.name} worker exited with code {code} during {cmd!r} (see its stderr above)")
    reply = json.loads(line)
    if "error" in reply:
      raise RuntimeError(f"{self.name} worker failed in {cmd!r}: {reply['error']}")
    return reply

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def serve(handlers: Mapping[str, Callable[..., dict]]) -> None:
  """Worker side of `Worker`: answers requests until stdin closes. Anything else written to
  stdout (library prints) is moved to stderr so the reply stream stays clean."""
  replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  for line in sys.stdin:
    req = json.loads(line)
    cmd = req.pop("cmd")
    try:
      reply = handlers[cmd](**req)
    except Exception as e:  # reported to the parent, which stops the benchmark
      import traceback  # noqa: PLC0415
      traceback.print_exc()
      reply = {"error": f"{type(e).__name__}: {e}"}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()


def alternate(workers: Sequence[Worker], rounds: int, steps: int) -> dict[str, list[float]]:
  """`rounds` rounds of `steps` timed steps per worker, the order reversed every round;
  each worker answers `run` with {"times": [...]}. Returns all times per worker name."""
  times = {w.name: [] for w in workers}
  for r in range(rounds):
    for w in (workers if r % 2 == 0 else workers[::-1]):
      times[w.name] += w.request("run", steps=steps)["times"]
  return times


def run_side_by_side(script: str, args: list, rounds: int, steps: int, warmup: int):
  """Starts `script`'s PyTorch worker (its warm-up writes the shared weights), then its JAX worker;
  warms both up and alternates timed rounds. Returns (warm-up replies, times, peak RSS), each
  keyed by framework."""
  pt = Worker(script, "torch", args, env=TORCH_ENV)
  try:
    pt_warm = pt.request("warmup", steps=warmup)
    jx = Worker(script, "jax", args)
    try:
      jx_warm = jx.request("warmup", steps=warmup)
      times = alternate([jx, pt], rounds, steps)
      rss = {w.name: w.request("stats") for w in (jx, pt)}
    finally:
      jx.close()
  finally:
    pt.close()
  return {"jax": jx_warm, "torch": pt_warm}, times, rss
