"""TFDS-backed datasets: in-memory CIFAR-10 / MNIST, streaming ImageNet and
image folders. The only module of the package that imports TensorFlow.

All datasets honour the `data.Dataset` contract (exact resume, every eval
example exactly once across processes).

* cifar10, mnist: the whole split is loaded as uint8 into memory and wrapped in
  `data.ArrayDataset`; batches keep the native resolution (32x32x3, 28x28x1),
  the train step resizes on device when `dataset.image_size` differs.
* imagenet2012, imagefolder: tf.data pipelines over the encoded images.
  Train: random-resized crop taken while decoding the JPEG, bilinear resize to
  `dataset.image_size`, random horizontal flip; eval: center crop of
  `dataset.eval_crop_fraction` of the shorter side, resize. Both normalise with
  `dataset.mean` / `dataset.std`. The randomness of an example is a stateless
  function of (seed, epoch, example position), so a batch depends only on
  (seed, step).

  imagenet2012 streams this process's contiguous part of the TFDS split: epoch
  e reads it with a file order and a `dataset.shuffle_buffer` shuffle seeded by
  (seed, e); resuming mid-epoch re-reads the epoch and skips the raw records
  already consumed (no decoding). Resume is exact for an unchanged process
  count. imagefolder shuffles file paths globally each epoch, as ArrayDataset
  does, so a step's global batch doesn't depend on the process count either.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mnv2_flax import data
from mnv2_flax.errors import ConfigError

# MNIST's own statistics: the config's default mean/std are ImageNet RGB ones.
_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
_CIFAR_PADDING = 4
_IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
_FOLDER_EVAL_SPLITS = ("test", "val")
_AUTOTUNE = tf.data.AUTOTUNE


def create_dataset(config: Any, *, process_index: int, process_count: int) -> data.Dataset:
  """Builds `config.dataset.name` (one of `data.TFDS_DATASETS`) for this process."""
  builders = {
      "cifar10": _cifar10,
      "mnist": _mnist,
      "imagenet2012": _imagenet,
      "imagefolder": _image_folder,
  }
  return builders[config.dataset.name](config, process_index, process_count)


# ------------------------------------------------------------------------------
# Per-example preprocessing (public: the benchmark reuses it).
# ------------------------------------------------------------------------------


def _scaled_stats(
    config: Any, channels: int, default: tuple[tuple[float, ...], tuple[float, ...]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) in 0..255 pixel units, one entry per channel."""
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
  if len(mean) != channels and default is not None:
    mean, std = default
  for key, value in (("mean", mean), ("std", std)):
    if len(value) != channels:
      raise ConfigError(
          f"config.dataset.{key}: needs {channels} entries (one per "
          f"channel) for {config.dataset.name}, got {value}"
      )
  return (np.asarray(mean, np.float32) * 255, np.asarray(std, np.float32) * 255)


def _decode_and_crop(
    image_bytes: tf.Tensor, crop_window: Callable[[tf.Tensor], tf.Tensor]
) -> tf.Tensor:
  """Decodes to uint8 RGB, cropped to crop_window([height, width, channels]) =
  [y, x, h, w]. JPEGs decode only the window; other formats decode fully."""

  def jpeg() -> tf.Tensor:
    window = crop_window(tf.io.extract_jpeg_shape(image_bytes))
    return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other() -> tf.Tensor:
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    y, x, h, w = tf.unstack(crop_window(tf.shape(image)))
    return image[y : y + h, x : x + w]

  return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def _resize_and_normalise(image: tf.Tensor, config: Any) -> tf.Tensor:
  size = config.dataset.image_size
  image = tf.image.resize(image, (size, size), method="bilinear")
  # Full-size constants: TF's broadcast of a 3-vector over an image costs
  # about as much as decoding the JPEG (measured 0.8 vs 1 ms at 224x224).
  ones = np.ones((size, size, 3), np.float32)
  mean, std = _scaled_stats(config, 3)
  return (image - mean * ones) * (ones / std)


def preprocess_train(image_bytes: tf.Tensor, seed: tf.Tensor, config: Any) -> tf.Tensor:
  """Encoded image -> float32 (image_size, image_size, 3), normalised.

  Inception-style random crop (area in [dataset.crop_area_min, 1] of the image,
  aspect ratio in [3/4, 4/3]; the whole image after 10 failed attempts),
  bilinear resize, horizontal flip with probability 1/2. `seed` is a stateless
  seed (shape [2] integer tensor): the output is a function of
  (image_bytes, seed).
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

  def random_window(shape: tf.Tensor) -> tf.Tensor:
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=crop_seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(config.dataset.crop_area_min, 1.0),
        max_attempts=10,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])

  image = _resize_and_normalise(_decode_and_crop(image_bytes, random_window), config)
  return tf.image.stateless_random_flip_left_right(image, flip_seed)


def preprocess_eval(image_bytes: tf.Tensor, config: Any) -> tf.Tensor:
  """Encoded image -> float32 (image_size, image_size, 3), normalised: center
  crop of dataset.eval_crop_fraction of the shorter side, bilinear resize."""

  def center_window(shape: tf.Tensor) -> tf.Tensor:
    height, width = shape[0], shape[1]
    side = tf.cast(
        config.dataset.eval_crop_fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32
    )
    side = tf.maximum(side, 1)
    return tf.stack([(height - side) // 2, (width - side) // 2, side, side])

  return _resize_and_normalise(_decode_and_crop(image_bytes, center_window), config)


# ------------------------------------------------------------------------------
# In-memory datasets.
# ------------------------------------------------------------------------------


def _load_tfds_arrays(name: str, config: Any) -> tuple[tuple, tuple, tuple[str, ...]]:
  """(train, test) as (uint8 images, int32 labels) and the class names."""
  builder = tfds.builder(name, data_dir=config.dataset.data_dir or None)
  builder.download_and_prepare()

  def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = tfds.as_numpy(
        builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
    )
    return images, labels.astype(np.int32)

  return load("train"), load("test"), tuple(builder.info.features["label"].names)


def _random_crop_and_flip(images: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
  """Per image: a random crop of the zero-padded image at the original size,
  mirrored with probability 1/2 (one gather for the whole batch)."""
  n, height, width, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  dy, dx = rng.integers(0, 2 * padding + 1, size=(2, n))
  rows = dy[:, None] + np.arange(height)
  cols = dx[:, None] + np.arange(width)
  cols = np.where((rng.random(n) < 0.5)[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _array_dataset(
    train: tuple,
    test: tuple,
    class_names: tuple[str, ...],
    config: Any,
    process_index: int,
    process_count: int,
    transform: data.Transform,
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> data.ArrayDataset:
  return data.ArrayDataset(
      train,
      test,
      len(class_names),
      global_batch_size=config.global_batch_size,
      eval_batch_size=config.eval_batch_size,
      seed=config.seed,
      process_index=process_index,
      process_count=process_count,
      transform=transform,
      train_examples=config.dataset.train_examples,
      class_names=class_names,
      normalization=normalization,
  )


def _cifar10(config: Any, process_index: int, process_count: int) -> data.Dataset:
  """CIFAR-10; train: 4-pixel zero-pad random crop + flip, then normalise."""
  train, test, class_names = _load_tfds_arrays("cifar10", config)
  mean, std = _scaled_stats(config, 3)

  def transform(images: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    if rng is not None:
      images = _random_crop_and_flip(images, rng, _CIFAR_PADDING)
    return (images - mean) / std

  return _array_dataset(train, test, class_names, config, process_index, process_count, transform)


def _mnist(config: Any, process_index: int, process_count: int) -> data.Dataset:
  """MNIST, normalised only. dataset.mean/std are used if they have a single
  entry; otherwise (the RGB default) MNIST's own 0.1307 / 0.3081."""
  train, test, class_names = _load_tfds_arrays("mnist", config)
  mean, std = _scaled_stats(config, 1, default=(_MNIST_MEAN, _MNIST_STD))
  return _array_dataset(
      train,
      test,
      class_names,
      config,
      process_index,
      process_count,
      lambda images, rng: (images - mean) / std,
      normalization=((float(mean[0]) / 255,), (float(std[0]) / 255,)),
  )


# ------------------------------------------------------------------------------
# Streaming datasets.
# ------------------------------------------------------------------------------


def _seed_key(*entropy: int) -> tf.Tensor:
  """A stateless seed (shape [2]) derived from integers."""
  return tf.constant(np.random.SeedSequence(entropy).generate_state(2), tf.int64)


def _example_seed(key: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(key, position)


def _even_shard(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """This process's [start, stop) of a train split: sizes differ by at most one,
  so every process holds steps_per_epoch * local_batch examples."""
  return (
      num_examples * process_index // process_count,
      num_examples * (process_index + 1) // process_count,
  )


class _StreamingDataset:
  """Decodes and batches raw examples supplied by a source.

  `read_train(epoch, first_step, steps_per_epoch)` returns this process's
  examples {"image": encoded bytes, "label", "seed"} for steps
  [first_step, steps_per_epoch) of the epoch, in order, local_batch per step;
  `read_eval(start, stop)` returns the eval examples {"image", "label"} in
  [start, stop) of the eval split.
  """

  def __init__(
      self,
      config: Any,
      *,
      num_classes: int,
      num_train_examples: int,
      num_eval_examples: int,
      read_train: Callable[[int, int, int], tf.data.Dataset],
      read_eval: Callable[[int, int], tf.data.Dataset],
      process_index: int,
      process_count: int,
      class_names: Sequence[str],
  ):
    size = config.dataset.image_size
    self.info = data.DatasetInfo(
        num_classes, (size, size, 3), num_train_examples, num_eval_examples, tuple(class_names)
    )
    self._config = config
    self._read_train, self._read_eval = read_train, read_eval
    self._process_index, self._process_count = process_index, process_count
    self._local_batch = config.global_batch_size // process_count
    self._local_eval_batch = config.eval_batch_size // process_count
    self._steps_per_epoch = num_train_examples // config.global_batch_size
    _scaled_stats(config, 3)  # Fails now, not in the first map, on bad mean/std.
    if self._steps_per_epoch == 0:
      raise ConfigError(
          f"config.global_batch_size: {config.global_batch_size} exceeds the "
          f"{num_train_examples} training examples"
      )

  def _batches(
      self,
      ds: tf.data.Dataset,
      preprocess: Callable[[dict[str, tf.Tensor]], tf.Tensor],
      batch_size: int,
      drop_remainder: bool,
  ) -> Iterator[data.Batch]:
    """Numpy batches of {"image": preprocess(example), "label": int32}."""
    ds = ds.map(
        lambda ex: {"image": preprocess(ex), "label": tf.cast(ex["label"], tf.int32)},
        num_parallel_calls=_AUTOTUNE,
    )
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=_AUTOTUNE).prefetch(
        _AUTOTUNE
    )
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).as_numpy_iterator()

  def train_batches(self, start_step: int = 0) -> Iterator[data.Batch]:
    epoch, index = divmod(start_step, self._steps_per_epoch)
    while True:
      yield from self._batches(
          self._read_train(epoch, index, self._steps_per_epoch),
          lambda ex: preprocess_train(ex["image"], ex["seed"], self._config),
          self._local_batch,
          drop_remainder=True,
      )
      epoch, index = epoch + 1, 0

  def eval_batches(self) -> Iterator[data.Batch]:
    start, stop, shard_max = data.eval_shard(
        self.info.num_eval_examples, self._process_index, self._process_count
    )
    size = self._local_eval_batch
    num_batches = math.ceil(shard_max / size)
    batches = iter(())
    if start < stop:  # TFDS rejects empty slices.
      batches = self._batches(
          self._read_eval(start, stop),
          lambda ex: preprocess_eval(ex["image"], self._config),
          size,
          drop_remainder=False,
      )
    # Processes with a shorter shard pad with fully masked batches, so that all
    # run the collective eval step equally often.
    empty = {
        "image": np.zeros((0, *self.info.image_shape), np.float32),
        "label": np.zeros((0,), np.int32),
    }
    for _ in range(num_batches):
      yield data.pad_batch(next(batches, empty), size)


def _skip_decoding() -> dict[str, Any]:
  return {"image": tfds.decode.SkipDecoding()}


def _imagenet(config: Any, process_index: int, process_count: int) -> data.Dataset:
  """ILSVRC 2012 via TFDS, prepared from the manually downloaded tars."""
  builder = tfds.builder("imagenet2012", data_dir=config.dataset.data_dir or None)
  if not builder.is_prepared():
    _prepare_imagenet(builder, config)
  num_train = builder.info.splits["train"].num_examples
  num_eval = builder.info.splits["validation"].num_examples
  local_batch = config.global_batch_size // process_count
  train_start, train_stop = _even_shard(num_train, process_index, process_count)

  def read_train(epoch: int, first_step: int, steps_per_epoch: int) -> tf.data.Dataset:
    epoch_seed = int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0])
    key = _seed_key(config.seed, epoch, process_index)
    ds = builder.as_dataset(
        split=f"train[{train_start}:{train_stop}]",
        shuffle_files=True,
        decoders=_skip_decoding(),
        read_config=tfds.ReadConfig(shuffle_seed=epoch_seed, try_autocache=False),
    )
    ds = ds.shuffle(config.dataset.shuffle_buffer, seed=epoch_seed)
    # Position within the epoch is counted before the resume skip, so a
    # resumed example gets the seed it had in the uninterrupted run.
    ds = ds.take(steps_per_epoch * local_batch).enumerate()
    ds = ds.skip(first_step * local_batch)
    return ds.map(
        lambda i, ex: {"image": ex["image"], "label": ex["label"], "seed": _example_seed(key, i)}
    )

  def read_eval(start: int, stop: int) -> tf.data.Dataset:
    return builder.as_dataset(
        split=f"validation[{start}:{stop}]",
        decoders=_skip_decoding(),
        read_config=tfds.ReadConfig(try_autocache=False),
    )

  return _StreamingDataset(
      config,
      num_classes=builder.info.features["label"].num_classes,
      num_train_examples=num_train,
      num_eval_examples=num_eval,
      read_train=read_train,
      read_eval=read_eval,
      process_index=process_index,
      process_count=process_count,
      class_names=data.imagenet_class_names(),
  )


def _prepare_imagenet(builder: tfds.core.DatasetBuilder, config: Any) -> None:
  """Converts the manually downloaded tars once into TFDS records.

  With several processes, prepare beforehand with one (e.g. a one-process
  eval run): concurrent preparation into a shared data_dir would race.
  """
  manual_dir = config.dataset.manual_dir or os.path.join(
      builder.data_dir_root, "downloads", "manual"
  )
  missing = [f for f in _IMAGENET_TARS if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
  if missing:
    raise ConfigError(
        f"config.dataset.manual_dir: imagenet2012 is not prepared in "
        f"{builder.data_path} and needs a manual download from "
        f"https://image-net.org/download-images: put ILSVRC2012_img_train.tar "
        f"(~138 GB) and ILSVRC2012_img_val.tar (~6.3 GB) into {manual_dir} "
        f"(missing: {', '.join(missing)}). TFDS converts them once into "
        f"{builder.data_dir_root} (~155 GB more disk, hours); later runs reuse it."
    )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def _image_folder(config: Any, process_index: int, process_count: int) -> data.Dataset:
  """`dataset.root`/{train, test or val}/<class>/<image>: JPEG or PNG files.

  Classes are the sorted class-folder names. Files that cannot be decoded are
  found by one decoding pass over all files when the dataset is built, then
  left out (their count is logged): a corrupt file skipped later, while
  streaming, would shift every following batch and break exact resume.
  """
  root = config.dataset.root
  if not root or not tf.io.gfile.isdir(root):
    raise ConfigError(
        f"config.dataset.root: {root!r} is not a directory; it "
        "needs train/ and test/ (or val/) with one folder per class"
    )
  builder = tfds.folder_dataset.ImageFolder(root)
  splits = builder.info.splits
  eval_split = next((s for s in _FOLDER_EVAL_SPLITS if s in splits), None)
  for split, name in (("train", "train"), (eval_split, "test (or val)")):
    if split not in splits or splits[split].num_examples == 0:
      raise ConfigError(
          f"config.dataset.root: no images in {os.path.join(root, name)}; "
          "expected <class>/<image>.jpg|.jpeg|.png below it"
      )
  train_paths, train_labels = _decodable_images(builder, "train", root)
  eval_paths, eval_labels = _decodable_images(builder, eval_split, root)
  mine = data.process_slice(config.global_batch_size, process_index, process_count)

  def read_files(paths: np.ndarray, labels: np.ndarray, **extra: Any) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices({"path": paths, "label": labels, **extra})
    return ds.map(
        lambda ex: {**ex, "image": tf.io.read_file(ex["path"])}, num_parallel_calls=_AUTOTUNE
    )

  def read_train(epoch: int, first_step: int, steps_per_epoch: int) -> tf.data.Dataset:
    # Global batch k of epoch e takes positions [k * B, (k + 1) * B) of a
    # permutation drawn from (seed, e); this process keeps its slice of each.
    order = np.random.default_rng([config.seed, epoch]).permutation(len(train_paths))
    positions = np.arange(steps_per_epoch * config.global_batch_size)
    positions = positions.reshape(steps_per_epoch, -1)[first_step:, mine].reshape(-1)
    key = _seed_key(config.seed, epoch)
    ids = order[positions]
    ds = read_files(train_paths[ids], train_labels[ids], position=positions)
    return ds.map(
        lambda ex: {
            "image": ex["image"],
            "label": ex["label"],
            "seed": _example_seed(key, ex["position"]),
        }
    )

  def read_eval(start: int, stop: int) -> tf.data.Dataset:
    return read_files(eval_paths[start:stop], eval_labels[start:stop])

  return _StreamingDataset(
      config,
      num_classes=builder.info.features["label"].num_classes,
      num_train_examples=len(train_paths),
      num_eval_examples=len(eval_paths),
      read_train=read_train,
      read_eval=read_eval,
      process_index=process_index,
      process_count=process_count,
      class_names=builder.info.features["label"].names,
  )


def _decodable_images(
    builder: tfds.core.DatasetBuilder, split: str, root: str
) -> tuple[np.ndarray, np.ndarray]:
  """(paths, labels) of the split's decodable images, in the builder's fixed
  order. Raises ConfigError if none decodes."""

  def check(example: dict[str, tf.Tensor]) -> tuple[tf.Tensor, ...]:
    # A full decode is the only reliable test (a truncated JPEG has a valid
    # header). Its shape is returned, unused, so that the decode isn't pruned.
    image = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
    return example["image/filename"], example["label"], tf.shape(image)

  ds = builder.as_dataset(
      split=split, decoders=_skip_decoding(), read_config=tfds.ReadConfig(try_autocache=False)
  )
  ds = ds.map(check, num_parallel_calls=_AUTOTUNE).ignore_errors()
  valid = list(ds.as_numpy_iterator())
  total = builder.info.splits[split].num_examples
  split_dir = os.path.join(root, split)
  if not valid:
    raise ConfigError(
        f"config.dataset.root: none of the {total} images in {split_dir} can be decoded"
    )
  if len(valid) < total:
    logging.warning(
        "imagefolder: skipping %d of %d images in %s that cannot be decoded",
        total - len(valid),
        total,
        split_dir,
    )
  paths, labels, _ = zip(*valid)
  return np.asarray(paths), np.asarray(labels, np.int64)
