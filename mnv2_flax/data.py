"""Datasets as deterministic, resumable iterators of per-process numpy batches.

Every dataset implements the same contract (`Dataset`):
  * `train_batches(start_step)` yields this process's share of the global batch
    for steps start_step, start_step + 1, ...; batch k depends only on
    (seed, k), so a resumed run sees exactly the batches of an uninterrupted
    one, whatever the process count.
  * `eval_batches()` yields padded batches with a `mask`; across all processes
    every eval example appears exactly once and every process yields the same
    number of batches (required by the collective eval step).
  * A batch's `image` is float32, normalised (the in-memory datasets), or
    uint8 pixels (datasets of image files), which the train and eval steps
    normalise on the device (`train.normalize_pixels`).
  * Datasets of image files add `unreadable` to every batch: 1.0 for each
    example whose file could not be decoded (training: another image took its
    place; evaluation: masked out), which the steps count.

This module never imports TensorFlow: the embedded digits set and synthetic
data live here, the others are built by `input_pipeline` on top of it, and
`datasets.create_dataset` picks between the two.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

from mnv2_flax.errors import ConfigError

Batch = dict[str, np.ndarray]
# Per-batch preprocessing of an ArrayDataset: (images, draws) -> float32 images.
# draws: (n, k) uniform numbers in [0, 1), the k random draws of each training
# example's augmentation; None for eval batches (no augmentation).
Transform = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]

# Built by `input_pipeline` (Grain, TFDS); the others here.
PIPELINE_DATASETS = ("imagenet2012", "cifar10", "mnist", "imagefolder")
DATASETS = ("digits", "synthetic") + PIPELINE_DATASETS


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) of the batches yielded.
  num_train_examples: int
  num_eval_examples: int
  # Name of each class index ("0".."9" for digits, folder names, ImageNet's
  # human-readable names); predict prints them and checkpoints keep them.
  class_names: tuple[str, ...] = ()
  # The normalisation applied to [0, 1] pixels, per channel, when it is not
  # config.dataset.mean/std (digits and MNIST use their own); checkpoints keep it.
  normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None


class Dataset(Protocol):
  info: DatasetInfo

  def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
    ...

  def eval_batches(self) -> Iterator[Batch]:
    ...


def pixel_stats(
    normalization: tuple[Sequence[float], Sequence[float]],
) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) of [0, 1] pixels as float32 arrays in 0..255 units, the
  form uint8 pixels are normalised with: (x - mean) / std."""
  mean, std = normalization
  return np.asarray(mean, np.float32) * 255, np.asarray(std, np.float32) * 255


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def eval_shard(num_examples: int, process_index: int, process_count: int) -> tuple[int, int, int]:
  """(start, stop, shard_size_max) of this process's contiguous eval shard."""
  per_process = -(-num_examples // process_count)
  start = min(process_index * per_process, num_examples)
  return start, min(start + per_process, num_examples), per_process


def pad_batch(batch: Batch, batch_size: int) -> Batch:
  """Pads a (possibly empty) batch to `batch_size` and adds a 0/1 `mask`."""
  n = len(batch["label"])
  padded = {
      k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)])
      for k, v in batch.items()
  }
  padded["mask"] = (np.arange(batch_size) < n).astype(np.float32)
  return padded


class ArrayDataset:
  """An in-memory dataset (images already preprocessed) with exact resume.

  The order of epoch e is a permutation drawn from (seed, e); step k takes the
  k-th global batch of that order and this process keeps its slice. The
  `transform`'s `random_draws` per example are drawn from (seed, epoch, step)
  for the whole global batch, so an example's augmentation depends on its
  position in the epoch, not on the process count.
  `train_examples` > 0 trains on the first that many training examples only.
  """

  def __init__(
      self,
      train: tuple[np.ndarray, np.ndarray],
      test: tuple[np.ndarray, np.ndarray],
      num_classes: int,
      *,
      global_batch_size: int,
      eval_batch_size: int,
      seed: int,
      process_index: int = 0,
      process_count: int = 1,
      transform: Transform | None = None,
      random_draws: int = 0,
      train_examples: int = 0,
      class_names: Sequence[str] = (),
      normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
  ):
    if train_examples > len(train[1]):
      raise ConfigError(
          f"config.dataset.train_examples: {train_examples} exceeds the "
          f"{len(train[1])} training examples"
      )
    if train_examples > 0:  # A fixed subset: the first n of the split.
      train = (train[0][:train_examples], train[1][:train_examples])
    self._train_images, self._train_labels = train
    self._test_images, self._test_labels = test
    self._global_batch_size = global_batch_size
    self._local_eval_batch = eval_batch_size // process_count
    self._seed = seed
    self._process_index, self._process_count = process_index, process_count
    self._transform = transform
    self._random_draws = random_draws
    self.info = DatasetInfo(
        num_classes=num_classes,
        image_shape=tuple(self._apply(self._test_images[:1], None).shape[1:]),
        num_train_examples=len(self._train_labels),
        num_eval_examples=len(self._test_labels),
        class_names=tuple(class_names) or tuple(str(i) for i in range(num_classes)),
        normalization=normalization,
    )
    if len(self._train_labels) < global_batch_size:
      raise ConfigError(
          f"config.global_batch_size: {global_batch_size} exceeds the "
          f"{len(self._train_labels)} training examples"
      )

  def _apply(self, images: np.ndarray, draws: np.ndarray | None) -> np.ndarray:
    return images if self._transform is None else self._transform(images, draws)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(len(self._train_labels))

  def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
    steps_per_epoch = len(self._train_labels) // self._global_batch_size
    mine = process_slice(self._global_batch_size, self._process_index, self._process_count)
    step = start_step
    while True:
      epoch, index = divmod(step, steps_per_epoch)
      order = self._epoch_order(epoch)
      while index < steps_per_epoch:
        start = index * self._global_batch_size
        ids = order[start : start + self._global_batch_size][mine]
        rng = np.random.default_rng([self._seed, epoch, index])
        draws = rng.random((self._global_batch_size, self._random_draws))[mine]
        images = self._apply(self._train_images[ids], draws)
        yield {"image": images, "label": self._train_labels[ids]}
        index += 1
        step += 1

  def eval_batches(self) -> Iterator[Batch]:
    start, stop, shard_max = eval_shard(
        len(self._test_labels), self._process_index, self._process_count
    )
    b = self._local_eval_batch
    for offset in range(0, shard_max, b):
      lo, hi = min(start + offset, stop), min(start + offset + b, stop)
      images = self._apply(self._test_images[lo:hi], None)
      yield pad_batch({"image": images, "label": self._test_labels[lo:hi]}, b)


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
  """ImageNet-1k's human-readable class names, in TFDS's label order."""
  with open(os.path.join(os.path.dirname(__file__), "imagenet_classes.txt")) as f:
    return tuple(f.read().splitlines())


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: 1797 8x8 images (0..16) and their labels, as
  `sklearn.datasets.load_digits` gives them. Read from the file scikit-learn
  ships, which is what load_digits reads, without importing scikit-learn
  (1.5 s of every run's start); through load_digits where the file is not
  where scikit-learn has kept it."""
  spec = importlib.util.find_spec("sklearn")  # Finds the package, runs none of it.
  if spec is None:
    raise ConfigError("config.dataset.name: 'digits' needs scikit-learn (pip install scikit-learn)")
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
  if not os.path.isfile(path):
    from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

    digits = sk_datasets.load_digits()
    return digits.images, digits.target
  table = np.loadtxt(path, delimiter=",")  # 64 pixels and the label per row.
  return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


@functools.cache
def _digits_resized(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's 8x8 digits scaled to [0, 1], upsampled (bilinear) to
  image_size, and their labels."""
  import jax  # pylint: disable=g-import-not-at-top

  images, labels = sklearn_digits()
  images = images.astype(np.float32)[..., None] / 16.0
  images = np.asarray(
      jax.image.resize(images, (len(images), image_size, image_size, 1), "bilinear")
  )
  return images, labels.astype(np.int32)


def digits_normalization(image_size: int) -> tuple[tuple[float], tuple[float]]:
  """The (mean, std) digits images are normalised with, in [0, 1] units:
  those of the whole set at that size."""
  images, _ = _digits_resized(image_size)
  return (float(images.mean()),), (float(images.std()),)


def load_digits(image_size: int, seed: int = 0) -> tuple[tuple, tuple]:
  """scikit-learn's bundled 8x8 digits: a fixed 1437/360 train/test split,
  scaled to [0, 1], upsampled (bilinear) to image_size, normalised."""
  images, labels = _digits_resized(image_size)
  (mean,), (std,) = digits_normalization(image_size)
  images = (images - np.float32(mean)) / np.float32(std)
  order = np.random.default_rng(seed).permutation(len(labels))
  train, test = order[:1437], order[1437:]
  return (images[train], labels[train]), (images[test], labels[test])


class SyntheticDataset:
  """Random images and labels for benchmarks and smoke tests: one fixed batch,
  no input cost. Eval yields a single padded batch."""

  def __init__(
      self,
      image_size: int,
      num_classes: int,
      *,
      global_batch_size: int,
      eval_batch_size: int,
      seed: int,
      process_count: int = 1,
  ):
    rng = np.random.default_rng(seed)
    local = global_batch_size // process_count
    self._batch = {
        "image": rng.standard_normal((local, image_size, image_size, 3), np.float32),
        "label": rng.integers(0, num_classes, local).astype(np.int32),
    }
    self._eval_batch = pad_batch(self._batch, eval_batch_size // process_count)
    self.info = DatasetInfo(
        num_classes,
        (image_size, image_size, 3),
        global_batch_size,
        local * process_count,
        tuple(str(i) for i in range(num_classes)),
    )

  def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
    del start_step
    while True:
      yield self._batch

  def eval_batches(self) -> Iterator[Batch]:
    yield self._eval_batch
