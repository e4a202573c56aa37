"""The models of the export and predict tests, and their exports, made once
per test process and shared by both files.

* `trained_digits`: a digits model trained once and cached (the smoke
  config's 8 steps learn nothing worth exporting): int8 agreement and
  prediction, and test_train.py's checks. 300 steps of configs/smoke.py
  (label smoothing 0.1) reach ~97 % test top-1 in under a minute on 2 cores.
  Trained once for every test process (conftest.cached), into the
  compilation cache's directory (the repository's git-ignored .jax_cache by
  default), keyed by the config, the CPU and the source of everything that
  shapes the weights or their settings, so a change of that code trains
  afresh.
* `random_checkpoint`: randomly initialised weights with randomised BatchNorm
  (digits-shaped, and RGB with ImageNet's settings), whose logits are a few
  units: float equivalence within an absolute 1e-4 (a trained model's logits
  reach ~150, where float32 round-off alone exceeds it).
* `exported_digits`, `exported_random`: their exports, made once.
"""

import atexit
import functools
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from mnv2_flax import checkpoint, config_lib, data, export, models

from conftest import cached, source_key, tiny_config

STEPS = 300
# Everything that shapes the weights or the settings.json beside them.
_SOURCES = (
    "models.py",
    "layers.py",
    "cpu_kernels.py",
    "train.py",
    "data.py",
    "datasets.py",
    "config_lib.py",
    "checkpoint.py",
)


def training_config():
  # Label smoothing: ~97 % top-1 (~94 % without) and fewer near-ties between
  # the top two logits, which int8 may swap (agreement with float measured
  # 98.6-99.2 % over 100-800 calibration images; 97.2-99.2 % without).
  return tiny_config(
      num_train_steps=STEPS,
      log_every_steps=100,
      checkpoint_every_steps=STEPS,
      best_metric="",
      **{"optimizer.label_smoothing": 0.1},
  )


@functools.cache
def trained_digits() -> tuple[str, dict]:
  """(checkpoints directory, results) of the cached digits model."""
  from mnv2_flax import train  # pylint: disable=g-import-not-at-top

  config = training_config()
  target = cached(
      "digits",
      source_key(str(config), sources=_SOURCES),
      lambda workdir: train.train_and_evaluate(config, workdir),
  )
  with open(os.path.join(target, "results.json")) as f:
    return os.path.join(target, "checkpoints"), json.load(f)


@functools.cache
def digits_test_pixels(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The digits test split as the exported models take it: [0, 255] pixel
  values at `image_size` (load_digits' images with its normalisation undone)."""
  _, (images, labels) = data.load_digits(image_size)
  (mean,), (std,) = data.digits_normalization(image_size)
  return np.clip((images * std + mean) * 255, 0, 255).astype(np.float32), labels


# name -> (config overrides, input channels, dataset normalisation or None).
# 11 blocks of the paper's 17, residual ones among them: every kind of layer
# an export converts, in two thirds of the graph.
_DEPTH = {"model.depth_multiplier": 0.5}
RANDOM_MODELS = {
    # As the smoke config trains it: 16x16, one channel, digits' statistics.
    "digits": (_DEPTH, 1, True),
    # ImageNet's settings (RGB, its mean/std, centre crop), an odd size with
    # TF padding.
    "rgb": (
        {
            "dataset.name": "imagenet2012",
            "dataset.image_size": 23,
            "model.padding": "tf_same",
            **_DEPTH,
        },
        3,
        False,
    ),
}


def _temporary_directory(prefix: str) -> str:
  directory = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  return directory


@functools.cache
def random_checkpoint(name: str) -> str:
  """A weights-only checkpoint (with settings.json) of random weights, as
  `mnv2_flax.convert` writes; `name` is a key of RANDOM_MODELS. The
  BatchNorm statistics are those of a batch of images (so that every layer
  stays alive: with the initial ones the network's output is constant),
  then randomised, as are the BatchNorm scales and offsets. Logits are a
  few units."""
  overrides, channels, digits = RANDOM_MODELS[name]
  config = tiny_config(**overrides)
  size = config.dataset.image_size
  config.model.conv_impl = "xla"
  config.model.bn_momentum = 0.0  # The running statistics become the batch's.
  model = models.create_model(config.model, 10)
  rng = np.random.default_rng(1)
  if digits:
    normalization = data.digits_normalization(size)
    (images, _), _ = data.load_digits(size)
    images = images[:256]
  else:
    normalization = None
    images = rng.normal(0, 1, (256, size, size, channels)).astype(np.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      models.random_weights_key(1), images[:1]
  )
  _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
      variables, images, rngs={"dropout": jax.random.PRNGKey(0)}
  )
  variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}

  def randomise(path, x):
    x, leaf = np.asarray(x), getattr(path[-1], "key", "")
    if leaf in ("mean", "bias") and getattr(path[-2], "key", "") != "classifier":
      return x + rng.normal(0, 0.1, x.shape).astype(np.float32)
    if leaf in ("var", "scale"):
      return x * rng.uniform(0.7, 1.4, x.shape).astype(np.float32)
    return x

  variables = jax.tree_util.tree_map_with_path(randomise, variables)
  directory = os.path.join(_temporary_directory(f"mnv2-{name}-"), "weights")
  checkpoint.save_variables(
      directory,
      variables,
      config_lib.settings_of(config, 10, normalization),
      [f"class{i}" for i in range(10)],
      source="test",
  )
  return directory


def random_pixels(spec: export.InputSpec, count: int, seed: int = 0) -> np.ndarray:
  """`count` random images as the exported models take them (whole pixel values)."""
  shape = (count, spec.image_size, spec.image_size, spec.channels)
  return np.random.default_rng(seed).integers(0, 256, shape).astype(np.float32)


@functools.cache
def exported_random(name: str) -> tuple[str, str, dict]:
  """(checkpoint, export directory, export.json content) of `random_checkpoint(name)`
  exported as SavedModel, float TFLite and ONNX (when jax2onnx is installed),
  and the RGB one also as int8 calibrated on given random images."""
  checkpoint_path = random_checkpoint(name)
  formats = ["saved_model", "tflite"]
  if has_module("jax2onnx") and has_module("onnx"):
    formats.append("onnx")
  calibration = None
  if name == "rgb":
    _, _, _, spec = export.load_checkpoint(checkpoint_path)
    formats.append("tflite_int8")
    calibration = random_pixels(spec, 16, seed=1)
  out = _temporary_directory(f"mnv2-export-{name}-")
  return checkpoint_path, out, export.export(checkpoint_path, out, formats, calibration=calibration)


@functools.cache
def exported_digits() -> tuple[str, dict]:
  """(export directory, export.json content) of the trained digits model as
  float and int8 TFLite (calibrated on digits training images)."""
  checkpoint_path, _ = trained_digits()
  out = _temporary_directory("mnv2-export-digits-")
  return out, export.export(checkpoint_path, out, ["tflite", "tflite_int8"])


def has_module(name: str) -> bool:
  try:
    __import__(name)
  except ImportError:
    return False
  return True
