"""A digits model trained once and cached: the shared subject of the export
and predict tests (the smoke config's 8 steps learn nothing worth exporting).

300 steps of configs/smoke.py reach ~94 % test top-1 in about a minute on 2
cores. The result is kept under the repository's git-ignored .jax_cache, keyed
by the config and by the source of everything that shapes the weights, so a
change of the model or training code trains afresh.
"""

import functools
import hashlib
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from mnv2_flax import data, export

from conftest import CACHE_DIR, REPO, tiny_config

STEPS = 300
_SOURCES = ("models.py", "layers.py", "cpu_kernels.py", "train.py", "data.py", "config_lib.py")


def _config():
  return tiny_config(
      num_train_steps=STEPS, log_every_steps=100, checkpoint_every_steps=STEPS, best_metric=""
  )


def _key(config) -> str:
  digest = hashlib.sha256(f"{config}{jax.__version__}".encode())
  for name in _SOURCES:
    digest.update((REPO / "mnv2_flax" / name).read_bytes())
  return digest.hexdigest()[:16]


@functools.cache
def trained_digits() -> tuple[str, dict]:
  """(checkpoints directory, results) of the cached digits model."""
  from mnv2_flax import train  # pylint: disable=g-import-not-at-top

  config = _config()
  root = os.path.join(CACHE_DIR, "test_models")
  target = os.path.join(root, f"digits-{_key(config)}")
  results_file = os.path.join(target, "results.json")
  if not os.path.exists(results_file):
    os.makedirs(root, exist_ok=True)
    workdir = tempfile.mkdtemp(dir=root, prefix="training-")
    train.train_and_evaluate(config, workdir)
    try:
      os.rename(workdir, target)  # Atomic: another test process may finish first.
    except OSError:
      shutil.rmtree(workdir, ignore_errors=True)
  with open(results_file) as f:
    return os.path.join(target, "checkpoints"), json.load(f)


@functools.cache
def digits_test_pixels(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The digits test split as the exported models take it: [0, 255] pixel
  values at `image_size` (load_digits' images with its normalisation undone)."""
  _, (images, labels) = data.load_digits(image_size)
  (mean,), (std,) = export.digits_stats(image_size)
  return np.clip((images * std + mean) * 255, 0, 255).astype(np.float32), labels
