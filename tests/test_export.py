"""Export: SavedModel, TFLite float/int8 and ONNX compute the checkpoint's
function on [0, 255] pixels.

Float equivalence (within an absolute 1e-4 of JAX's logits) is checked on
random models whose logits are a few units, int8 on the trained digits model
against the issue's targets. Each model is exported once per test process
(`digits_model`), shared with test_predict.py.
"""

import collections
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mnv2_flax import checkpoint, data, export

from conftest import REPO
from digits_model import (
    digits_test_pixels,
    exported_digits,
    exported_random,
    random_pixels,
    trained_digits,
)

# Every test needs an export (seconds each); one worker shares them with
# test_predict.py (digits_model caches them per process).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("export")]
pytest.importorskip("tensorflow")

LOGIT_TOLERANCE = 1e-4  # The bound for SavedModel and float TFLite (and ONNX).
RANDOM_MODELS = ["digits", "rgb"]


def _jax_logits(checkpoint_path, images):
  """The checkpoint's own function: BatchNorm unfolded, as evaluation runs it."""
  model, variables, _, spec = export.load_checkpoint(checkpoint_path)
  logits, _ = jax.jit(export.serving_function(model, variables, spec, fold=False))(images)
  return np.asarray(logits)


@pytest.fixture(scope="module", params=RANDOM_MODELS)
def random_model(request):
  """(export directory, export.json, images, JAX logits) of a random model."""
  checkpoint_path, out, info = exported_random(request.param)
  spec = export.InputSpec.from_json(info)
  if spec.channels == 1:  # Digits test images, as a uint8 image file holds them.
    images = np.round(digits_test_pixels(spec.image_size)[0][:16])
  else:
    images = random_pixels(spec, 16)
  logits = _jax_logits(checkpoint_path, images)
  print(f"{request.param}: max |logit| {np.abs(logits).max():.2f}")
  return out, info, images, logits


@pytest.fixture(scope="module")
def trained():
  """(export directory, export.json, eval results, test images, labels, JAX
  logits) of the trained digits model."""
  checkpoint_path, results = trained_digits()
  out, info = exported_digits()
  images, labels = digits_test_pixels(info["image_size"])
  images = np.round(images)  # What a uint8 image file holds.
  return out, info, results, images, labels, _jax_logits(checkpoint_path, images)


def _tflite(path):
  interpreter = pytest.importorskip("ai_edge_litert.interpreter").Interpreter(model_path=path)
  return interpreter


def _tflite_logits(path, images):
  runner = _tflite(path).get_signature_runner()
  dtype = runner.get_input_details()[export.INPUT_NAME]["dtype"]
  return np.concatenate(
      [runner(**{export.INPUT_NAME: image[None].astype(dtype)})["logits"] for image in images]
  )


def _max_delta(name, got, expected):
  delta = float(np.abs(got - expected).max())
  print(f"{name} logits max |delta| {delta:.2e} (max |logit| {np.abs(expected).max():.2f})")
  return delta


def test_export_json_describes_the_input(trained):
  out, info, *_ = trained
  with open(os.path.join(out, export.INFO_FILE)) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(info))
  assert saved["image_size"] == 16 and saved["channels"] == 1 and saved["input_range"] == [0, 255]
  assert saved["class_names"] == [str(i) for i in range(10)]
  assert saved["dataset"] == "digits"
  assert saved["crop_fraction"] == 1.0  # Digits are evaluated uncropped.
  # The normalisation the data had, as settings.json records it.
  mean, std = data.digits_normalization(16)
  assert saved["normalization"] == {"mean": list(mean), "std": list(std), "included": True}
  sizes = {fmt: file["bytes"] for fmt, file in saved["files"].items()}
  for fmt, size in sizes.items():
    assert size == export.size_of(os.path.join(out, export.FILES[fmt])) > 0
  assert sizes["tflite_int8"] < sizes["tflite"] / 2
  assert saved["files"]["tflite_int8"]["calibration"] == {
      "images": 200,
      "source": "digits training images",
  }


def test_rgb_export_json_has_imagenet_settings():
  _, _, info = exported_random("rgb")
  assert info["channels"] == 3 and info["image_size"] == 23 and info["color"] == "RGB"
  assert info["normalization"]["mean"] == [0.485, 0.456, 0.406]
  assert info["crop_fraction"] == 0.875 and info["dataset"] == "imagenet2012"
  assert info["files"]["tflite_int8"]["calibration"] == {"images": 16, "source": "given images"}
  # The SavedModel holds the weights once (TFLite's batch-1 function is not in it).
  assert info["files"]["saved_model"]["bytes"] < 1.5 * info["files"]["tflite"]["bytes"]


def test_saved_model_matches_jax_any_batch_and_dtype(random_model):
  tf = pytest.importorskip("tensorflow")
  out, _, images, logits = random_model
  loaded = tf.saved_model.load(os.path.join(out, "saved_model"))
  assert set(loaded.signatures) == {
      "serving_default",
      "predict_images_0_255",
      "predict_uint8_images_0_255",
  }
  for batch in (1, 7):
    got = loaded.signatures["serving_default"](images_0_255=tf.constant(images[:batch]))
    assert _max_delta(f"saved_model (batch {batch})", got["logits"].numpy(), logits[:batch]) < (
        LOGIT_TOLERANCE
    )
  got = loaded.signatures["predict_uint8_images_0_255"](
      images_0_255=tf.constant(images[:5].astype(np.uint8))
  )
  assert _max_delta("saved_model uint8", got["logits"].numpy(), logits[:5]) < LOGIT_TOLERANCE
  np.testing.assert_allclose(got["probabilities"].numpy().sum(-1), 1, atol=1e-5)


def test_tflite_float_matches_jax(random_model):
  out, _, images, logits = random_model
  got = _tflite_logits(os.path.join(out, "model.tflite"), images)
  assert _max_delta("tflite", got, logits) < LOGIT_TOLERANCE


def test_onnx_matches_jax(random_model):
  out, info, images, logits = random_model
  if "onnx" not in info["files"]:
    pytest.skip("jax2onnx is not installed")
  onnxruntime = pytest.importorskip("onnxruntime")
  session = onnxruntime.InferenceSession(
      os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"]
  )
  got = np.concatenate(
      [session.run(["logits"], {export.INPUT_NAME: image[None]})[0] for image in images]
  )
  assert _max_delta("onnx", got, logits) < LOGIT_TOLERANCE


def _op_counts(path):
  return collections.Counter(op["op_name"] for op in _tflite(path)._get_ops_details())


def test_tflite_graphs_are_one_fused_op_per_layer(trained):
  """Static shapes: every convolution carries its folded BatchNorm, bias and
  ReLU6; no dynamic broadcasts, no leftover BatchNorm arithmetic (from a
  batch-polymorphic graph the converter kept 117 BROADCAST_TO, 52 MUL and
  54 SUB ops, and int8 agreed with float on 92.5 % of digits)."""
  out = trained[0]
  for name in ("model.tflite", "model_int8.tflite"):
    ops = _op_counts(os.path.join(out, name))
    print(name, dict(ops))
    # 16 expansions, 17 projections and the head; 17 depthwise and the
    # one-channel stem.
    assert ops["CONV_2D"] == 34 and ops["DEPTHWISE_CONV_2D"] == 18
    assert not {"BROADCAST_TO", "SHAPE", "MUL", "MAXIMUM", "MINIMUM"} & set(ops)
    assert ops["ADD"] == 10  # The residual connections.


def test_tflite_int8_meets_the_target(trained):
  """The issue's target: int8 agrees with float top-1 on >= 98 % of the
  digits test set and loses <= 1 point of accuracy."""
  out, _, results, images, labels, logits = trained
  got = _tflite_logits(os.path.join(out, "model_int8.tflite"), images)
  float_top1, int8_top1 = logits.argmax(-1), got.argmax(-1)
  agreement = np.mean(float_top1 == int8_top1)
  float_accuracy, int8_accuracy = np.mean(float_top1 == labels), np.mean(int8_top1 == labels)
  print(
      f"int8: top-1 agreement {agreement:.4f}, accuracy {int8_accuracy:.4f} vs float "
      f"{float_accuracy:.4f}, logits max |delta| {np.abs(got - logits).max():.3f}"
  )
  # The eval's figure, but for one image: evaluation ran the CPU "taps"
  # kernels, export XLA's convolutions, and a near-tie may flip.
  assert float_accuracy == pytest.approx(results["top1"], abs=1 / len(labels) + 1e-9)
  assert agreement >= 0.98
  assert int8_accuracy >= float_accuracy - 0.01


def test_rgb_int8_from_given_calibration_runs():
  _, out, info = exported_random("rgb")
  spec = export.InputSpec.from_json(info)
  runner = _tflite(os.path.join(out, "model_int8.tflite")).get_signature_runner()
  assert runner.get_input_details()[export.INPUT_NAME]["dtype"] == np.uint8
  got = runner(**{export.INPUT_NAME: random_pixels(spec, 1, seed=2).astype(np.uint8)})
  assert got["logits"].shape == (1, 10) and np.isfinite(got["logits"]).all()
  np.testing.assert_allclose(got["probabilities"].sum(), 1, atol=1e-2)


def test_calibration_images_of_another_shape_are_refused(tmp_path):
  checkpoint_path, _, _ = exported_random("digits")
  with pytest.raises(export.ExportError, match=r"shape \(N >= 1, 16, 16, 1\)"):
    export.export(
        checkpoint_path, str(tmp_path), ["tflite_int8"], calibration=np.zeros((4, 16, 16, 3))
    )


def test_settings_without_dataset_name_are_refused(tmp_path):
  checkpoint_path, _, _ = exported_random("digits")
  copy = str(tmp_path / "weights")
  shutil.copytree(checkpoint_path, copy)
  settings = checkpoint.read_settings(copy)
  del settings["config"]["dataset.name"]
  checkpoint.write_settings(copy, settings["config"], settings["class_names"], settings["source"])
  with pytest.raises(export.ExportError, match="lacks dataset.name"):
    export.load_checkpoint(copy)


def _export_cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "mnv2_flax.export", *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )


def test_cli_exports_and_reports_user_errors_in_one_line(tmp_path):
  checkpoint_path, _, _ = exported_random("digits")
  proc = _export_cli(
      f"--checkpoint_path={checkpoint_path}", f"--out={tmp_path}/out", "--format=tflite"
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]).keys() == {"tflite"}
  assert os.path.exists(tmp_path / "out" / "model.tflite")
  proc = _export_cli(f"--checkpoint_path={tmp_path}/nothing", f"--out={tmp_path}/out")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --checkpoint_path")
  proc = _export_cli(f"--checkpoint_path={checkpoint_path}", f"--out={tmp_path}", "--format=keras")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --format: each must be one of")
