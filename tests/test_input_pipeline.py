"""Tests of the data pipelines on mocked TFDS data and generated files.

TFDS's `mock_data` serves every split (and every slice of one) with the same
examples, which would make per-process and eval-count checks vacuous; so
imagenet2012 is mocked with real split metadata (`USE_FILES`) and an
`as_data_source_fn` that serves each split its own JPEGs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mnv2_flax import config_lib, data, datasets, folders, input_pipeline

from image_files import (
    encode,
    random_jpeg,
    run_without_tensorflow,
    shared_memory_names,
    write_imagenet_tars,
)

NUM_TRAIN, NUM_EVAL = 36, 13  # 36 // 8 = 4 steps per epoch; 13 pads eval.
IMAGE_SIZE = 32


def make_config(**overrides: Any) -> ml_collections.ConfigDict:
  """base_config() with small batches, decoding in the test process; keys are
  dotted, e.g. dataset__name."""
  config = config_lib.base_config()
  config.update_from_flattened_dict(
      {
          "global_batch_size": 8,
          "eval_batch_size": 8,
          "dataset.image_size": IMAGE_SIZE,
          "dataset.workers": 0,
          **{k.replace("__", "."): v for k, v in overrides.items()},
      }
  )
  return config


def create(config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1, **kw):
  return datasets.create_dataset(
      config, process_index=process_index, process_count=process_count, **kw
  )


def write_split_metadata(data_dir: str, name: str, sizes: dict[str, int], **kwargs: Any) -> None:
  """Writes the dataset_info a prepared `name` would have, with these splits."""
  builder = tfds.builder(name, data_dir=data_dir, **kwargs)
  builder.info.set_splits(
      tfds.core.SplitDict(
          [
              tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0)
              for split, n in sizes.items()
          ]
      )
  )
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)


# ------------------------------------------------------------------------------
# Shared checks.
# ------------------------------------------------------------------------------


def check_batch(
    batch: dict[str, np.ndarray], shape: tuple[int, ...], num_classes: int, dtype: type = np.uint8
) -> None:
  """Streamed images come as uint8 pixels, in-memory ones normalised (float32)."""
  assert batch["image"].shape == shape and batch["image"].dtype == dtype
  if dtype == np.float32:
    assert np.isfinite(batch["image"]).all()
    assert -3.0 < batch["image"].min() and batch["image"].max() < 3.0
  assert batch["label"].dtype == np.int32 and batch["label"].shape == shape[:1]
  assert ((0 <= batch["label"]) & (batch["label"] < num_classes)).all()


def assert_batches_equal(got: list[dict], want: list[dict]) -> None:
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def check_resume(dataset: Any, steps_per_epoch: int) -> None:
  """Resuming at step k yields batches k, k + 1 of an uninterrupted run,
  within an epoch, across the epoch boundary and in the second epoch."""
  reference = list(itertools.islice(dataset.train_batches(0), 2 * steps_per_epoch))
  for k in (1, steps_per_epoch - 1, steps_per_epoch + 1):
    assert_batches_equal(list(itertools.islice(dataset.train_batches(k), 2)), reference[k : k + 2])
  # Epochs are reshuffled and re-augmented.
  assert not np.array_equal(reference[0]["image"], reference[steps_per_epoch]["image"])


def check_process_halves(make: Callable[[int, int], Any], start_step: int) -> None:
  """2 processes' batches are disjoint halves of the 1-process global batch."""
  whole = list(itertools.islice(make(0, 1).train_batches(start_step), 2))
  halves = [list(itertools.islice(make(i, 2).train_batches(start_step), 2)) for i in range(2)]
  for step, batch in enumerate(whole):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([h[step][key] for h in halves]), batch[key])


def eval_rows(make: Callable[[int, int], Any], process_count: int) -> list[tuple[np.ndarray, ...]]:
  """The unmasked eval (images, labels) of each process, checking the padding contract."""
  per_process = [list(make(i, process_count).eval_batches()) for i in range(process_count)]
  assert len({len(batches) for batches in per_process}) == 1
  rows = []
  for batches in per_process:
    for batch in batches:
      assert batch["mask"].dtype == np.float32
      assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
      rows.append((batch["image"][batch["mask"] == 1], batch["label"][batch["mask"] == 1]))
  return rows


def check_eval_exactly_once(make: Callable[[int, int], Any], num_examples: int) -> None:
  """Across 1, 2 and 4 processes the unmasked examples are the same, once each."""
  single = [np.concatenate(x) for x in zip(*eval_rows(make, 1))]
  assert len(single[0]) == num_examples
  for process_count in (2, 4):
    rows = [np.concatenate(x) for x in zip(*eval_rows(make, process_count))]
    for got, want in zip(rows, single):
      np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------
# imagenet2012 (mocked).
# ------------------------------------------------------------------------------


class Records(list):
  """A split's records that counts reads (the records a resume reads)."""

  reads = 0

  def __getitem__(self, index):
    Records.reads += 1
    return super().__getitem__(index)


@pytest.fixture(scope="module")
def imagenet_files(tmp_path_factory) -> tuple[str, dict[str, Records]]:
  """Split metadata and JPEGs of varied shapes; label = index in the split."""
  data_dir = str(tmp_path_factory.mktemp("imagenet_data"))
  write_split_metadata(
      data_dir,
      "imagenet2012",
      {"train": NUM_TRAIN, "validation": NUM_EVAL},
      file_format="array_record",
  )
  rng = np.random.default_rng(0)
  records = {
      split: Records(
          {"image": random_jpeg(rng, *rng.integers(24, 64, 2)), "label": i, "file_name": b"x"}
          for i in range(n)
      )
      for split, n in (("train", NUM_TRAIN), ("validation", NUM_EVAL))
  }
  return data_dir, records


@pytest.fixture
def mock_imagenet(imagenet_files) -> Iterator[dict[str, Records]]:
  data_dir, records = imagenet_files

  def as_data_source(builder, split, **kwargs):
    del builder, kwargs  # Images stay encoded.
    return records[split]

  with tfds.testing.mock_data(
      policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir, as_data_source_fn=as_data_source
  ):
    yield records


def imagenet(process_index: int = 0, process_count: int = 1, mode: str = "train", **overrides: Any):
  config = make_config(dataset__name="imagenet2012", **overrides)
  return create(config, process_index, process_count, mode=mode)


def test_imagenet_batches(mock_imagenet):
  dataset = imagenet()
  assert dataset.info.num_classes == 1000 and dataset.info.class_names[0].startswith("tench")
  assert dataset.info.image_shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
  assert (dataset.info.num_train_examples, dataset.info.num_eval_examples) == (NUM_TRAIN, NUM_EVAL)
  epoch = list(itertools.islice(dataset.train_batches(), NUM_TRAIN // 8))
  for batch in epoch:
    check_batch(batch, (8, IMAGE_SIZE, IMAGE_SIZE, 3), 1000)
    np.testing.assert_array_equal(batch["unreadable"], np.zeros(8))
  # An epoch is a permutation: no example twice.
  labels = np.concatenate([b["label"] for b in epoch])
  assert len(set(labels)) == len(labels) == NUM_TRAIN // 8 * 8
  for batch in dataset.eval_batches():
    check_batch(batch, (8, IMAGE_SIZE, IMAGE_SIZE, 3), 1000)


def test_imagenet_resume_is_exact_and_reads_only_its_records(mock_imagenet):
  dataset = imagenet()
  check_resume(dataset, NUM_TRAIN // 8)
  # Resuming at the epoch's last step reads that step's 8 records, not the
  # 24 before them.
  Records.reads = 0
  next(dataset.train_batches(NUM_TRAIN // 8 - 1))
  assert Records.reads == 8


def test_imagenet_processes_split_each_global_batch(mock_imagenet):
  check_process_halves(imagenet, start_step=3)


def test_imagenet_eval_exactly_once(mock_imagenet):
  check_eval_exactly_once(imagenet, NUM_EVAL)
  labels = np.concatenate([b["label"][b["mask"] == 1] for b in imagenet(1, 2).eval_batches()])
  np.testing.assert_array_equal(labels, np.arange(7, NUM_EVAL))


def test_imagenet_evaluation_reads_only_validation(mock_imagenet):
  dataset = imagenet(mode="eval")
  assert (dataset.info.num_train_examples, dataset.info.num_eval_examples) == (0, NUM_EVAL)
  assert sum(int(b["mask"].sum()) for b in dataset.eval_batches()) == NUM_EVAL


def test_imagenet_needs_manual_download(tmp_path):
  manual_dir = tmp_path / "manual"
  with pytest.raises(config_lib.ConfigError) as error:
    imagenet(dataset__data_dir=str(tmp_path / "data"), dataset__manual_dir=str(manual_dir))
  message = str(error.value)
  assert message.startswith("config.dataset.manual_dir:")
  for expected in (str(manual_dir), "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    assert expected in message


@pytest.mark.slow
def test_imagenet_is_prepared_from_the_manual_tars_and_read_without_tensorflow(tmp_path):
  """TFDS's own preparation from tars laid out as image-net.org ships them,
  into ArrayRecord files that the pipeline then reads, also where
  TensorFlow cannot be imported."""
  manual_dir = str(tmp_path / "manual")
  write_imagenet_tars(manual_dir, folders.imagenet_synsets()[:3], np.random.default_rng(0))
  config = make_config(
      dataset__name="imagenet2012",
      dataset__data_dir=str(tmp_path / "data"),
      dataset__manual_dir=manual_dir,
      global_batch_size=4,
      eval_batch_size=4,
  )
  dataset = create(config)
  assert (dataset.info.num_train_examples, dataset.info.num_eval_examples) == (12, 5)
  assert list(tmp_path.glob("data/imagenet2012/*/*.array_record-*"))
  labels = np.concatenate([b["label"] for b in itertools.islice(dataset.train_batches(), 3)])
  assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4
  # The validation labels are TFDS's (the first five of its label file).
  assert [int(b["mask"].sum()) for b in dataset.eval_batches()] == [4, 1]
  script = f"""
import itertools, ml_collections
from mnv2_flax import datasets
config = ml_collections.ConfigDict({config.to_dict()!r})
dataset = datasets.create_dataset(config, process_index=0, process_count=1)
labels = [b["label"].tolist() for b in itertools.islice(dataset.train_batches(), 3)]
print(labels, sum(int(b["mask"].sum()) for b in dataset.eval_batches()))
"""
  want = [b["label"].tolist() for b in itertools.islice(dataset.train_batches(), 3)]
  assert run_without_tensorflow(script, tmp_path).split() == f"{want} 5".split()


# ------------------------------------------------------------------------------
# cifar10 and mnist (mocked, in memory).
# ------------------------------------------------------------------------------


@contextlib.contextmanager
def mock_in_memory(tmp_path, name: str, num_examples: int) -> Iterator[None]:
  write_split_metadata(str(tmp_path), name, {"train": num_examples, "test": num_examples})
  with tfds.testing.mock_data(
      num_examples=num_examples, data_dir=str(tmp_path), policy=tfds.testing.MockPolicy.USE_FILES
  ):
    yield


def test_digits_are_scikit_learns():
  # Read from scikit-learn's file without importing it: the same arrays.
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

  images, labels = data.sklearn_digits()
  digits = sk_datasets.load_digits()
  np.testing.assert_array_equal(images, digits.images)
  np.testing.assert_array_equal(labels, digits.target)


def test_cifar10(tmp_path):
  with mock_in_memory(tmp_path, "cifar10", 24):
    dataset = create(make_config(dataset__name="cifar10"))
    halves = [create(make_config(dataset__name="cifar10"), i, 2) for i in range(2)]
  assert dataset.info.num_classes == 10
  assert dataset.info.image_shape == (32, 32, 3)  # Native; resized on device.
  for batch in itertools.islice(dataset.train_batches(), 4):
    check_batch(batch, (8, 32, 32, 3), 10, np.float32)
  batches = list(dataset.eval_batches())
  assert sum(b["mask"].sum() for b in batches) == 24
  check_resume(dataset, 24 // 8)
  # Augmented alike in 1 and 2 processes.
  check_process_halves(lambda i, n: dataset if n == 1 else halves[i], start_step=1)


def test_cifar10_crop_and_flip():
  """Each output is a window of the zero-padded image, possibly mirrored."""
  rng = np.random.default_rng(0)
  pixels = rng.integers(1, 256, (64, 6, 5, 3), dtype=np.uint8)
  out = input_pipeline.random_crop_and_flip(pixels, rng.random((64, 3)), padding=2)
  padded = np.pad(pixels, ((0, 0), (2, 2), (2, 2), (0, 0)))
  seen = set()
  for image, result in zip(padded, out):
    windows = {
        (dy, dx, flip): image[dy : dy + 6, dx : dx + 5, :][:, :: -1 if flip else 1]
        for dy in range(5)
        for dx in range(5)
        for flip in (False, True)
    }
    matches = [k for k, w in windows.items() if np.array_equal(w, result)]
    assert matches
    seen.update(matches)
  assert {flip for _, _, flip in seen} == {False, True}
  assert len({(dy, dx) for dy, dx, _ in seen}) > 10


@pytest.mark.parametrize(
    "mean,std", [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,), (0.5,))]
)
def test_mnist_normalisation(tmp_path, mean, std):
  with mock_in_memory(tmp_path, "mnist", 16):
    dataset = create(make_config(dataset__name="mnist", dataset__mean=mean, dataset__std=std))
  assert dataset.info.image_shape == (28, 28, 1)
  batch = next(dataset.train_batches())
  # The RGB default falls back to MNIST's own statistics.
  m, s = (0.1307, 0.3081) if len(mean) == 3 else (mean[0], std[0])
  np.testing.assert_allclose(
      [batch["image"].min(), batch["image"].max()], [(0 - m) / s, (1 - m) / s], atol=0.02
  )


# ------------------------------------------------------------------------------
# imagefolder (generated files).
# ------------------------------------------------------------------------------

FOLDER_CLASSES = ("bird", "cat", "dog")
# What cameras and datasets ship, one format per file in turn.
FORMATS = (
    ("jpg", "JPEG", {}),
    ("png", "PNG", {}),
    ("tif", "TIFF", {}),
    ("bmp", "BMP", {}),
    ("webp", "WEBP", {"lossless": True}),
    ("gif", "GIF", {}),
    ("JPEG", "JPEG", {"progressive": True}),
)
# Unreadable files, with readable extensions.
BROKEN = {
    "empty.jpg": lambda jpeg: b"",
    "truncated.jpg": lambda jpeg: jpeg[: len(jpeg) // 2],
    "text.jpg": lambda jpeg: b"<html>404 Not Found</html>\n",
}


def write_images(directory, rng: np.random.Generator, count: int, start: int = 0) -> None:
  """`count` images of varied sizes, the formats of FORMATS in turn."""
  os.makedirs(directory, exist_ok=True)
  for i in range(start, start + count):
    ext, fmt, params = FORMATS[i % len(FORMATS)]
    pixels = rng.integers(0, 256, rng.integers(24, 48, 2).tolist() + [3], dtype=np.uint8)
    with open(os.path.join(directory, f"{i}.{ext}"), "wb") as f:
      f.write(encode(pixels, fmt, **params))


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> str:
  """train/ (3 classes x 7 images, one in a nested folder, the 3 broken files
  in dog/: 24 images) and test/ (3 x 3, and one broken), plus what is not an
  image: hidden files, notes, a CSV outside the class folders."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for name in FOLDER_CLASSES:
    write_images(root / "train" / name, rng, 6)
    write_images(root / "train" / name / "more", rng, 1, start=6)  # Nested: used.
    write_images(root / "test" / name, rng, 3)
  jpeg = random_jpeg(rng, 40, 40)
  for name, damage in BROKEN.items():
    (root / "train" / "dog" / name).write_bytes(damage(jpeg))
  (root / "test" / "cat" / "3.png").write_bytes(b"")
  for split in ("train", "test"):
    (root / split / ".DS_Store").write_bytes(b"\0\1")
    (root / split / "cat" / "._0.jpg").write_bytes(b"AppleDouble")
    (root / split / "cat" / "notes.txt").write_text("not an image")
  (root / "train" / "labels.csv").write_text("file,label\n")
  return str(root)


def image_folder(root: str, process_index: int = 0, process_count: int = 1, **overrides):
  mode = overrides.pop("mode", "train")
  class_names = overrides.pop("class_names", ())
  config = make_config(
      dataset__name="imagefolder",
      dataset__root=root,
      global_batch_size=4,
      eval_batch_size=4,
      **overrides,
  )
  return create(config, process_index, process_count, mode=mode, class_names=class_names)


def test_image_folder_lists_every_format_and_nested_files(image_root, caplog):
  with caplog.at_level(logging.WARNING):
    dataset = image_folder(image_root)
  assert dataset.info.class_names == FOLDER_CLASSES
  assert (dataset.info.num_train_examples, dataset.info.num_eval_examples) == (24, 10)
  # Non-images are counted in one warning per split; hidden files silently.
  assert "ignored 2 file(s)" in caplog.text and "ignored 1 file(s)" in caplog.text
  assert "DS_Store" not in caplog.text and "._0" not in caplog.text
  train = folders.list_split(os.path.join(image_root, "train"))
  extensions = {os.path.splitext(p)[1] for p in train.paths}
  assert extensions == {f".{ext}" for ext, _, _ in FORMATS}
  assert "cat/more/6.JPEG" in train.paths


def test_image_folder_substitutes_broken_files_and_names_them_once(image_root, caplog):
  dataset = image_folder(image_root)
  steps_per_epoch = 24 // 4
  with caplog.at_level(logging.WARNING):
    batches = list(itertools.islice(dataset.train_batches(), 2 * steps_per_epoch))
  for batch in batches:
    check_batch(batch, (4, IMAGE_SIZE, IMAGE_SIZE, 3), 3)
    assert set(batch) == {"image", "label", "unreadable"}
  # Each epoch reads every file once: 3 substitutions, dogs in their place
  # or others (the next readable file of the epoch's order).
  for epoch in range(2):
    epoch_batches = batches[epoch * steps_per_epoch : (epoch + 1) * steps_per_epoch]
    assert sum(b["unreadable"].sum() for b in epoch_batches) == 3
  for name in BROKEN:
    assert caplog.text.count(os.path.join("dog", name)) == 1
  assert dataset.unreadable["train"].failed == 6


def test_image_folder_resume_processes_and_workers(image_root):
  dataset = image_folder(image_root)
  check_resume(dataset, 24 // 4)
  check_process_halves(lambda i, n: image_folder(image_root, i, n), start_step=4)


@pytest.mark.slow
def test_image_folder_training_images_come_in_reused_shared_memory(image_root):
  """Workers write the images into blocks of shared memory, free again once
  the batch is gone: the in-process batches, a block kept busy by a JAX array
  that may alias it, the images through Grain (here pickled: 12 KB) when the
  loop holds more batches than there are blocks; the blocks unlinked when the
  stream is closed."""
  steps = 2 * 2 * input_pipeline._BLOCKS_PER_WORKER + 4
  want = list(itertools.islice(image_folder(image_root).train_batches(3), steps))
  stream = image_folder(image_root, dataset__workers=2).train_batches(3)
  first = next(stream)
  assert isinstance(first["image"].base, mmap.mmap)  # A block's.
  on_device = jax.device_put(first["image"])
  del first
  for want_batch in want[1 : steps // 2]:  # Each dropped: blocks reused.
    assert_batches_equal([next(stream)], [want_batch])
  np.testing.assert_array_equal(on_device, want[0]["image"])
  held = [next(stream) for _ in want[steps // 2 :]]
  assert_batches_equal(held, want[steps // 2 :])
  assert 0 < sum(isinstance(b["image"].base, mmap.mmap) for b in held) < len(held)
  assert shared_memory_names(os.getpid())
  stream.close()
  assert not shared_memory_names(os.getpid())
  np.testing.assert_array_equal(held[0]["image"], want[steps // 2]["image"])


@pytest.mark.slow
def test_image_folder_eval_does_not_depend_on_the_worker_count(image_root):
  """Grain's workers each decode every 2nd batch; the stream is in order.
  (Training batches: test_image_training's resume with other workers.)"""
  in_process = list(image_folder(image_root).eval_batches())
  assert_batches_equal(
      list(image_folder(image_root, dataset__workers=2).eval_batches()), in_process
  )


def test_image_folder_eval_exactly_once_and_unreadable_counted(image_root, caplog):
  check_eval_exactly_once(lambda i, n: image_folder(image_root, i, n), 9)
  with caplog.at_level(logging.WARNING):
    batches = list(image_folder(image_root).eval_batches())
  assert sum(b["unreadable"].sum() for b in batches) == 1
  assert sum(b["mask"].sum() for b in batches) == 9
  assert "test/cat/3.png (empty file): left out of the evaluation" in caplog.text


def test_image_folder_eval_only_is_labelled_by_the_checkpoints_classes(tmp_path):
  """val/ without train/ and without one class: labels by name, not position."""
  rng = np.random.default_rng(1)
  write_images(tmp_path / "val" / "dog", rng, 2)
  write_images(tmp_path / "val" / "bird", rng, 1)
  dataset = image_folder(str(tmp_path), mode="eval", class_names=FOLDER_CLASSES)
  assert dataset.info.class_names == FOLDER_CLASSES and dataset.info.num_train_examples == 0
  labels = np.concatenate([b["label"][b["mask"] == 1] for b in dataset.eval_batches()])
  assert labels.tolist() == [0, 2, 2]  # bird, dog, dog.
  write_images(tmp_path / "val" / "zebra", rng, 1)
  with pytest.raises(config_lib.ConfigError, match=r"/val/zebra is a class the checkpoint does"):
    image_folder(str(tmp_path), mode="eval", class_names=FOLDER_CLASSES)
  with pytest.raises(config_lib.ConfigError, match=r"no images in .*/train; training needs"):
    image_folder(str(tmp_path))


def test_image_folder_of_imagenet_synsets_takes_imagenet_labels(tmp_path):
  synsets = folders.imagenet_synsets()
  for synset in (synsets[1], synsets[999]):
    write_images(tmp_path / "val" / synset, np.random.default_rng(2), 1)
  dataset = image_folder(str(tmp_path), mode="eval", class_names=data.imagenet_class_names())
  (batch,) = dataset.eval_batches()
  assert batch["label"][batch["mask"] == 1].tolist() == [1, 999]


def test_image_folder_train_only(tmp_path):
  write_images(tmp_path / "train" / "a", np.random.default_rng(3), 4)
  write_images(tmp_path / "train" / "b", np.random.default_rng(4), 4)
  dataset = image_folder(str(tmp_path))
  assert (dataset.info.num_train_examples, dataset.info.num_eval_examples) == (8, 0)
  check_batch(next(dataset.train_batches()), (4, IMAGE_SIZE, IMAGE_SIZE, 3), 2)
  with pytest.raises(config_lib.ConfigError, match=r"^config.eval_every_steps: 5 needs an eval"):
    image_folder(str(tmp_path), eval_every_steps=5)
  with pytest.raises(config_lib.ConfigError, match=r"no images in .*/test or .*/val; evaluation"):
    image_folder(str(tmp_path), mode="eval")


def test_image_folder_of_mostly_broken_files_stops(tmp_path):
  rng = np.random.default_rng(5)
  write_images(tmp_path / "train" / "a", rng, 1)
  write_images(tmp_path / "val" / "a", rng, 1)
  for i in range(7):
    (tmp_path / "train" / "a" / f"bad{i}.png").write_bytes(b"")
    (tmp_path / "val" / "a" / f"bad{i}.png").write_bytes(b"")
  dataset = image_folder(str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match=r"^config.dataset.root: \d+ of the \d+ images"):
    list(itertools.islice(dataset.train_batches(), 40))
  with pytest.raises(config_lib.ConfigError, match=r"7 of the 8 images read from .*/val cannot"):
    list(dataset.eval_batches())
  for i in range(1):
    os.remove(tmp_path / "train" / "a" / f"{i}.{FORMATS[i][0]}")
  with pytest.raises(config_lib.ConfigError, match=r"none of the 7 images of .*/train can be"):
    next(image_folder(str(tmp_path)).train_batches())


def test_image_folder_errors(tmp_path):
  def fails(root, *expected: str) -> None:
    with pytest.raises(config_lib.ConfigError) as error:
      image_folder(str(root))
    assert str(error.value).startswith("config.dataset.root:")
    for text in expected:
      assert text in str(error.value)

  fails(tmp_path / "missing", str(tmp_path / "missing"))
  fails(tmp_path, os.path.join(tmp_path, "train"))  # Exists, but empty.
  (tmp_path / "train" / "cat").mkdir(parents=True)
  fails(tmp_path, os.path.join(tmp_path, "train"))  # A class, but no images.
  (tmp_path / "train" / "cat" / "a.txt").write_text("not an image")
  fails(tmp_path, os.path.join(tmp_path, "train"))
  (tmp_path / "val" / "dog").mkdir(parents=True)
  write_images(tmp_path / "train" / "cat", np.random.default_rng(6), 4)
  write_images(tmp_path / "val" / "dog", np.random.default_rng(7), 1)
  fails(tmp_path, os.path.join(tmp_path, "val", "dog"), "is a class", "train does not know")


def test_int8_calibration_takes_the_training_pixels_of_a_folder(image_root):
  from mnv2_flax import export  # pylint: disable=g-import-not-at-top

  config = make_config(dataset__name="imagefolder", dataset__root=image_root)
  spec = export.InputSpec(
      IMAGE_SIZE, 3, config.dataset.mean, config.dataset.std, 0.875, "imagefolder", FOLDER_CLASSES
  )
  calibration = export.calibration_images(config, spec, 6)
  config.global_batch_size = 6  # As calibration_images sets it: the first 6 of step 0.
  first = next(create(config).train_batches())["image"]
  assert calibration.dtype == np.float32
  np.testing.assert_array_equal(calibration, first)


def test_show_summarises_a_folder_and_draws_what_the_model_sees(image_root, tmp_path):
  config = make_config(
      dataset__name="imagefolder", dataset__root=image_root, global_batch_size=4, eval_batch_size=4
  )
  summary = datasets.show(config, str(tmp_path), images=6)
  train, evaluation = summary["train"], summary["eval"]
  assert (train["images"], evaluation["images"]) == (24, 10)
  assert train["classes"] == {"bird": 7, "cat": 7, "dog": 7}
  assert evaluation["classes"] == {"bird": 3, "cat": 3, "dog": 3}
  assert sorted(os.path.basename(name) for name in train["unreadable"]) == sorted(BROKEN)
  assert list(evaluation["unreadable"]) == [os.path.join(image_root, "test", "cat", "3.png")]
  with open(tmp_path / "summary.json") as f:
    assert json.load(f) == summary
  # The grid's first tile is step 0's first image (uint8 pixels), upscaled.
  grid = np.asarray(Image.open(tmp_path / "train.png"))
  assert grid.shape == (96 + 14, 6 * 96, 3)
  first = next(image_folder(image_root).train_batches())["image"][0]
  np.testing.assert_array_equal(grid[:96:3, :96:3], first)
  assert Image.open(tmp_path / "eval.png").size == (6 * 96, 96 + 14)
