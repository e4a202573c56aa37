"""Tests of the TFDS input pipelines on mocked TFDS data and generated files.

TFDS's `mock_data` serves every split (and every slice of one) with the same
examples, which would make per-process and eval-count checks vacuous; so
imagenet2012 and cifar10 are mocked with real split metadata (`USE_FILES`) and,
for imagenet2012, an `as_dataset_fn` that honours the requested slice.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mnv2_flax import config_lib, input_pipeline

NUM_TRAIN, NUM_EVAL = 36, 13  # 36 // 8 = 4 steps per epoch; 13 pads eval.
IMAGE_SIZE = 32


def make_config(**overrides: Any) -> ml_collections.ConfigDict:
  """base_config() with small batches; keys are dotted, e.g. dataset__name."""
  config = config_lib.base_config()
  config.update_from_flattened_dict(
      {
          "global_batch_size": 8,
          "eval_batch_size": 8,
          "dataset.image_size": IMAGE_SIZE,
          "dataset.shuffle_buffer": 16,
          **{k.replace("__", "."): v for k, v in overrides.items()},
      }
  )
  return config


def write_split_metadata(data_dir: str, name: str, sizes: dict[str, int]) -> None:
  """Writes the dataset_info a prepared `name` would have, with these splits."""
  builder = tfds.builder(name, data_dir=data_dir)
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


def random_jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  return tf.io.encode_jpeg(pixels).numpy()


# ------------------------------------------------------------------------------
# Shared checks.
# ------------------------------------------------------------------------------


def check_batch(batch: dict[str, np.ndarray], shape: tuple[int, ...], num_classes: int) -> None:
  assert batch["image"].shape == shape and batch["image"].dtype == np.float32
  assert np.isfinite(batch["image"]).all()
  assert -3.0 < batch["image"].min() and batch["image"].max() < 3.0
  assert batch["label"].dtype == np.int32 and batch["label"].shape == shape[:1]
  assert ((0 <= batch["label"]) & (batch["label"] < num_classes)).all()


def check_resume(dataset: Any, steps_per_epoch: int) -> None:
  """Resuming at step k yields batches k, k + 1 of an uninterrupted run,
  within an epoch, across the epoch boundary and in the second epoch."""
  reference = list(itertools.islice(dataset.train_batches(0), 2 * steps_per_epoch))
  for k in (1, steps_per_epoch - 1, steps_per_epoch + 1):
    resumed = list(itertools.islice(dataset.train_batches(k), 2))
    for got, want in zip(resumed, reference[k : k + 2], strict=True):
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])
  # Epochs are reshuffled and re-augmented.
  assert not np.array_equal(reference[0]["image"], reference[steps_per_epoch]["image"])


def eval_rows(make: Callable[[int, int], Any], process_count: int) -> list[np.ndarray]:
  """The unmasked eval images of each process, checking the padding contract."""
  per_process = [list(make(i, process_count).eval_batches()) for i in range(process_count)]
  assert len({len(batches) for batches in per_process}) == 1
  rows = []
  for batches in per_process:
    for batch in batches:
      assert batch["mask"].dtype == np.float32
      assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
      # Padding only at the end of a batch.
      assert (np.diff(batch["mask"]) <= 0).all()
      rows.append(batch["image"][batch["mask"] == 1])
  return rows


def check_eval_exactly_once(make: Callable[[int, int], Any], num_examples: int) -> None:
  """Across 1, 2 and 4 processes the unmasked examples are the same, once each."""
  single = np.concatenate(eval_rows(make, 1))
  assert len(single) == num_examples
  for process_count in (2, 4):
    np.testing.assert_array_equal(np.concatenate(eval_rows(make, process_count)), single)


# ------------------------------------------------------------------------------
# imagenet2012 (mocked).
# ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_files(tmp_path_factory) -> tuple[str, dict[str, list[bytes]]]:
  """Split metadata and JPEGs of varied shapes; label = index in the split."""
  data_dir = str(tmp_path_factory.mktemp("imagenet_data"))
  write_split_metadata(data_dir, "imagenet2012", {"train": NUM_TRAIN, "validation": NUM_EVAL})
  rng = np.random.default_rng(0)
  images = {
      split: [random_jpeg(rng, *rng.integers(24, 64, 2)) for _ in range(n)]
      for split, n in (("train", NUM_TRAIN), ("validation", NUM_EVAL))
  }
  return data_dir, images


@pytest.fixture
def mock_imagenet(imagenet_files) -> Iterator[None]:
  data_dir, images = imagenet_files

  def as_dataset(builder, split, decoders=None, read_config=None, shuffle_files=False):
    del decoders, read_config, shuffle_files  # Images stay encoded; order fixed.
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
    window = [slice(i.from_, i.to) for i in instructions]  # Bounds may be None.
    return tf.data.Dataset.from_tensor_slices(
        {
            "image": sum((images[i.splitname][w] for i, w in zip(instructions, window)), []),
            "label": np.concatenate(
                [np.arange(len(images[i.splitname]))[w] for i, w in zip(instructions, window)]
            ),
        }
    )

  with tfds.testing.mock_data(
      policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir, as_dataset_fn=as_dataset
  ):
    yield


def imagenet(process_index: int = 0, process_count: int = 1, **overrides: Any):
  config = make_config(dataset__name="imagenet2012", **overrides)
  return input_pipeline.create_dataset(
      config, process_index=process_index, process_count=process_count
  )


def test_imagenet_batches(mock_imagenet):
  dataset = imagenet()
  assert dataset.info.num_classes == 1000
  assert dataset.info.image_shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
  assert (dataset.info.num_train_examples, dataset.info.num_eval_examples) == (NUM_TRAIN, NUM_EVAL)
  for batch in itertools.islice(dataset.train_batches(), 5):
    check_batch(batch, (8, IMAGE_SIZE, IMAGE_SIZE, 3), 1000)
  for batch in dataset.eval_batches():
    check_batch(batch, (8, IMAGE_SIZE, IMAGE_SIZE, 3), 1000)


def test_imagenet_processes_read_disjoint_shards(mock_imagenet):
  labels = [next(imagenet(i, 2).train_batches())["label"] for i in range(2)]
  assert all(len(batch_labels) == 4 for batch_labels in labels)
  assert len(set(np.concatenate(labels))) == 8
  # Contiguous shards of the split: [0, 18) and [18, 36).
  assert labels[0].max() < NUM_TRAIN // 2 <= labels[1].min()


def test_imagenet_resume_is_exact(mock_imagenet):
  check_resume(imagenet(), NUM_TRAIN // 8)


def test_imagenet_eval_exactly_once(mock_imagenet):
  check_eval_exactly_once(imagenet, NUM_EVAL)
  labels = np.concatenate([b["label"][b["mask"] == 1] for b in imagenet(1, 2).eval_batches()])
  np.testing.assert_array_equal(labels, np.arange(7, NUM_EVAL))


def test_imagenet_needs_manual_download(tmp_path):
  manual_dir = tmp_path / "manual"
  with pytest.raises(config_lib.ConfigError) as error:
    imagenet(dataset__data_dir=str(tmp_path / "data"), dataset__manual_dir=str(manual_dir))
  message = str(error.value)
  assert message.startswith("config.dataset.manual_dir:")
  for expected in (str(manual_dir), "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    assert expected in message


def test_preprocess_train_is_a_function_of_the_seed():
  config = make_config(dataset__image_size=24)
  image = random_jpeg(np.random.default_rng(1), 50, 70)

  def train(seed: list[int]) -> np.ndarray:
    return input_pipeline.preprocess_train(image, tf.constant(seed, tf.int64), config).numpy()

  assert train([3, 4]).shape == (24, 24, 3) and train([3, 4]).dtype == np.float32
  np.testing.assert_array_equal(train([3, 4]), train([3, 4]))
  assert not np.array_equal(train([3, 4]), train([3, 5]))


def test_preprocess_eval_center_crop():
  """A lossless PNG, crop fraction 1, no resize: the normalised center square."""
  config = make_config(dataset__image_size=20, dataset__eval_crop_fraction=1.0)
  pixels = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
  out = input_pipeline.preprocess_eval(tf.io.encode_png(pixels), config)
  mean = np.array(config.dataset.mean) * 255
  std = np.array(config.dataset.std) * 255
  np.testing.assert_allclose(out, (pixels[:, 5:25] - mean) / std, atol=1e-4)


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


def test_cifar10(tmp_path):
  with mock_in_memory(tmp_path, "cifar10", 24):
    dataset = input_pipeline.create_dataset(
        make_config(dataset__name="cifar10"), process_index=0, process_count=1
    )
  assert dataset.info.num_classes == 10
  assert dataset.info.image_shape == (32, 32, 3)  # Native; resized on device.
  for batch in itertools.islice(dataset.train_batches(), 4):
    check_batch(batch, (8, 32, 32, 3), 10)
  batches = list(dataset.eval_batches())
  assert sum(b["mask"].sum() for b in batches) == 24
  check_resume(dataset, 24 // 8)


def test_cifar10_crop_and_flip():
  """Each output is a window of the zero-padded image, possibly mirrored."""
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (64, 6, 5, 3), dtype=np.uint8)
  # pylint: disable-next=protected-access
  out = input_pipeline._random_crop_and_flip(images, rng, padding=2)
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
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
    dataset = input_pipeline.create_dataset(
        make_config(dataset__name="mnist", dataset__mean=mean, dataset__std=std),
        process_index=0,
        process_count=1,
    )
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
FOLDER_TRAIN_PER_CLASS, FOLDER_TEST_PER_CLASS = 6, 3


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> str:
  """train/ and test/ with 3 classes, one PNG, and one corrupt file per split."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for split, per_class in (("train", FOLDER_TRAIN_PER_CLASS), ("test", FOLDER_TEST_PER_CLASS)):
    for name in FOLDER_CLASSES:
      (root / split / name).mkdir(parents=True)
      for i in range(per_class):
        (root / split / name / f"{i}.jpg").write_bytes(random_jpeg(rng, *rng.integers(24, 64, 2)))
    pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    (root / split / "cat" / "0.jpg").unlink()
    (root / split / "cat" / "0.png").write_bytes(tf.io.encode_png(pixels).numpy())
    jpeg = random_jpeg(rng, 40, 40)
    (root / split / "dog" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
  return str(root)


def image_folder(root: str, process_index: int = 0, process_count: int = 1):
  config = make_config(
      dataset__name="imagefolder", dataset__root=root, global_batch_size=4, eval_batch_size=4
  )
  return input_pipeline.create_dataset(
      config, process_index=process_index, process_count=process_count
  )


def test_image_folder_batches_skip_corrupt_files(image_root, caplog):
  with caplog.at_level(logging.WARNING):
    dataset = image_folder(image_root)
  assert "skipping 1 of 19 images" in caplog.text
  assert dataset.info.num_classes == len(FOLDER_CLASSES)
  assert dataset.info.num_train_examples == 3 * FOLDER_TRAIN_PER_CLASS
  assert dataset.info.num_eval_examples == 3 * FOLDER_TEST_PER_CLASS
  for batch in itertools.islice(dataset.train_batches(), 6):
    check_batch(batch, (4, IMAGE_SIZE, IMAGE_SIZE, 3), 3)


def test_image_folder_resume_and_process_count(image_root):
  dataset = image_folder(image_root)
  check_resume(dataset, 3 * FOLDER_TRAIN_PER_CLASS // 4)
  # A step's global batch doesn't depend on the process count.
  whole = list(itertools.islice(dataset.train_batches(3), 2))
  halves = [
      list(itertools.islice(image_folder(image_root, i, 2).train_batches(3), 2)) for i in range(2)
  ]
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(
        np.concatenate([h[step]["image"] for h in halves]), batch["image"]
    )


def test_image_folder_eval_exactly_once(image_root):
  check_eval_exactly_once(lambda i, n: image_folder(image_root, i, n), 3 * FOLDER_TEST_PER_CLASS)


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
  (tmp_path / "train" / "cat" / "a.jpg").write_bytes(random_jpeg(np.random.default_rng(0), 8, 8))
  fails(tmp_path, "test (or val)")
  (tmp_path / "val" / "cat").mkdir(parents=True)
  (tmp_path / "val" / "cat" / "a.jpg").write_bytes(b"not an image")
  fails(tmp_path, "none of the 1 images", os.path.join(tmp_path, "val"))
