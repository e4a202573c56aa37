"""Export of a trained digits model: SavedModel, TFLite float/int8 and ONNX
compute the checkpoint's function on [0, 255] pixels."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mnv2_flax import export

from conftest import REPO
from digits_model import digits_test_pixels, trained_digits

pytestmark = pytest.mark.slow
pytest.importorskip("tensorflow")

LOGIT_TOLERANCE = 1e-4
# TFLite (XNNPACK) and onnxruntime sum in their own orders: measured 1.5e-4 on
# logits up to ~58 (SavedModel, run by XLA: 3e-6), so relative to them.
RUNTIME_RELATIVE_TOLERANCE = 1e-5


def _runtime_tolerance(logits):
  return max(LOGIT_TOLERANCE, RUNTIME_RELATIVE_TOLERANCE * float(np.abs(logits).max()))


def _has(module: str) -> bool:
  try:
    __import__(module)
  except ImportError:
    return False
  return True


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  checkpoint_path, results = trained_digits()
  out = str(tmp_path_factory.mktemp("export"))
  formats = ["saved_model", "tflite", "tflite_int8"]
  if _has("jax2onnx") and _has("onnx"):
    formats.append("onnx")
  info = export.export(checkpoint_path, out, formats)
  print("export sizes (bytes):", {k: v["bytes"] for k, v in info["files"].items()})
  return checkpoint_path, results, out, info


@pytest.fixture(scope="module")
def reference(exported):
  """JAX logits of the checkpoint on the digits test set (uint8 pixel values)."""
  checkpoint_path = exported[0]
  model, variables, _, spec = export.load_checkpoint(checkpoint_path)
  images, labels = digits_test_pixels(spec.image_size)
  images = np.round(images)  # What a uint8 image file holds.
  # The checkpoint's own function: BatchNorm unfolded, as evaluation runs it.
  logits, _ = jax.jit(export.serving_function(model, variables, spec, fold=False))(images)
  return images, labels, np.asarray(logits)


def _tflite_logits(path, images):
  interpreter = pytest.importorskip("ai_edge_litert.interpreter").Interpreter(model_path=path)
  runner = interpreter.get_signature_runner()
  dtype = runner.get_input_details()[export.INPUT_NAME]["dtype"]
  return np.concatenate(
      [runner(**{export.INPUT_NAME: image[None].astype(dtype)})["logits"] for image in images]
  )


def test_export_json_describes_the_input(exported):
  _, _, out, info = exported
  with open(os.path.join(out, export.INFO_FILE)) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(info))
  assert saved["image_size"] == 16 and saved["channels"] == 1 and saved["input_range"] == [0, 255]
  assert saved["class_names"] == [str(i) for i in range(10)]
  assert saved["crop_fraction"] == 1.0  # Digits are evaluated uncropped.
  assert saved["normalization"]["mean"] == list(export.digits_stats(16)[0])
  sizes = {fmt: file["bytes"] for fmt, file in saved["files"].items()}
  for fmt, size in sizes.items():
    assert size == export.size_of(os.path.join(out, export.FILES[fmt])) > 0
  assert sizes["tflite_int8"] < sizes["tflite"] / 2


def test_saved_model_matches_jax_any_batch_and_dtype(exported, reference):
  tf = pytest.importorskip("tensorflow")
  images, _, logits = reference
  loaded = tf.saved_model.load(os.path.join(exported[2], "saved_model"))
  assert set(loaded.signatures) == {
      "serving_default",
      "predict_images_0_255",
      "predict_uint8_images_0_255",
  }
  for batch in (1, 7):
    out = loaded.signatures["serving_default"](images_0_255=tf.constant(images[:batch]))
    delta = np.abs(out["logits"].numpy() - logits[:batch]).max()
    print(f"saved_model logits max |delta| (batch {batch}): {delta:.2e}")
    assert delta < LOGIT_TOLERANCE
  out = loaded.signatures["predict_uint8_images_0_255"](
      images_0_255=tf.constant(images[:5].astype(np.uint8))
  )
  assert np.abs(out["logits"].numpy() - logits[:5]).max() < LOGIT_TOLERANCE
  np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1, atol=1e-5)


def test_tflite_float_matches_jax(exported, reference):
  images, _, logits = reference
  out = _tflite_logits(os.path.join(exported[2], "model.tflite"), images[:32])
  delta = np.abs(out - logits[:32]).max()
  print(f"tflite logits max |delta|: {delta:.2e} (max |logit| {np.abs(logits[:32]).max():.1f})")
  assert delta < _runtime_tolerance(logits[:32])


def test_tflite_int8_agrees_with_float(exported, reference):
  images, labels, logits = reference
  out = _tflite_logits(os.path.join(exported[2], "model_int8.tflite"), images)
  float_top1, int8_top1 = logits.argmax(-1), out.argmax(-1)
  agreement = np.mean(float_top1 == int8_top1)
  float_accuracy, int8_accuracy = np.mean(float_top1 == labels), np.mean(int8_top1 == labels)
  print(
      f"int8: top-1 agreement {agreement:.4f}, accuracy {int8_accuracy:.4f} vs float "
      f"{float_accuracy:.4f}, logits max |delta| {np.abs(out - logits).max():.3f}"
  )
  assert float_accuracy == pytest.approx(exported[1]["top1"], abs=1e-6)  # The eval's figure.
  # Measured with BatchNorm folded: 92.5 % agreement, 1.7 points lost (54 %
  # unfolded). The floor catches regressions; the target is below.
  assert agreement >= 0.9
  assert int8_accuracy >= float_accuracy - 0.03


@pytest.mark.xfail(reason="int8 of this 0.35-width 16x16 model agrees on ~92 % only", strict=False)
def test_tflite_int8_meets_target(exported, reference):
  images, labels, logits = reference
  out = _tflite_logits(os.path.join(exported[2], "model_int8.tflite"), images)
  float_top1, int8_top1 = logits.argmax(-1), out.argmax(-1)
  assert np.mean(float_top1 == int8_top1) >= 0.98
  assert np.mean(int8_top1 == labels) >= np.mean(float_top1 == labels) - 0.01


def test_onnx_matches_jax(exported, reference):
  if "onnx" not in exported[3]["files"]:
    pytest.skip("jax2onnx is not installed")
  onnxruntime = pytest.importorskip("onnxruntime")
  images, _, logits = reference
  session = onnxruntime.InferenceSession(
      os.path.join(exported[2], "model.onnx"), providers=["CPUExecutionProvider"]
  )
  out = np.concatenate(
      [session.run(["logits"], {export.INPUT_NAME: image[None]})[0] for image in images[:32]]
  )
  delta = np.abs(out - logits[:32]).max()
  print(f"onnx logits max |delta|: {delta:.2e} (max |logit| {np.abs(logits[:32]).max():.1f})")
  assert delta < _runtime_tolerance(logits[:32])


def _export_cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "mnv2_flax.export", *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )


def test_cli_user_errors_are_one_line(tmp_path, exported):
  proc = _export_cli(f"--checkpoint_path={tmp_path}/nothing", f"--out={tmp_path}/out")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --checkpoint_path")
  proc = _export_cli(f"--checkpoint_path={exported[0]}", f"--out={tmp_path}", "--format=keras")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --format: each must be one of")
