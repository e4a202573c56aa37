"""Classifies image files with a checkpoint or an exported model: top-k class
names with probabilities.

  python -m mnv2_flax.predict --checkpoint_path=WORKDIR/checkpoints IMAGE...
  python -m mnv2_flax.predict --model=EXPORT_DIR/model.tflite --json IMAGE...
  python -m mnv2_flax.predict --checkpoint_path=DIR --embeddings=FEATURES.npy IMAGE...

--model takes what `mnv2_flax.export` wrote: a SavedModel directory, a
.tflite or an .onnx file, with export.json beside it. Images are decoded,
converted, centre-cropped (or, as the settings say for Keras fine-tunes,
resized whole) and resized by `images.eval_image`, exactly as evaluation does
(every format Pillow reads, converted by the rule in mnv2_flax/images.py),
pixel values in [0, 255]; the model normalises them. --embeddings writes the
pooled features (a features model's output, a classifier's input) as .npy.
Only the answer and warnings are printed unless --verbosity is given.
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
  (`images.eval_image`, centre-cropped or, for a Keras fine-tune, the whole
  image resized): uint8 (size, size, channels). Raises OSError for a
  missing file, images.DecodeError (a ValueError) for an undecodable one."""
  with open(path, "rb") as f:
    data = f.read()
  return images.eval_image(
      data,
      image_size=spec.image_size,
      crop_fraction=spec.crop_fraction,
      channels=spec.channels,
      resize=spec.resize,
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


Outputs = dict[str, np.ndarray]


class Predictor:
  """Probabilities (or a features model's features) of images (N, size,
  size, channels) in [0, 255] from a checkpoint (JAX) or an exported model
  (TF, LiteRT, onnxruntime)."""

  def __init__(
      self,
      spec: export.InputSpec,
      run: Callable[[np.ndarray], Outputs],
      kind: str,
      embed: Callable[[np.ndarray], np.ndarray] | None = None,
  ):
    self.spec = spec
    self.kind = kind
    self._run = run
    self._embed = embed

  @classmethod
  def from_checkpoint(cls, checkpoint_path: str) -> Predictor:
    import jax  # pylint: disable=g-import-not-at-top

    model, variables, _, spec = export.load_checkpoint(checkpoint_path)
    predict = jax.jit(export.serving_function(model, variables, spec))
    run = lambda images: dict(zip(spec.outputs, map(np.asarray, predict(images))))  # noqa: E731
    embed = None
    if model.head != "features":  # The pooled features the classifier takes.
      features = model.clone(head="features")
      embedding = jax.jit(export.serving_function(features, variables, spec))
      embed = lambda images: np.asarray(embedding(images)[0])  # noqa: E731
    return cls(spec, run, "checkpoint", embed)

  @classmethod
  def from_exported(cls, model_path: str) -> Predictor:
    """A SavedModel directory, a .tflite or an .onnx file from export."""
    if not os.path.exists(model_path):
      raise ConfigError(f"--model {model_path} does not exist")
    spec = export.InputSpec.from_json(read_export_info(model_path))
    if os.path.isdir(model_path):
      return cls(spec, _saved_model_runner(model_path, spec), "saved_model")
    if model_path.endswith(".tflite"):
      return cls(spec, _tflite_runner(model_path, spec), "tflite")
    if model_path.endswith(".onnx"):
      return cls(spec, _onnx_runner(model_path, spec), "onnx")
    raise ConfigError(f"--model {model_path}: expected a SavedModel directory, .tflite or .onnx")

  @property
  def has_classes(self) -> bool:
    return self.spec.head != "features"

  def _check(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    expected = (self.spec.image_size, self.spec.image_size, self.spec.channels)
    if images.ndim != 4 or images.shape[1:] != expected:
      raise ValueError(f"images must have shape (N, {', '.join(map(str, expected))})")
    return images

  def predict(self, images: np.ndarray) -> np.ndarray:
    """(N, classes) probabilities of images in [0, 255] at the model's size."""
    if not self.has_classes:
      raise ConfigError("a features model (model.head='features') has no classes: --embeddings")
    return self._run(self._check(images))["probabilities"]

  def embeddings(self, images: np.ndarray) -> np.ndarray:
    """(N, features) pooled features (what the classifier takes) of images
    in [0, 255]: a features model's output, or a checkpoint's classifier
    input. An exported classifier has no such output."""
    images = self._check(images)
    if not self.has_classes:
      return self._run(images)[export.FEATURES_OUTPUT]
    if self._embed is None:
      raise ConfigError(
          f"--embeddings: this {self.kind} model outputs classes only; use its checkpoint "
          "(--checkpoint_path) or export a features model (model.head='features')"
      )
    return self._embed(images)

  def read_files(self, paths: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({path: uint8 pixels}, {path: one-line error}) for image files."""
    pixels, errors = {}, {}
    for path in paths:
      try:
        pixels[path] = load_image(path, self.spec)
      except (OSError, images.DecodeError) as e:
        errors[path] = " ".join(str(e).split()) or type(e).__name__
    return pixels, errors

  def predict_files(self, paths: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({path: probabilities}, {path: one-line error}) for image files."""
    pixels, errors = self.read_files(paths)
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


def _saved_model_runner(path: str, spec: export.InputSpec) -> Callable[[np.ndarray], Outputs]:
  tf = cli.import_tensorflow()
  serve = tf.saved_model.load(path).signatures["serving_default"]

  def run(images: np.ndarray) -> Outputs:
    out = serve(**{export.INPUT_NAME: tf.constant(images)})
    return {name: out[name].numpy() for name in spec.outputs}

  return run


def _tflite_runner(path: str, spec: export.InputSpec) -> Callable[[np.ndarray], Outputs]:
  """Runs a batch-1 TFLite model image by image; an int8 model's uint8
  input is quantised with its own scale and zero point."""
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f"--model {path}: running TFLite needs ai-edge-litert ({e})") from e
  interpreter = Interpreter(model_path=path)
  runner = interpreter.get_signature_runner()
  details = runner.get_input_details()[export.INPUT_NAME]

  def run(images: np.ndarray) -> Outputs:
    out = {name: [] for name in spec.outputs}
    for image in images:
      x = image[None]
      if details["dtype"] != np.float32:
        scale, zero = details["quantization"]
        info = np.iinfo(details["dtype"])
        x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(details["dtype"])
      result = runner(**{export.INPUT_NAME: x})
      for name in spec.outputs:
        out[name].append(result[name][0])
    return {name: np.stack(values).astype(np.float32) for name, values in out.items()}

  return run


def _onnx_runner(path: str, spec: export.InputSpec) -> Callable[[np.ndarray], Outputs]:
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f"--model {path}: running ONNX needs onnxruntime ({e})") from e
  session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

  def run(images: np.ndarray) -> Outputs:
    results = [
        session.run(list(spec.outputs), {export.INPUT_NAME: image[None]}) for image in images
    ]
    return {
        name: np.stack([result[i][0] for result in results]) for i, name in enumerate(spec.outputs)
    }

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
  flags.DEFINE_string(
      "embeddings",
      None,
      "Write the images' pooled features (N, features), in the order given, unreadable ones "
      "left out, to this .npy file (a features model prints no classes).",
  )


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
  if not predictor.has_classes and not FLAGS.embeddings:
    fail("a features model (model.head='features') has no classes: give --embeddings=FILE.npy")
  pixels, errors = predictor.read_files(paths)
  for path, message in errors.items():
    print(f"error: {path}: {message}", file=sys.stderr)
  results = {}
  if pixels and predictor.has_classes:
    results = dict(zip(pixels, predictor.predict(np.stack(list(pixels.values())))))
  if FLAGS.embeddings:
    batch = np.stack(list(pixels.values())) if pixels else None
    vectors = predictor.embeddings(batch) if batch is not None else np.zeros((0, 0), np.float32)
    np.save(FLAGS.embeddings, vectors.astype(np.float32))
    if not FLAGS.json:
      print(f"Wrote {FLAGS.embeddings}: {vectors.shape[0]} images x {vectors.shape[-1]} features")
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
    document = {"predictions": report, "errors": errors}
    if FLAGS.embeddings:
      document["embeddings"] = {"path": FLAGS.embeddings, "images": list(pixels)}
    print(json.dumps(document))
  else:
    for entry in report:
      print(entry["image"])
      for item in entry["top"]:
        print(f"  {item['probability']:.4f}  {item['class']}")
  sys.exit(EXIT_IMAGE_ERROR if errors else 0)


def run() -> None:
  """Entry point of `python -m mnv2_flax.predict`."""
  define_flags()
  cli.run(main, quiet=True)


if __name__ == "__main__":
  run()
