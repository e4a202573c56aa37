"""The benchmark script: tiny in-process runs, its JSON, and its imports."""

import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import pytest

from mnv2_flax import benchmark

from conftest import REPO

TINY = ["--width=0.35", "--image_size=32", "--batch_size=4", "--steps=2", "--warmup=1"]
MODEL_KEYS = (
    "compile_s",
    "train_images_per_s",
    "infer_latency_ms_b1",
    "infer_images_per_s",
    "peak_mb",
    "params",
)


def run_benchmark(tmp_path, *flags):
  path = tmp_path / "results.json"
  returned = benchmark.main([*flags, f"--json={path}"])
  with open(path) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(returned))
  return saved


def assert_positive_finite(result, keys):
  for key in keys:
    assert isinstance(result[key], (int, float)), key
    assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
  """One in-process run of the tiny benchmark, against Keras where it is
  installed: one compilation of each framework's model for both tests."""
  compare = ["--compare=keras"] if importlib.util.find_spec("keras") else []
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    results = run_benchmark(tmp_path_factory.mktemp("benchmark"), *TINY, *compare)
  return results, printed.getvalue()


# Compiles a width-0.35 model's train and inference steps.
@pytest.mark.slow
@pytest.mark.xdist_group("benchmark")
def test_jax_benchmark_writes_positive_finite_numbers(tiny_results):
  results, printed = tiny_results
  assert_positive_finite(results["jax"], (*MODEL_KEYS, "macs"))
  assert results["jax"]["params"] == 1_677_128  # Width 0.35, 1000 classes.
  assert results["config"]["image_size"] == 32
  assert results["device"] and results["date"]
  assert "| jax |" in printed
  if "keras" not in results:  # No framework compared: no ratios.
    assert results["ratios"] == {}


def test_imports_without_tensorflow():
  # The GPU/TPU images have no TensorFlow: only --compare/--pipeline need it.
  code = (
      "import sys; sys.modules['tensorflow'] = None; "
      "from mnv2_flax import benchmark; "
      "benchmark.make_config(benchmark.parse_args([]))"
  )
  env = dict(os.environ, PYTHONPATH=str(REPO))
  subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=120)


def test_unknown_framework_is_a_usage_error():
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--compare=keras,mxnet"])


def test_torch_runs_before_tensorflow_is_imported():
  # Importing torchvision after TensorFlow segfaulted (torch 2.14.1, tf 2.21).
  assert benchmark.parse_args(["--compare=keras,torch,keras"]).compare == ["torch", "keras"]


def test_markdown_tables_show_ratios_and_skipped_frameworks():
  row = {
      "train_images_per_s": 100.0,
      "infer_latency_ms_b1": 2.0,
      "infer_images_per_s": 500.0,
      "compile_s": 10.0,
      "peak_mb": 900.0,
  }
  results = {
      "jax": row,
      "keras": dict(row, train_images_per_s=50.0, infer_latency_ms_b1=3.0),
      "torch": {"skipped": "not installed (torch)"},
  }
  results["ratios"] = benchmark.ratios(results)
  assert results["ratios"] == {"jax/keras train img/s": 2.0, "keras/jax latency b1": 1.5}
  table = benchmark.markdown_tables(results)
  assert "| jax | 100.0 | 2.00 | 500.0 | 10.0 | 900 |" in table
  assert "| torch | skipped: not installed (torch) |" in table
  assert "jax/keras train img/s: 2.00x" in table


@pytest.mark.slow
@pytest.mark.xdist_group("benchmark")
@pytest.mark.skipif(importlib.util.find_spec("keras") is None, reason="keras is not installed")
def test_keras_comparison(tiny_results):
  results, printed = tiny_results
  assert_positive_finite(results["keras"], MODEL_KEYS)
  # The same architecture: Keras' trainable parameters equal ours.
  assert results["keras"]["params"] == results["jax"]["params"]
  assert set(results["ratios"]) == {"jax/keras train img/s", "keras/jax latency b1"}
  assert_positive_finite(results["ratios"], results["ratios"])
  assert "| keras |" in printed and "jax/keras train img/s" in printed


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("keras", "torch", "torchvision")),
    reason="keras, torch or torchvision is not installed",
)
def test_keras_and_torch_comparison_in_one_process(tmp_path):
  # The command line in a fresh process: torchvision's import crashes in a
  # process that has already imported TensorFlow (an earlier test's).
  path = tmp_path / "results.json"
  # Output not captured here, so pytest shows it when the command fails.
  subprocess.run(
      [
          sys.executable,
          "-m",
          "mnv2_flax.benchmark",
          *TINY,
          "--compare=keras,torch",
          f"--json={path}",
      ],
      cwd=REPO,
      check=True,
      timeout=600,
  )
  with open(path) as f:
    results = json.load(f)
  for name in ("keras", "torch"):
    assert_positive_finite(results[name], MODEL_KEYS)
    assert results[name]["params"] == results["jax"]["params"]
  assert len(results["ratios"]) == 4
  assert_positive_finite(results["ratios"], results["ratios"])


@pytest.mark.slow
def test_pipeline(tmp_path):
  pytest.importorskip("tensorflow")
  results = run_benchmark(
      tmp_path,
      "--skip_model",
      "--pipeline",
      "--image_size=32",
      "--batch_size=2",
      "--pipeline_images=4",
      "--pipeline_batches=2",
      "--pipeline_workers=1",
      "--pipeline_repeats=1",
      "--warmup=0",
  )
  assert "jax" not in results
  pipeline = results["pipeline"]
  for name in benchmark.PIPELINES:
    assert_positive_finite(pipeline[name]["workers_1"], ("images_per_s", "per_worker"))
  assert set(pipeline["over_tf_data"]) == {"images_processes", "images_threads"}
  assert 40 < pipeline["mean_jpeg_kb"] < 120  # ImageNet-like, ~75 KB.
