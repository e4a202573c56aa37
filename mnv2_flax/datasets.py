"""Builds the dataset a config names: the one entry point of the data path.

The embedded digits set and synthetic data come from `data` (numpy only);
the TFDS and image-folder datasets from `input_pipeline`, the package's only
TensorFlow user, imported here lazily so that training on the other datasets
never imports TensorFlow. Keeping this dispatch out of `data` (which both of
them build on) keeps the package's imports acyclic.
"""

from __future__ import annotations

from typing import Any

from mnv2_flax import data
from mnv2_flax.errors import ConfigError


def create_dataset(config: Any, *, process_index: int, process_count: int) -> data.Dataset:
  """Builds `config.dataset.name` (one of `data.DATASETS`) for this process."""
  name = config.dataset.name
  kwargs = dict(
      global_batch_size=config.global_batch_size,
      eval_batch_size=config.eval_batch_size,
      seed=config.seed,
  )
  if name == "digits":
    train, test = data.load_digits(config.dataset.image_size)
    return data.ArrayDataset(
        train,
        test,
        10,
        process_index=process_index,
        process_count=process_count,
        train_examples=config.dataset.train_examples,
        normalization=data.digits_normalization(config.dataset.image_size),
        **kwargs,
    )
  if name == "synthetic":
    return data.SyntheticDataset(
        config.dataset.image_size, config.dataset.num_classes, process_count=process_count, **kwargs
    )
  if name in data.TFDS_DATASETS:
    from mnv2_flax import input_pipeline  # pylint: disable=g-import-not-at-top

    return input_pipeline.create_dataset(
        config, process_index=process_index, process_count=process_count
    )
  raise ConfigError(f"config.dataset.name: must be one of {data.DATASETS}, got {name!r}")
