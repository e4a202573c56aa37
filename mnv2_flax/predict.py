"""Classifies image files with a checkpoint or an exported model: top-k class
names with probabilities.

  python -m mnv2_flax.predict --checkpoint_path=WORKDIR/checkpoints IMAGE...
  python -m mnv2_flax.predict --model=EXPORT_DIR/model.tflite --json IMAGE...

--model takes what `mnv2_flax.export` wrote: a SavedModel directory, a
.tflite or an .onnx file, with export.json beside it. Images are decoded,
converted, centre-cropped and resized by `images.eval_image`, exactly as
evaluation does (every format Pillow reads, converted by the rule in
mnv2_flax/images.py), pixel values in [0, 255]; the model normalises them.
An unreadable image prints a one-line error and the others are still
predicted (exit status 1); usage errors exit with status 2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags

from mnv2_flax import cli, export, images
from mnv2_flax.cli import fail
from mnv2_flax.errors import ConfigError

EXIT_IMAGE_ERROR = 1


def load_image(path: str, spec: export.InputSpec) -> np.ndarray:
  """An image file as the model's input, exactly as evaluation makes it
  (`images.eval_image`): uint8 (size, size, channels). Raises OSError for a
  missing file, images.DecodeError (a ValueError) for an undecodable one."""
  with open(path, "rb") as f:
    data = f.read()
  return images.eval_image(
      data, image_size=spec.image_size, crop_fraction=spec.crop_fraction, channels=spec.channels
  )


def read_export_info(model_path: str) -> dict[str, Any]:
  """export.json beside an exported file (or inside/beside a SavedModel dir)."""
  candidates = [os.path.join(os.path.dirname(os.path.abspath(model_path)), export.INFO_FILE)]
  if os.path.isdir(model_path):
    candidates.insert(0, os.path.join(model_path, export.INFO_FILE))
  for path in candidates:
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
  raise ConfigError(f"--model {model_path}: no {export.INFO_FILE} beside it (write it with export)")


class Predictor:
  """Probabilities of images (N, size, size, channels) in [0, 255] from a
  checkpoint (JAX) or an exported model (TF, LiteRT, onnxruntime)."""

  def __init__(self, spec: export.InputSpec, run: Callable[[np.ndarray], np.ndarray], kind: str):
    self.spec = spec
    self.kind = kind
    self._run = run

  @classmethod
  def from_checkpoint(cls, checkpoint_path: str) -> Predictor:
    import jax  # pylint: disable=g-import-not-at-top

    model, variables, _, spec = export.load_checkpoint(checkpoint_path)
    predict = jax.jit(export.serving_function(model, variables, spec))
    return cls(spec, lambda images: np.asarray(predict(images)[1]), "checkpoint")

  @classmethod
  def from_exported(cls, model_path: str) -> Predictor:
    """A SavedModel directory, a .tflite or an .onnx file from export."""
    if not os.path.exists(model_path):
      raise ConfigError(f"--model {model_path} does not exist")
    spec = export.InputSpec.from_json(read_export_info(model_path))
    if os.path.isdir(model_path):
      return cls(spec, _saved_model_runner(model_path), "saved_model")
    if model_path.endswith(".tflite"):
      return cls(spec, _tflite_runner(model_path), "tflite")
    if model_path.endswith(".onnx"):
      return cls(spec, _onnx_runner(model_path), "onnx")
    raise ConfigError(f"--model {model_path}: expected a SavedModel directory, .tflite or .onnx")

  def predict(self, images: np.ndarray) -> np.ndarray:
    """(N, classes) probabilities of images in [0, 255] at the model's size."""
    images = np.asarray(images, np.float32)
    expected = (self.spec.image_size, self.spec.image_size, self.spec.channels)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(f"images must have shape (N, {', '.join(map(str, expected))})")
    return self._run(images)

  def predict_files(self, paths: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({path: probabilities}, {path: one-line error}) for image files."""
    pixels, errors = {}, {}
    for path in paths:
      try:
        pixels[path] = load_image(path, self.spec)
      except (OSError, images.DecodeError) as e:
        errors[path] = " ".join(str(e).split()) or type(e).__name__
    results = {}
    if pixels:
      probabilities = self.predict(np.stack(list(pixels.values())))
      results = dict(zip(pixels, probabilities))
    return results, errors

  def top_k(self, probabilities: np.ndarray, k: int = 5) -> list[tuple[str, int, float]]:
    """[(class name, index, probability)] of the k most probable classes."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    names = self.spec.class_names
    return [
        (names[i] if i < len(names) else str(i), int(i), float(probabilities[i])) for i in order
    ]


def _saved_model_runner(path: str) -> Callable[[np.ndarray], np.ndarray]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  serve = tf.saved_model.load(path).signatures["serving_default"]
  return lambda images: serve(**{export.INPUT_NAME: tf.constant(images)})["probabilities"].numpy()


def _tflite_runner(path: str) -> Callable[[np.ndarray], np.ndarray]:
  """Runs a batch-1 TFLite model image by image; an int8 model's uint8
  input is quantised with its own scale and zero point."""
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f"--model {path}: running TFLite needs ai-edge-litert ({e})") from e
  interpreter = Interpreter(model_path=path)
  runner = interpreter.get_signature_runner()
  details = runner.get_input_details()[export.INPUT_NAME]

  def run(images: np.ndarray) -> np.ndarray:
    out = []
    for image in images:
      x = image[None]
      if details["dtype"] != np.float32:
        scale, zero = details["quantization"]
        info = np.iinfo(details["dtype"])
        x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(details["dtype"])
      out.append(runner(**{export.INPUT_NAME: x})["probabilities"][0])
    return np.stack(out).astype(np.float32)

  return run


def _onnx_runner(path: str) -> Callable[[np.ndarray], np.ndarray]:
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f"--model {path}: running ONNX needs onnxruntime ({e})") from e
  session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

  def run(images: np.ndarray) -> np.ndarray:
    outputs = [
        session.run(["probabilities"], {export.INPUT_NAME: image[None]})[0][0] for image in images
    ]
    return np.stack(outputs)

  return run


# ------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined when run, not on import (export's flags share names)."""
  flags.DEFINE_string("checkpoint_path", None, "A checkpoints directory (WORKDIR/checkpoints).")
  flags.DEFINE_string("model", None, "An exported SavedModel directory, .tflite or .onnx file.")
  flags.DEFINE_integer("top_k", 5, "How many classes to print per image.", lower_bound=1)
  flags.DEFINE_bool("json", False, "Print one JSON document instead of text.")


def main(argv: list[str]) -> None:
  paths = argv[1:]
  if bool(FLAGS.checkpoint_path) == bool(FLAGS.model):
    fail("give exactly one of --checkpoint_path and --model")
  if not paths:
    fail("no image files given")
  if FLAGS.checkpoint_path:
    predictor = Predictor.from_checkpoint(FLAGS.checkpoint_path)
  else:
    predictor = Predictor.from_exported(FLAGS.model)
  results, errors = predictor.predict_files(paths)
  for path, message in errors.items():
    print(f"error: {path}: {message}", file=sys.stderr)
  report = []
  for path in paths:
    if path in results:
      top = predictor.top_k(results[path], FLAGS.top_k)
      report.append(
          {
              "image": path,
              "top": [{"class": n, "index": i, "probability": p} for n, i, p in top],
          }
      )
  if FLAGS.json:
    print(json.dumps({"predictions": report, "errors": errors}))
  else:
    for entry in report:
      print(entry["image"])
      for item in entry["top"]:
        print(f"  {item['probability']:.4f}  {item['class']}")
  sys.exit(EXIT_IMAGE_ERROR if errors else 0)


def run() -> None:
  """Entry point of `python -m mnv2_flax.predict`."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
