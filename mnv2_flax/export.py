"""Exports a trained checkpoint for serving: TF SavedModel, TFLite (float32 and
full-integer int8) and ONNX.

  python -m mnv2_flax.export --checkpoint_path=WORKDIR/checkpoints --out=DIR \
      --format=saved_model,tflite,tflite_int8,onnx

Every exported model takes images at the model's resolution, NHWC, RGB (one
channel for digits and MNIST), pixel values in [0, 255]: the dataset's
normalisation (as the checkpoint's settings.json records it) is inside the
model, so callers never repeat it. The input is
named `images_0_255`; the outputs are `logits` and `probabilities` (a
features model's, model.head="features": `features`). DIR also
gets `export.json` (class names, image size, channels, input range, crop) for
`mnv2_flax.predict --model=...`.

* saved_model: jax2tf (native serialisation, CPU platform) with the XLA
  convolutions, any batch size. Signatures `serving_default` and
  `predict_images_0_255` take float32, `predict_uint8_images_0_255` uint8.
* tflite: float32, batch 1 (TF's converter lowers jax2tf's StableHLO, static
  shapes: one fused convolution + bias + ReLU6 op per layer).
* tflite_int8: full-integer int8, batch 1, uint8 input (scale 1: exact pixel
  values) and float32 outputs, calibrated on training images of the
  checkpoint's dataset (`export(..., calibration=images)` takes others).
* onnx: jax2onnx (optional: see the `export` extra), batch 1.

From Python: `export(checkpoint_path, out, formats, calibration=None)`;
`load_checkpoint` gives the model, its variables and `InputSpec`. Importing
this module defines no absl flag (`define_flags` does, for the command line).

User errors (no checkpoint, unknown format, missing package) print one line
and exit with status 2. TensorFlow, jax2onnx and onnx are imported only here,
and only when needed.
"""

from __future__ import annotations

import dataclasses
import json
import logging as pylogging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from mnv2_flax import checkpoint, cli
from mnv2_flax.cli import fail
from mnv2_flax.errors import ConfigError

INFO_FILE = "export.json"
INPUT_NAME = "images_0_255"
OUTPUT_NAMES = ("logits", "probabilities")
# A features model's (model.head="features") one output: the pooled features.
FEATURES_OUTPUT = "features"
# Format -> file (or directory) name inside --out.
FILES = {
    "saved_model": "saved_model",
    "tflite": "model.tflite",
    "tflite_int8": "model_int8.tflite",
    "onnx": "model.onnx",
}
FORMATS = tuple(FILES)
# Datasets whose evaluation takes the whole image (no centre crop).
_WHOLE_IMAGE_DATASETS = ("digits", "mnist", "cifar10", "synthetic")


class ExportError(ConfigError):
  """An export the user asked for cannot be made (missing package, bad flag)."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What a model expects, and how an arbitrary image becomes that input."""

  image_size: int
  channels: int  # 1 (grayscale) or 3 (RGB).
  mean: tuple[float, ...]  # Normalisation in [0, 1] units, per channel.
  std: tuple[float, ...]
  # Centre crop of this fraction of the shorter side, then resize (eval).
  crop_fraction: float
  dataset: str
  class_names: tuple[str, ...]
  # "crop" (centre crop_fraction, then resize) or "stretch" (the whole image).
  resize: str = "crop"
  head: str = "classifier"  # "features": the model outputs pooled features.

  @property
  def outputs(self) -> tuple[str, ...]:
    return (FEATURES_OUTPUT,) if self.head == "features" else OUTPUT_NAMES

  def to_json(self) -> dict[str, Any]:
    return {
        "image_size": self.image_size,
        "channels": self.channels,
        "color": "L" if self.channels == 1 else "RGB",
        "layout": "NHWC",
        "input_name": INPUT_NAME,
        "input_range": [0, 255],
        # Applied inside the exported model: (x / 255 - mean) / std.
        "normalization": {"mean": list(self.mean), "std": list(self.std), "included": True},
        "crop_fraction": self.crop_fraction,
        "resize": self.resize,
        "dataset": self.dataset,
        "outputs": list(self.outputs),
        "class_names": list(self.class_names),
    }

  @classmethod
  def from_json(cls, info: dict[str, Any]) -> InputSpec:
    return cls(
        image_size=int(info["image_size"]),
        channels=int(info["channels"]),
        mean=tuple(info["normalization"]["mean"]),
        std=tuple(info["normalization"]["std"]),
        crop_fraction=float(info["crop_fraction"]),
        dataset=str(info.get("dataset", "")),
        class_names=tuple(info["class_names"]),
        resize=str(info.get("resize", "crop")),
        head="features" if FEATURES_OUTPUT in info.get("outputs", ()) else "classifier",
    )


def input_spec(
    config: Any, variables: dict[str, Any], class_names: Sequence[str], dataset: str
) -> InputSpec:
  """The InputSpec of a loaded checkpoint: `config` carries its settings
  (dataset.mean/std as the data was really normalised), `dataset` is the
  settings' dataset.name."""
  channels = int(variables["params"]["stem"]["kernel"].shape[2])
  size = config.dataset.image_size
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
  if len(mean) != channels or len(std) != channels:
    raise ExportError(
        f"dataset.mean {mean} / dataset.std {std} need {channels} entries (one per channel)"
    )
  crop = 1.0 if dataset in _WHOLE_IMAGE_DATASETS else float(config.dataset.eval_crop_fraction)
  head = config.model.get("head", "classifier")
  names = tuple(class_names) or tuple(str(i) for i in range(config.dataset.num_classes))
  resize = config.dataset.get("eval_resize", "crop")
  return InputSpec(
      size, channels, mean, std, crop, dataset, () if head == "features" else names, resize, head
  )


def load_checkpoint(checkpoint_path: str) -> tuple[Any, dict[str, Any], Any, InputSpec]:
  """(model with XLA convolutions, variables, config, InputSpec) of the newest
  checkpoint in CHECKPOINT_PATH, as its settings.json records them."""
  model, variables, config, class_names = checkpoint.load_model(checkpoint_path, conv_impl="xla")
  settings = checkpoint.read_settings(checkpoint_path) or {}
  dataset = settings.get("config", {}).get("dataset.name")
  if not dataset:
    raise ExportError(
        f"{checkpoint_path}/{checkpoint.SETTINGS_FILE} lacks dataset.name (written before "
        "settings recorded it): add it, and the dataset.mean/std the data had, by hand"
    )
  config.dataset.name = dataset
  return model, variables, config, input_spec(config, variables, class_names, dataset)


def fold_batch_norm(variables: dict[str, Any], epsilon: float) -> dict[str, Any]:
  """Variables computing the same inference function with every BatchNorm
  folded into the convolution before it (`models.conv_norm` names them CONV
  and CONV_bn; the depthwise ones too): the kernel takes the per-channel
  scale and the BatchNorm is left adding a bias. Every exported graph is
  then one convolution + bias per layer. (TFLite's converter also folds
  them itself from a static-shape graph: int8 measured the same either way;
  from a batch-polymorphic one it folded nothing, see `_tflite_module`.)"""
  params = jax.tree.map(np.asarray, variables["params"])
  stats = jax.tree.map(np.asarray, variables["batch_stats"])

  def fold(params: dict[str, Any], stats: dict[str, Any]) -> tuple[dict, dict]:
    params, stats = dict(params), dict(stats)
    for name in list(params):
      if name.endswith("_bn") and name[:-3] in params and "kernel" in params[name[:-3]]:
        bn, running = params[name], stats[name]
        factor = bn["scale"] / np.sqrt(running["var"] + epsilon)
        conv = dict(params[name[:-3]])
        conv["kernel"] = (conv["kernel"] * factor).astype(np.float32)
        params[name[:-3]] = conv
        params[name] = {
            "scale": np.ones_like(bn["scale"]),
            "bias": (bn["bias"] - running["mean"] * factor).astype(np.float32),
        }
        stats[name] = {
            "mean": np.zeros_like(running["mean"]),
            "var": np.full_like(running["var"], 1 - epsilon),
        }
      elif isinstance(params[name], dict) and name in stats:
        params[name], stats[name] = fold(params[name], stats[name])
    return params, stats

  params, stats = fold(params, stats)
  return {"params": params, "batch_stats": stats}


def serving_function(
    model: Any, variables: dict[str, Any], spec: InputSpec, *, fold: bool = True
) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
  """images (N, H, W, C) in [0, 255], any dtype -> (logits, probabilities),
  or (features,) of a features model (`spec.outputs` names them); the
  normalisation of `spec` included, inference mode, BatchNorm folded into
  the convolutions unless `fold` is False."""
  mean = np.asarray(spec.mean, np.float32) * 255
  std = np.asarray(spec.std, np.float32) * 255
  if fold:
    variables = fold_batch_norm(variables, model.bn_epsilon)
  variables = jax.tree.map(jnp.asarray, variables)

  def predict(images: jax.Array) -> tuple[jax.Array, ...]:
    x = (images.astype(jnp.float32) - mean) / std
    out = model.apply(variables, x, train=False).astype(jnp.float32)
    if model.head == "features":
      return (out,)
    return out, jax.nn.softmax(out)

  return predict


def calibration_images(config: Any, spec: InputSpec, count: int) -> np.ndarray:
  """`count` training images of the checkpoint's dataset as [0, 255] pixels
  at the model's resolution (int8 calibration), through the training input
  pipeline (augmentations included): its uint8 pixels, or its float32 ones
  with the normalisation undone."""
  from mnv2_flax import datasets  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.dataset.name = spec.dataset
  config.global_batch_size = min(config.global_batch_size, count)
  dataset = datasets.create_dataset(config, process_index=0, process_count=1)
  mean = np.asarray(spec.mean, np.float32)
  std = np.asarray(spec.std, np.float32)
  images, size = [], spec.image_size
  for batch in dataset.train_batches(0):
    x = np.asarray(batch["image"], np.float32)
    if x.shape[1:3] != (size, size):
      x = np.asarray(jax.image.resize(x, (len(x), size, size, x.shape[3]), "bilinear"))
    if batch["image"].dtype != np.uint8:  # Normalised (in-memory datasets): undone.
      x = np.clip((x * std + mean) * 255, 0, 255)
    images.append(x)
    if sum(len(i) for i in images) >= count:
      break
  return np.concatenate(images)[:count]


# ------------------------------------------------------------------------------
# Formats.
# ------------------------------------------------------------------------------


def _import_tf() -> Any:
  try:
    return cli.import_tensorflow()
  except ImportError as e:
    raise ExportError(f"SavedModel and TFLite export need TensorFlow ({e})") from e


def _tf_module(predict: Callable[..., Any], spec: InputSpec) -> Any:
  """A tf.Module (the SavedModel) with `serve` (float32, any batch) and
  `serve_uint8` tf.functions of `predict`."""
  tf = _import_tf()
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  shape = (spec.image_size, spec.image_size, spec.channels)
  converted = jax2tf.convert(
      predict,
      polymorphic_shapes=[f"(b, {', '.join(map(str, shape))})"],
      native_serialization_platforms=("cpu",),
      with_gradient=False,
  )
  module = tf.Module()
  module.serve = tf.function(
      lambda images: dict(zip(spec.outputs, converted(images))),
      input_signature=[tf.TensorSpec((None, *shape), tf.float32, name=INPUT_NAME)],
      autograph=False,
  )
  # Calls `serve`, so the SavedModel holds the weights once for both.
  module.serve_uint8 = tf.function(
      lambda images: module.serve(tf.cast(images, tf.float32)),
      input_signature=[tf.TensorSpec((None, *shape), tf.uint8, name=INPUT_NAME)],
      autograph=False,
  )
  return module


def _tflite_module(predict: Callable[..., Any], spec: InputSpec) -> Any:
  """A tf.Module with `serve_batch1` (float32, batch 1), what TFLite converts.

  Converted with static shapes, apart from the SavedModel's function: from a
  batch-polymorphic one, TFLite's converter keeps every broadcast dynamic
  (BROADCAST_TO, SHAPE, GATHER ops), folds no constant and fuses no
  convolution with its bias and ReLU6, and int8 then quantises every
  intermediate apart (measured on the digits test model: 92.5 % top-1
  agreement with float, 98.3 % with static shapes)."""
  tf = _import_tf()
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  shape = (1, spec.image_size, spec.image_size, spec.channels)
  converted = jax2tf.convert(predict, native_serialization_platforms=("cpu",), with_gradient=False)
  module = tf.Module()
  module.serve_batch1 = tf.function(
      lambda images: dict(zip(spec.outputs, converted(images))),
      input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)],
      autograph=False,
  )
  return module


def export_saved_model(module: Any, path: str) -> None:
  tf = _import_tf()
  signatures = {
      "serving_default": module.serve,
      f"predict_{INPUT_NAME}": module.serve,
      f"predict_uint8_{INPUT_NAME}": module.serve_uint8,
  }
  tf.saved_model.save(module, path, signatures=signatures)


def export_tflite(module: Any, path: str, calibration: np.ndarray | None = None) -> None:
  """Float32 TFLite of `_tflite_module`'s function, or full-integer int8 when
  `calibration` images ([0, 255], the model's shape) are given."""
  tf = _import_tf()
  function = module.serve_batch1.get_concrete_function()
  converter = tf.lite.TFLiteConverter.from_concrete_functions([function], module)
  if calibration is not None:

    def representative() -> Iterator[dict[str, np.ndarray]]:
      for image in calibration:
        yield {INPUT_NAME: image[None].astype(np.float32)}

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.float32
  content = converter.convert()
  with open(path + ".tmp", "wb") as f:
    f.write(content)
  os.replace(path + ".tmp", path)


def _float32_constants(model: Any) -> None:
  """jax2onnx 0.17 writes the weak-typed scalars of relu6 (`min(x, 6)`) as
  float64 constants, which onnxruntime rejects next to float32 tensors;
  casts them (and the value types it declared for them) to float32."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top

  double, single = onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT
  graph = model.graph
  for init in graph.initializer:
    if init.data_type == double:
      array = numpy_helper.to_array(init).astype(np.float32)
      init.CopyFrom(numpy_helper.from_array(array, init.name))
  for value in [*graph.value_info, *graph.input, *graph.output]:
    if value.type.tensor_type.elem_type == double:
      value.type.tensor_type.elem_type = single


def export_onnx(predict: Callable[..., Any], spec: InputSpec, path: str) -> None:
  """ONNX via jax2onnx, batch 1 (a symbolic batch fails in its lowering of
  the convolutions' padding)."""
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
    import onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ExportError(
        f"--format=onnx needs jax2onnx and onnx ({e}); install them with "
        "`pip install onnx onnx-ir && pip install --no-deps jax2onnx==0.17.1` "
        "(see the export extra in pyproject.toml)"
    ) from e
  # It logs each plugin it cannot import (equinox, dm-pix examples) with a traceback.
  pylogging.getLogger("jax2onnx").setLevel(pylogging.ERROR)
  shape = (1, spec.image_size, spec.image_size, spec.channels)
  model = jax2onnx.to_onnx(
      predict,
      [jax.ShapeDtypeStruct(shape, jnp.float32)],
      model_name="mobilenet_v2",
      input_names=[INPUT_NAME],
      output_names=list(spec.outputs),
  )
  _float32_constants(model)
  onnx.checker.check_model(model, full_check=True)
  onnx.save(model, path + ".tmp")
  os.replace(path + ".tmp", path)


def size_of(path: str) -> int:
  """Bytes of a file, or of every file under a directory."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(
      os.path.getsize(os.path.join(root, name))
      for root, _, names in os.walk(path)
      for name in names
  )


def export(
    checkpoint_path: str,
    out: str,
    formats: Sequence[str] = FORMATS,
    *,
    calibration: np.ndarray | None = None,
    calibration_count: int = 200,
) -> dict[str, Any]:
  """Exports the newest checkpoint in CHECKPOINT_PATH as `formats` into OUT,
  writes OUT/export.json and returns its content (files with their sizes).

  tflite_int8 is calibrated on `calibration` when given: images (N, H, W, C)
  at the model's resolution and channels, pixel values in [0, 255] (e.g.
  random ones for weights without their dataset); otherwise on
  `calibration_count` training images of the checkpoint's dataset.
  Raises ExportError (a ConfigError) for unknown formats, missing packages
  or calibration images of the wrong shape, CheckpointError for a missing
  or unusable checkpoint."""
  unknown = [f for f in formats if f not in FORMATS]
  if unknown or not formats:
    raise ExportError(f"--format: each must be one of {', '.join(FORMATS)}, got {list(formats)}")
  model, variables, config, spec = load_checkpoint(checkpoint_path)
  expected = (spec.image_size, spec.image_size, spec.channels)
  if calibration is not None:
    calibration = np.asarray(calibration, np.float32)
    if calibration.ndim != 4 or calibration.shape[1:] != expected or not len(calibration):
      raise ExportError(
          f"calibration images must have shape (N >= 1, {', '.join(map(str, expected))}), "
          f"got {calibration.shape}"
      )
  predict = serving_function(model, variables, spec)
  os.makedirs(out, exist_ok=True)
  files = {}
  tflite_module = None
  for fmt in formats:
    path = os.path.join(out, FILES[fmt])
    files[fmt] = {"path": FILES[fmt]}
    if fmt == "onnx":
      export_onnx(predict, spec, path)
    elif fmt == "saved_model":
      export_saved_model(_tf_module(predict, spec), path)
    else:
      tflite_module = tflite_module or _tflite_module(predict, spec)
      if fmt == "tflite":
        export_tflite(tflite_module, path)
      else:
        if calibration is None:
          images = calibration_images(config, spec, calibration_count)
          source = f"{spec.dataset} training images"
        else:
          images, source = calibration, "given images"
        export_tflite(tflite_module, path, images)
        files[fmt]["calibration"] = {"images": len(images), "source": source}
    files[fmt]["bytes"] = size_of(path)
    logging.info("Exported %s: %s (%d bytes)", fmt, path, files[fmt]["bytes"])
  info = {
      "format_version": 1,
      "checkpoint_path": os.path.abspath(checkpoint_path),
      **spec.to_json(),
      "files": files,
  }
  checkpoint.write_json(os.path.join(out, INFO_FILE), info)
  return info


# ------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined when run, not on import: predict, zoo and the tests import
  this module."""
  flags.DEFINE_string("checkpoint_path", None, "A checkpoints directory (WORKDIR/checkpoints).")
  flags.DEFINE_string("out", None, "Directory for the exported files and export.json.")
  flags.DEFINE_list(
      "format", ["saved_model", "tflite"], f"Comma-separated, of {', '.join(FORMATS)}."
  )
  flags.DEFINE_integer(
      "calibration_images", 200, "Training images that calibrate int8.", lower_bound=1
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.checkpoint_path or not FLAGS.out:
    fail("--checkpoint_path and --out are required")
  info = export(
      FLAGS.checkpoint_path,
      FLAGS.out,
      FLAGS.format,
      calibration_count=FLAGS.calibration_images,
  )
  for fmt, file in info["files"].items():
    print(f"{fmt}: {os.path.join(FLAGS.out, file['path'])} ({file['bytes'] / 1e6:.2f} MB)")
  print(json.dumps({fmt: file["bytes"] for fmt, file in info["files"].items()}))


def run() -> None:
  """Entry point of `python -m mnv2_flax.export`."""
  define_flags()
  cli.run(main, quiet=True)


if __name__ == "__main__":
  run()
