"""Datasets of encoded images streamed by Grain (image folders, ImageNet), and
the TFDS datasets held in memory (CIFAR-10, MNIST).

All honour the `data.Dataset` contract: exact resume, every evaluation example
exactly once across processes.

* imagefolder, imagenet2012: a random-access source of encoded images (the
  sorted file list of a folder split, `folders.Split`; ImageNet's TFDS
  ArrayRecord files through `tfds.data_source`), decoded by `images` (no
  TensorFlow) in `dataset.workers` Grain worker processes; a training
  stream's element is a whole local batch, its images written into shared
  memory reused batch after batch (`_BlockRing`). Batches carry the uint8
  pixels; the train and eval steps normalise them on the device.

  Order: epoch e reads the training split in a permutation drawn from
  (seed, e); global batch k takes positions [k B, (k + 1) B) of its epoch and
  process i of n the i-th n-th of them. The example at position p is augmented
  (random-resized crop, flip) with a generator seeded by (seed, e, p). So a
  step's global batch is a function of (seed, step) alone, whatever the
  process count and worker count, and resuming at step k reads only the
  records of steps k, k + 1, ... (Grain's own iterator state is not used: each
  worker computes its batches from their step numbers).

  Unreadable files: no file is decoded before training. A training file that
  fails to read or decode is replaced by the next readable one of the epoch's
  permutation (a function of the files alone, so later batches don't shift and
  resume stays exact), logged once by name and counted: batches carry
  `unreadable` (1.0 per substituted example), which the train step sums into
  the `unreadable_images` metric. In evaluation such a file is masked out,
  named and counted. When more than half of the files read so far fail, or
  `_SUBSTITUTE_ATTEMPTS` in a row do, the run stops with one line.

* cifar10, mnist: the whole split is loaded as uint8 into memory (through
  TFDS, which uses TensorFlow) and wrapped in `data.ArrayDataset`; batches keep
  the native resolution (32x32x3, 28x28x1), the train step resizes on device
  when `dataset.image_size` differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from typing import Any, Protocol

import grain
import numpy as np
from absl import flags, logging

from mnv2_flax import data, folders, images
from mnv2_flax.errors import ConfigError

# MNIST's own statistics: the config's default mean/std are ImageNet RGB ones.
_MNIST_MEAN, _MNIST_STD = (0.1307,), (0.3081,)
_CIFAR_PADDING = 4
_IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
_ARRAY_RECORD = "array_record"  # TFDS's file format for random access.
# Grain's datasets have a length: the training stream's, which no run reaches.
_ENDLESS = 2**62
# How far along the epoch's permutation a broken training file's substitute
# is looked for; this many unreadable files in a row stop the run.
_SUBSTITUTE_ATTEMPTS = 64
# Examples read before "more than half are unreadable" stops a run (a smaller
# split stops once all of it has been read).
_MAJORITY_SAMPLE = 64
# Shared-memory blocks per worker process that its training batches' images
# are written into and reused (`_BlockRing`): up to 8 are in flight when the
# buffers are full (the batch being written, 2 in the worker's queue, one
# moving and 2 buffered in this process, the batch the training loop holds
# and its predecessor, alive until the next arrives), and spares for steps
# still running on them. A worker with none free hands its batch over through
# a fresh block (Grain's own path). Blocks are taken lowest first: the
# memory of those never needed is never touched.
_BLOCKS_PER_WORKER = 10
# Smaller arrays go to the training process pickled rather than through a
# fresh shared-memory block each (labels, masks: ~100 bytes).
_MIN_SHARED_BYTES = 64 * 1024


def create_dataset(
    config: Any,
    *,
    process_index: int,
    process_count: int,
    mode: str = "train",
    class_names: tuple[str, ...] = (),
) -> data.Dataset:
  """Builds `config.dataset.name` (one of `data.PIPELINE_DATASETS`); see
  `datasets.create_dataset` for `mode` and `class_names`."""
  name = config.dataset.name
  if name in ("cifar10", "mnist"):
    return _IN_MEMORY[name](config, process_index, process_count)
  if name == "imagenet2012":
    train, evaluation, names = _imagenet_sources(config, mode)
  else:
    folder = folders.open_folder(
        config.dataset.root,
        mode=mode,
        class_names=class_names,
        eval_every_steps=config.eval_every_steps,
    )
    train, evaluation, names = folder.train, folder.eval, folder.class_names
  return ImageDataset(
      config,
      train=train,
      evaluation=evaluation,
      class_names=names,
      process_index=process_index,
      process_count=process_count,
  )


def num_workers(config: Any) -> int:
  """dataset.workers, with -1 meaning one per core this process may use."""
  if config.dataset.workers >= 0:
    return config.dataset.workers
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def normalization_stats(
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
  return data.pixel_stats((mean, std))


# ------------------------------------------------------------------------------
# Streaming encoded images with Grain.
# ------------------------------------------------------------------------------


class ImageSource(Protocol):
  """Random access to a split's encoded images (`folders.Split`, `TfdsSource`)."""

  key: str  # The config key that messages about these images name.
  location: str  # Where they are, for messages: a directory, a dataset split.

  def __len__(self) -> int:
    ...

  def read(self, index: int) -> tuple[bytes, int]:
    """(encoded image, label); OSError if the record cannot be read."""
    ...

  def name(self, index: int) -> str:
    """How messages name the record: its path, or its split and file name."""
    ...


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """Everything that turns encoded bytes into uint8 pixels, but the randomness."""

  image_size: int
  crop_area_min: float
  eval_crop_fraction: float
  eval_resize: str
  channels: int = 3

  @classmethod
  def from_config(cls, config: Any) -> Preprocessing:
    # Checked here; the train and eval steps normalise the uint8 batches with it.
    normalization_stats(config, 3)
    d = config.dataset
    return cls(d.image_size, d.crop_area_min, d.eval_crop_fraction, d.get("eval_resize", "crop"))

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)

  def train(
      self, encoded: bytes, rng: np.random.Generator, out: np.ndarray | None = None
  ) -> np.ndarray:
    return images.train_image(
        encoded,
        rng,
        image_size=self.image_size,
        area_min=self.crop_area_min,
        channels=self.channels,
        out=out,
    )

  def eval(self, encoded: bytes) -> np.ndarray:
    return images.eval_image(
        encoded,
        image_size=self.image_size,
        crop_fraction=self.eval_crop_fraction,
        channels=self.channels,
        resize=self.eval_resize,
    )

  def blank(self) -> np.ndarray:
    return np.zeros(self.shape, np.uint8)


_UNREADABLE = (images.DecodeError, OSError)


def _example(image: np.ndarray, label: int, unreadable: int, mask: float = 1.0) -> dict[str, Any]:
  """One example of a stream; `unreadable` is the index of the record that
  could not be read in its place (-1: none)."""
  return {
      "image": image,
      "label": np.int32(label),
      "mask": np.float32(mask),
      "unreadable": np.float32(unreadable >= 0),
      "unreadable_index": np.int64(unreadable),
  }


# This worker process's index among its stream's workers (`_init_worker`):
# which blocks of a `_BlockRing` are its own.
_worker_index = 0


@dataclasses.dataclass
class _Blocks:
  """A `_BlockRing` as worker processes see it (names only, picklable).

  Block b belongs to worker b // per_worker, which alone marks it busy
  (flag 1) when it writes a batch into it; only the training process marks
  it free (flag 0) again: no lock needed."""

  names: tuple[str, ...]
  flags_name: str
  shape: tuple[int, ...]  # A batch's images, uint8.
  per_worker: int
  _mine: list[shared_memory.SharedMemory] = dataclasses.field(default_factory=list, init=False)
  _flags: shared_memory.SharedMemory | None = dataclasses.field(default=None, init=False)

  def claim(self) -> tuple[int, np.ndarray] | None:
    """(block, its images array) of a free block of this worker, now marked
    busy; None when all are busy (the training loop holds them)."""
    first = _worker_index * self.per_worker
    if self._flags is None:
      # Spawned workers report to the training process's resource tracker:
      # attaching registers these names again (a no-op), and it unlinks them
      # only if that process dies without unlinking them.
      self._flags = shared_memory.SharedMemory(self.flags_name)
      self._mine = [
          shared_memory.SharedMemory(name) for name in self.names[first : first + self.per_worker]
      ]
    # Arrays over the buffers are made per call and not kept: a kept export
    # would make closing the mapping at the worker's exit fail.
    flags = np.frombuffer(self._flags.buf, np.uint8)[first : first + self.per_worker]
    free = np.flatnonzero(flags == 0)
    if not free.size:
      return None
    slot = int(free[0])
    flags[slot] = 1
    return first + slot, np.ndarray(self.shape, np.uint8, buffer=self._mine[slot].buf)


class _BlockRing:
  """Shared memory that worker processes write training batches' images
  into and the training process reads them from, reused batch after batch.

  Grain hands each batch over through a fresh block instead (created,
  faulted in page by page, unlinked on both sides): with 2 workers on 2
  cores the ring streams 17 % more images/s (docs/benchmarks.md). The training
  process creates the blocks before its workers start, so Python's resource
  tracker unlinks them should it be killed; the stream unlinks them when it
  is closed."""

  def __init__(self, workers: int, per_worker: int, shape: tuple[int, ...]):
    prefix = f"mnv2_{os.getpid()}_{secrets.token_hex(4)}"
    count = workers * per_worker
    self._memory = [
        shared_memory.SharedMemory(f"{prefix}_{b}", create=True, size=math.prod(shape))
        for b in range(count)
    ]
    # New shared memory reads as zeros: every block free.
    self._flags = shared_memory.SharedMemory(f"{prefix}_flags", create=True, size=count)
    self.blocks = _Blocks(tuple(m.name for m in self._memory), self._flags.name, shape, per_worker)

  def images(self, block: int) -> np.ndarray:
    """The images a worker wrote into `block`. The block is free again once
    this array and every view of it are gone (a JAX array on the CPU may
    alias it rather than copy: it then keeps the array alive)."""
    images = np.ndarray(self.blocks.shape, np.uint8, buffer=self._memory[block].buf)
    weakref.finalize(images, self._free, block)
    return images

  def _free(self, block: int) -> None:
    self._flags.buf[block] = 0

  def close(self) -> None:
    """Unlinks the blocks (arrays still held keep their memory mapped)."""
    for memory in (*self._memory, self._flags):
      memory.unlink()


@dataclasses.dataclass
class _TrainBatches:
  """Element k of this process's training stream: its local batch of step k,
  decoded in one call (a picklable function for Grain's workers). A whole
  batch per element: each image is written into the batch's array, without
  Grain's per-example work and stacking (a few percent more images/s,
  docs/benchmarks.md)."""

  source: ImageSource
  preprocessing: Preprocessing
  seed: int
  global_batch_size: int
  local_batch_size: int
  process_index: int
  blocks: _Blocks | None = None  # In worker processes: where images go.
  _orders: dict[int, np.ndarray] = dataclasses.field(default_factory=dict, init=False)

  def epoch_order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      self._orders.clear()  # One epoch at a time: ImageNet's is 10 MB.
      self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
    return self._orders[epoch]

  def __call__(self, step: int) -> dict[str, Any]:
    local = self.local_batch_size
    epoch, index = divmod(step, len(self.source) // self.global_batch_size)
    first = index * self.global_batch_size + self.process_index * local
    claimed = None if self.blocks is None else self.blocks.claim()
    block, image = claimed or (None, np.empty((local, *self.preprocessing.shape), np.uint8))
    batch = {
        "label": np.empty(local, np.int32),
        "mask": np.ones(local, np.float32),
        "unreadable_index": np.full(local, -1, np.int64),
    }
    for row in range(local):
      label, substituted = self._example(epoch, first + row, image[row])
      batch["label"][row] = label
      batch["unreadable_index"][row] = substituted
    batch["unreadable"] = (batch["unreadable_index"] >= 0).astype(np.float32)
    if block is None:
      batch["image"] = image
    else:
      batch["block"] = block
    return batch

  def _example(self, epoch: int, position: int, out: np.ndarray) -> tuple[int, int]:
    """Writes the example at `position` of `epoch` into `out`; (its label,
    the index of the record it replaced or -1)."""
    order = self.epoch_order(epoch)
    attempts = min(_SUBSTITUTE_ATTEMPTS, len(order))
    for attempt in range(attempts):
      record = int(order[(position + attempt) % len(order)])
      try:
        encoded, label = self.source.read(record)
        self.preprocessing.train(
            encoded, np.random.default_rng([self.seed, epoch, position]), out=out
        )
      except _UNREADABLE:
        continue
      return label, int(order[position]) if attempt else -1
    first = int(order[position])
    example = f"{self.source.name(first)} ({failure_reason(self.source, first)})"
    if attempts == len(order):
      raise ConfigError(
          f"config.{self.source.key}: none of the {attempts} images of "
          f"{self.source.location} can be decoded, e.g. {example}"
      )
    raise ConfigError(
        f"config.{self.source.key}: {attempts} images in a row of {self.source.location} "
        f"cannot be decoded, e.g. {example}; most of it is unreadable"
    )


@dataclasses.dataclass(frozen=True)
class _EvalExamples:
  """Element i of this process's evaluation stream: record start + i, or
  padding (mask 0) from `stop` on."""

  source: ImageSource
  preprocessing: Preprocessing
  start: int
  stop: int

  def __call__(self, i: int) -> dict[str, Any]:
    record = self.start + i
    if record >= self.stop:
      return _example(self.preprocessing.blank(), 0, -1, mask=0.0)
    try:
      encoded, label = self.source.read(record)
      return _example(self.preprocessing.eval(encoded), label, -1)
    except _UNREADABLE:
      return _example(self.preprocessing.blank(), 0, record, mask=0.0)


@dataclasses.dataclass(frozen=True)
class _Check:
  """Element i: the label of record i, and whether it is unreadable."""

  source: ImageSource

  def __call__(self, i: int) -> dict[str, Any]:
    try:
      encoded, label = self.source.read(i)
      images.decode(encoded, 3)
    except _UNREADABLE:
      return {"label": np.int32(-1), "unreadable": np.bool_(True)}
    return {"label": np.int32(label), "unreadable": np.bool_(False)}


def check_images(source: ImageSource, workers: int) -> tuple[np.ndarray, list[int]]:
  """(labels of the readable records, indices of the unreadable ones): every
  record read and decoded, in `workers` processes."""
  checks = grain.MapDataset.range(len(source)).map(_Check(source)).batch(256)
  batches = list(iterate(checks, workers))
  labels = np.concatenate([b["label"] for b in batches])
  unreadable = np.concatenate([b["unreadable"] for b in batches])
  return labels[~unreadable], np.flatnonzero(unreadable).tolist()


def failure_reason(source: ImageSource, index: int) -> str:
  """Why record `index` of `source` cannot be read or decoded ("" if it can)."""
  try:
    images.decode(source.read(index)[0], 3)
  except _UNREADABLE as e:
    return " ".join(str(e).split()) or type(e).__name__
  return ""


class UnreadableFiles:
  """Names each unreadable record of a stream once, counts them, and stops
  the run when most of what was read is unreadable."""

  def __init__(self, source: ImageSource, *, training: bool):
    self._source, self._training = source, training
    self._what = (
        "another image of the split takes its place" if training else "left out of the evaluation"
    )
    self.names: dict[int, str] = {}  # Record index -> "name (reason)".
    self.examples = 0  # Read so far (padding excluded).
    self.failed = 0  # Of which the file could not be read.

  def update(self, batch: data.Batch, *, finished: bool = False) -> None:
    """Takes the stream's bookkeeping out of `batch` (and its mask, when
    training: every example counts)."""
    indices = batch.pop("unreadable_index")
    if self._training:
      self.examples += len(batch.pop("mask"))
    else:  # Padding is masked, and so are unreadable files.
      self.examples += int(batch["mask"].sum() + batch["unreadable"].sum())
    self.failed += int(batch["unreadable"].sum())
    for index in map(int, indices[indices >= 0]):
      if index not in self.names:
        self.names[index] = f"{self._source.name(index)} ({failure_reason(self._source, index)})"
        logging.warning("Unreadable image %s: %s.", self.names[index], self._what)
    self.check(finished)

  def check(self, finished: bool) -> None:
    if self.failed * 2 > self.examples and (finished or self.examples >= _MAJORITY_SAMPLE):
      raise ConfigError(
          f"config.{self._source.key}: {self.failed} of the {self.examples} images read from "
          f"{self._source.location} cannot be decoded, e.g. {next(iter(self.names.values()))}; "
          "most of it is unreadable"
      )


def _init_worker(worker_index: int, worker_count: int) -> None:
  """Grain worker init: notes the worker's index (its `_BlockRing` blocks);
  the worker exits when the training process is gone (SIGKILL gives it no
  chance to stop its workers)."""
  global _worker_index
  del worker_count
  _worker_index = worker_index
  parent = os.getppid()

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(1)

  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class ImageDataset:
  """Batches of encoded images decoded by Grain (see the module doc)."""

  def __init__(
      self,
      config: Any,
      *,
      train: ImageSource | None,
      evaluation: ImageSource | None,
      class_names: tuple[str, ...],
      process_index: int,
      process_count: int,
  ):
    self._preprocessing = Preprocessing.from_config(config)
    self.train_source, self.eval_source = train, evaluation
    self._seed = config.seed
    self._global_batch_size = config.global_batch_size
    self._local_batch_size = config.global_batch_size // process_count
    self._local_eval_batch_size = config.eval_batch_size // process_count
    self._process_index, self._process_count = process_index, process_count
    self.workers = num_workers(config)
    self.unreadable: dict[str, UnreadableFiles] = {}  # "train"/"eval" -> the last stream's.
    size = config.dataset.image_size
    self.info = data.DatasetInfo(
        len(class_names),
        (size, size, 3),
        0 if train is None else len(train),
        0 if evaluation is None else len(evaluation),
        tuple(class_names),
    )
    if train is not None and len(train) < config.global_batch_size:
      raise ConfigError(
          f"config.global_batch_size: {config.global_batch_size} exceeds the "
          f"{len(train)} training examples"
      )

  def train_batches(self, start_step: int = 0) -> Iterator[data.Batch]:
    if self.train_source is None:
      raise ValueError("this dataset was opened for evaluation only")
    tracker = UnreadableFiles(self.train_source, training=True)
    self.unreadable["train"] = tracker
    return self._train_batches(start_step, tracker)

  def _train_batches(self, start_step: int, tracker: UnreadableFiles) -> Iterator[data.Batch]:
    # Created when iteration starts, unlinked after the workers are stopped.
    with contextlib.ExitStack() as stack:
      ring = None
      if self.workers:
        shape = (self._local_batch_size, *self._preprocessing.shape)
        ring = _BlockRing(self.workers, _BLOCKS_PER_WORKER, shape)
        stack.callback(ring.close)
      batches = grain.MapDataset.range(start_step, _ENDLESS).map(
          _TrainBatches(
              self.train_source,
              self._preprocessing,
              self._seed,
              self._global_batch_size,
              self._local_batch_size,
              self._process_index,
              None if ring is None else ring.blocks,
          )
      )
      stream = stack.enter_context(contextlib.closing(self._batches(batches, tracker)))
      for batch in stream:
        if "block" in batch:
          batch["image"] = ring.images(batch.pop("block"))
        yield batch

  def eval_batches(self) -> Iterator[data.Batch]:
    if self.eval_source is None:
      raise ValueError("this dataset has no evaluation split")
    start, stop, shard_max = data.eval_shard(
        len(self.eval_source), self._process_index, self._process_count
    )
    local = self._local_eval_batch_size
    # Every process yields as many batches (the eval step is collective).
    length = math.ceil(shard_max / local) * local
    batches = (
        grain.MapDataset.range(length)
        .map(_EvalExamples(self.eval_source, self._preprocessing, start, stop))
        .batch(local)
    )
    tracker = UnreadableFiles(self.eval_source, training=False)
    self.unreadable["eval"] = tracker
    return self._batches(batches, tracker)

  def _batches(self, batches: grain.MapDataset, tracker: UnreadableFiles) -> Iterator[data.Batch]:
    # uint8 images: the steps normalise them on the device (a quarter of
    # float32's bytes through shared memory and to the device).
    length = len(batches)
    with contextlib.closing(iterate(batches, self.workers)) as stream:
      for count, batch in enumerate(stream, 1):
        tracker.update(batch, finished=count == length)
        yield batch


def iterate(batches: grain.MapDataset, workers: int) -> Iterator[data.Batch]:
  """The batches, in order, decoded in this thread when asked for (workers
  0) or by `workers` Grain processes, each a batch at a time in one thread,
  two ahead."""
  _grain_flags_parsed()
  if workers == 0:
    stream = batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  else:
    stream = grain.experimental.WithOptionsIterDataset(
        batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)),
        grain.experimental.DatasetOptions(min_shm_size=_MIN_SHARED_BYTES),
    ).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2),
        worker_init_fn=_init_worker,
    )
  iterator = iter(stream)
  try:
    # Worker batches are views of their shared memory, not copied out (a
    # copy cost 11 % of the images/s with 2 workers on 2 cores,
    # docs/benchmarks.md); Grain unlinks each of its blocks once its array
    # is gone (training images come in `_BlockRing`'s instead).
    yield from iterator
  finally:
    iterator.close()


def _grain_flags_parsed() -> None:
  """Grain's worker processes read its absl flags, which a library caller
  (a notebook, pytest) has not parsed: their defaults then."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ------------------------------------------------------------------------------
# ImageNet: TFDS ArrayRecord files.
# ------------------------------------------------------------------------------


class TfdsSource:
  """A split of a TFDS dataset prepared as ArrayRecord files, its images kept
  encoded (`tfds.data_source`: no TensorFlow)."""

  key = "dataset.data_dir"

  def __init__(self, source: Any, name: str, split: str):
    self._source, self._split = source, split
    self.location = f"{name} {split}"

  def __len__(self) -> int:
    return len(self._source)

  def read(self, index: int) -> tuple[bytes, int]:
    record = self._source[index]
    return record["image"], int(record["label"])

  def name(self, index: int) -> str:
    file_name = self._source[index].get("file_name", b"")
    if isinstance(file_name, bytes):
      file_name = file_name.decode()
    return f"{self._split}[{index}] {file_name}".rstrip()


def _imagenet_sources(
    config: Any, mode: str
) -> tuple[TfdsSource | None, TfdsSource, tuple[str, ...]]:
  """ILSVRC 2012's train and validation splits (train None for mode "eval"),
  prepared first if they are not."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder("imagenet2012", data_dir=config.dataset.data_dir or None)
  if not builder.is_prepared():
    builder = tfds.builder(
        "imagenet2012", data_dir=config.dataset.data_dir or None, file_format=_ARRAY_RECORD
    )
    prepare_imagenet(builder, config)
  formats = [builder.info.file_format, *builder.info.alternative_file_formats]
  if _ARRAY_RECORD not in [getattr(f, "value", f) for f in formats]:
    raise ConfigError(
        f"config.dataset.data_dir: imagenet2012 in {builder.data_path} is stored as "
        f"{getattr(formats[0], 'value', formats[0])} files; this project reads ArrayRecord "
        f"files: convert them once with `tfds convert_format "
        f"--dataset_version_dir={builder.data_path} --out_file_format=array_record`, or "
        "prepare anew into another data_dir"
    )
  decoders = {"image": tfds.decode.SkipDecoding()}

  def source(split: str) -> TfdsSource:
    records = builder.as_data_source(split, decoders=decoders, file_format=_ARRAY_RECORD)
    return TfdsSource(records, "imagenet2012", split)

  train = source("train") if mode == "train" else None
  return train, source("validation"), data.imagenet_class_names()


def prepare_imagenet(builder: Any, config: Any) -> None:
  """Converts the manually downloaded tars once into ArrayRecord files (TFDS,
  which uses TensorFlow for it).

  With several processes, prepare beforehand with one (e.g. `python -m
  mnv2_flax.datasets --show`): concurrent preparation into a shared data_dir
  would race.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  manual_dir = config.dataset.manual_dir or os.path.join(
      builder.data_dir_root, "downloads", "manual"
  )
  missing = [f for f in _IMAGENET_TARS if not os.path.exists(os.path.join(manual_dir, f))]
  if missing:
    raise ConfigError(
        f"config.dataset.manual_dir: imagenet2012 is not prepared in "
        f"{builder.data_path} and needs a manual download from "
        f"https://image-net.org/download-images: put ILSVRC2012_img_train.tar "
        f"(~138 GB) and ILSVRC2012_img_val.tar (~6.3 GB) into {manual_dir} "
        f"(missing: {', '.join(missing)}). TFDS converts them once into ArrayRecord "
        f"files in {builder.data_dir_root} (~150 GB more disk, hours; estimates); later "
        "runs reuse them."
    )
  logging.info("Preparing imagenet2012 from %s into %s.", manual_dir, builder.data_path)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


# ------------------------------------------------------------------------------
# In-memory datasets (TFDS, with TensorFlow).
# ------------------------------------------------------------------------------


def _load_tfds_arrays(name: str, config: Any) -> tuple[tuple, tuple, tuple[str, ...]]:
  """(train, test) as (uint8 images, int32 labels) and the class names."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(name, data_dir=config.dataset.data_dir or None)
  builder.download_and_prepare()

  def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    pixels, labels = tfds.as_numpy(
        builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
    )
    return pixels, labels.astype(np.int32)

  return load("train"), load("test"), tuple(builder.info.features["label"].names)


def random_crop_and_flip(pixels: np.ndarray, draws: np.ndarray, padding: int) -> np.ndarray:
  """Per image: a crop of the zero-padded image at the original size, offsets
  from draws[:, 0:2], mirrored when draws[:, 2] < 1/2 (one gather for the
  whole batch). draws: (n, 3) uniform in [0, 1)."""
  n, height, width, _ = pixels.shape
  padded = np.pad(pixels, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  dy, dx = (draws[:, :2].T * (2 * padding + 1)).astype(np.int64)
  rows = dy[:, None] + np.arange(height)
  cols = dx[:, None] + np.arange(width)
  cols = np.where((draws[:, 2] < 0.5)[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _array_dataset(
    config: Any,
    loaded: tuple[tuple, tuple, tuple[str, ...]],
    process_index: int,
    process_count: int,
    transform: data.Transform,
    random_draws: int = 0,
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> data.ArrayDataset:
  train, test, class_names = loaded
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
      random_draws=random_draws,
      train_examples=config.dataset.train_examples,
      class_names=class_names,
      normalization=normalization,
  )


def _cifar10(config: Any, process_index: int, process_count: int) -> data.Dataset:
  """CIFAR-10; train: 4-pixel zero-pad random crop + flip, then normalise."""
  mean, std = normalization_stats(config, 3)

  def transform(pixels: np.ndarray, draws: np.ndarray | None) -> np.ndarray:
    if draws is not None:
      pixels = random_crop_and_flip(pixels, draws, _CIFAR_PADDING)
    return (pixels - mean) / std

  loaded = _load_tfds_arrays("cifar10", config)
  return _array_dataset(config, loaded, process_index, process_count, transform, random_draws=3)


def _mnist(config: Any, process_index: int, process_count: int) -> data.Dataset:
  """MNIST, normalised only. dataset.mean/std are used if they have a single
  entry; otherwise (the RGB default) MNIST's own 0.1307 / 0.3081."""
  mean, std = normalization_stats(config, 1, default=(_MNIST_MEAN, _MNIST_STD))
  return _array_dataset(
      config,
      _load_tfds_arrays("mnist", config),
      process_index,
      process_count,
      lambda pixels, draws: (pixels - mean) / std,
      normalization=((float(mean[0]) / 255,), (float(std[0]) / 255,)),
  )


_IN_MEMORY: dict[str, Callable[[Any, int, int], data.Dataset]] = {
    "cifar10": _cifar10,
    "mnist": _mnist,
}
