"""Smoke tests of the side-by-side benchmarks: one timed step of each on tiny sizes (no timing is
asserted; the numbers are checked to be well-formed and the two frameworks to agree)."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/

from benchmarks import common, inference, train_step  # noqa: E402


@pytest.fixture(autouse=True)
def _worker_env(monkeypatch):
  """Workers are fresh processes: give them the tests' compilation cache, one host device."""
  cache = jax_cache_dir()
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  monkeypatch.delenv("XLA_FLAGS", raising=False)


def jax_cache_dir():
  import jax
  return jax.config.jax_compilation_cache_dir or os.path.abspath(".cache/jax")


def _check_times(s):
  assert s["n"] == 1 and 0 < s["min"] <= s["median"] <= s["max"]


def test_summary_and_table():
  s = common.summary([3.0, 1.0, 2.0, 4.0])
  assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["iqr"] == pytest.approx(1.5)
  table = common.markdown_table(["a", "bb"], [[1, "x"], [22, "yyy"]]).splitlines()
  assert len(table) == 4 and len({len(line) for line in table}) == 1


def test_rss_window_restarts():
  common.reset_peak_rss()
  before = common.window_peak_rss_mib()
  block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
  assert common.window_peak_rss_mib() >= before + 48
  del block
  assert common.peak_rss_mib() >= common.window_peak_rss_mib() - 1


def test_train_step_benchmark_one_step(capsys):
  (r,) = train_step.main(["--config=tiny", "--rounds=1", "--steps=1", "--warmup=2"])
  for key in ("jax", "torch"):
    _check_times(r[key])
    assert r["rss"][key]["peak_rss_mib"] > 0
  # Same weights and inputs: the first loss agrees, and so does the loss after one Adam update.
  np.testing.assert_allclose(r["losses"]["jax"], r["losses"]["torch"], rtol=1e-4)
  assert r["losses"]["jax"][1] != r["losses"]["jax"][0]
  assert r["flops"] > 0 and 0 < r["utilisation"] < 1
  assert "utilisation" in capsys.readouterr().out


def test_inference_benchmark_one_call(capsys):
  (r,) = inference.main(["--batch=2", "--size=32", "--rounds=1", "--steps=1", "--warmup=1"])
  for key in ("jax", "torch"):
    _check_times(r[key])
  assert r["score_diff"] < 1e-3  # the same detector in both frameworks
  assert r["compile_s"] > 0 and r["flops"] > 0
  assert "img/s" in capsys.readouterr().out

