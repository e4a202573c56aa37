"""Prediction from image files with a checkpoint and with its exports: the
README walk-through (train digits, predict an image, export, predict the
same with the TFLite model). The exports are test_export.py's, made once per
test process (`digits_model`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mnv2_flax import export, predict

from conftest import REPO
from digits_model import exported_digits, exported_random, has_module, trained_digits

# One worker with test_export.py: they share digits_model's models and exports.
pytestmark = pytest.mark.xdist_group("export")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """Ten digits test images as 64x64 PNGs (8x8 upscaled), a corrupt file
  and a missing one; returns (good paths, labels, bad paths)."""
  from sklearn import datasets as sk_datasets

  directory = tmp_path_factory.mktemp("images")
  digits = sk_datasets.load_digits()
  test = np.random.default_rng(0).permutation(len(digits.target))[1437:1447]  # load_digits' split.
  paths, labels = [], []
  for i in test:
    pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
    path = str(directory / f"digit{i}.png")
    Image.fromarray(pixels, "L").resize((64, 64), Image.NEAREST).save(path)
    paths.append(path)
    labels.append(int(digits.target[i]))
  corrupt = directory / "corrupt.png"
  corrupt.write_bytes(b"not an image")
  return paths, labels, [str(corrupt), str(directory / "missing.png")]


def _predict_cli(*args):
  proc = subprocess.run(
      [sys.executable, "-m", "mnv2_flax.predict", *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  return proc


@pytest.mark.slow
def test_checkpoint_predicts_files_and_reports_bad_ones(images):
  checkpoint_path, _ = trained_digits()
  paths, labels, bad = images
  proc = _predict_cli(f"--checkpoint_path={checkpoint_path}", "--json", *paths, *bad)
  assert proc.returncode == 1, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 2 and all(any(b in e for e in errors) for b in bad)
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert [p["image"] for p in report["predictions"]] == paths
  top1 = [int(p["top"][0]["class"]) for p in report["predictions"]]
  assert np.mean(np.array(top1) == labels) >= 0.8
  assert all(len(p["top"]) == 5 for p in report["predictions"])
  for p in report["predictions"]:  # The most probable five of a distribution.
    probabilities = [t["probability"] for t in p["top"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0.5 < sum(probabilities) <= 1 + 1e-5


@pytest.mark.slow
def test_exported_tflite_predicts_like_the_checkpoint(images):
  pytest.importorskip("tensorflow")
  pytest.importorskip("ai_edge_litert")
  checkpoint_path, _ = trained_digits()
  out, _ = exported_digits()
  paths, _, _ = images
  from_checkpoint = predict.Predictor.from_checkpoint(checkpoint_path)
  from_tflite = predict.Predictor.from_exported(os.path.join(out, "model.tflite"))
  assert from_tflite.spec == from_checkpoint.spec
  expected, _ = from_checkpoint.predict_files(paths)
  got, errors = from_tflite.predict_files(paths)
  assert not errors
  for path in paths:
    np.testing.assert_allclose(got[path], expected[path], atol=1e-5)
  # int8: uint8 input quantised by the runner; the same classes.
  from_int8 = predict.Predictor.from_exported(os.path.join(out, "model_int8.tflite"))
  got, errors = from_int8.predict_files(paths)
  assert not errors
  agree = [np.argmax(got[p]) == np.argmax(expected[p]) for p in paths]
  assert np.mean(agree) >= 0.9
  # The command line, text output.
  proc = _predict_cli(f"--model={out}/model.tflite", "--top_k=1", paths[0])
  assert proc.returncode == 0, proc.stderr[-2000:]
  name, _, _ = from_checkpoint.top_k(expected[paths[0]])[0]
  assert proc.stdout.splitlines()[-1].split()[-1] == name


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["saved_model", "onnx"])
def test_saved_model_and_onnx_predict_like_the_checkpoint(images, fmt):
  pytest.importorskip("tensorflow")
  if fmt == "onnx" and not (has_module("jax2onnx") and has_module("onnxruntime")):
    pytest.skip("jax2onnx or onnxruntime is not installed")
  checkpoint_path, out, _ = exported_random("digits")
  paths, _, _ = images
  from_checkpoint = predict.Predictor.from_checkpoint(checkpoint_path)
  exported = predict.Predictor.from_exported(os.path.join(out, export.FILES[fmt]))
  assert exported.kind == fmt and exported.spec == from_checkpoint.spec
  expected, _ = from_checkpoint.predict_files(paths)
  got, errors = exported.predict_files(paths)
  assert not errors
  for path in paths:
    np.testing.assert_allclose(got[path], expected[path], atol=1e-5)
  assert exported.top_k(got[paths[0]], 1)[0][0].startswith("class")


@pytest.mark.slow
def test_usage_errors_exit_2(tmp_path):
  proc = _predict_cli("--model=x.tflite", "--checkpoint_path=y", "a.png")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: give")
  proc = _predict_cli(f"--model={tmp_path}/none.tflite", "a.png")
  assert proc.returncode == 2 and "does not exist" in proc.stderr.strip().splitlines()[-1]
