"""Builds the dataset a config names: the one entry point of the data path.

The embedded digits set and synthetic data come from `data` (numpy only);
image folders, ImageNet, CIFAR-10 and MNIST from `input_pipeline`, imported
here lazily. Keeping this dispatch out of `data` (which `input_pipeline`
builds on) keeps the package's imports acyclic.

As a command line, it shows a dataset as the model will see it, without
training: per split the image count, the classes and their counts, the files
that cannot be read, and PNG grids of the first training examples (augmented)
and evaluation examples, de-normalised, with their class names:

  python -m mnv2_flax.datasets --config=configs/imagefolder.py \
      --config.dataset.root=FOLDER --show=/tmp/folder_show

It prepares ImageNet first if needed (see README). User errors print one line
and exit with status 2.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags
from ml_collections import config_flags

from mnv2_flax import checkpoint, cli, config_lib, data
from mnv2_flax.cli import fail
from mnv2_flax.errors import ConfigError

MODES = ("train", "eval")


def create_dataset(
    config: Any,
    *,
    process_index: int,
    process_count: int,
    mode: str = "train",
    class_names: Sequence[str] = (),
) -> data.Dataset:
  """Builds `config.dataset.name` (one of `data.DATASETS`) for this process.

  mode "train" reads the training split (and the evaluation split, if the
  dataset has one); "eval" only the evaluation split, whose image folders are
  then labelled by `class_names` (a checkpoint's; empty: the folder's own).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
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
  if name in data.PIPELINE_DATASETS:
    from mnv2_flax import input_pipeline  # pylint: disable=g-import-not-at-top

    return input_pipeline.create_dataset(
        config,
        process_index=process_index,
        process_count=process_count,
        mode=mode,
        class_names=tuple(class_names),
    )
  raise ConfigError(f"config.dataset.name: must be one of {data.DATASETS}, got {name!r}")


# ------------------------------------------------------------------------------
# Command line: see what the model sees.
# ------------------------------------------------------------------------------

FLAGS = flags.FLAGS
SUMMARY_FILE = "summary.json"
_TILE = 96  # Pixels per image in the grids (nearest-neighbour upscaling).
_CAPTION = 14  # Pixels under each image for its class name.


def define_flags() -> None:
  """Defined when run, not on import: train and export import this module."""
  config_flags.DEFINE_config_file(
      "config",
      config_lib.__file__,
      "A config file (configs/*.py); override keys with --config.KEY=VALUE.",
      lock_config=False,
      accept_new_attributes=True,
  )
  flags.DEFINE_string("show", None, "Directory for summary.json, train.png and eval.png.")
  flags.DEFINE_integer("show_images", 32, "Images in each grid.", lower_bound=1)
  flags.DEFINE_bool(
      "decode_check",
      True,
      "Decode every image to name the unreadable ones (ImageNet's 1.33 M: tens of minutes).",
  )


def split_summary(source: Any, class_names: Sequence[str], workers: int, decode: bool) -> dict:
  """Image count, per-class counts and (if `decode`) the unreadable files of
  an image source (`input_pipeline.ImageSource`)."""
  from mnv2_flax import input_pipeline  # pylint: disable=g-import-not-at-top

  summary: dict[str, Any] = {"images": len(source), "location": source.location}
  labels = getattr(source, "labels", None)  # Folders know them without reading.
  unreadable = None
  if decode:
    labels, unreadable = input_pipeline.check_images(source, workers)
  if labels is not None:
    counts = np.bincount(labels, minlength=len(class_names))
    summary["classes"] = {name: int(n) for name, n in zip(class_names, counts) if n}
  if unreadable is not None:
    summary["unreadable"] = {
        source.name(i): input_pipeline.failure_reason(source, i) for i in unreadable
    }
  return summary


def image_grid(
    batch: data.Batch,
    normalization: tuple[Sequence[float], Sequence[float]],
    class_names: Sequence[str],
    limit: int,
) -> Any:
  """A PIL image of a batch's images as the model receives them (uint8
  pixels, or float32 ones with the normalisation undone), each with its class
  name (and "substitute" where an unreadable training file was replaced;
  masked examples left out)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

  mean, std = (np.asarray(x, np.float32) for x in normalization)
  keep = batch["mask"] == 1 if "mask" in batch else np.ones(len(batch["label"]), bool)
  pixels = batch["image"][keep]
  if pixels.dtype != np.uint8:  # Normalised in the input pipeline (in-memory datasets).
    pixels = np.clip(np.rint((pixels * std + mean) * 255), 0, 255).astype(np.uint8)
  labels = batch["label"][keep]
  substituted = batch.get("unreadable", np.zeros(len(keep)))[keep]
  n = min(len(pixels), limit)
  columns = min(n, 8)
  rows = -(-n // columns)
  grid = Image.new("RGB", (columns * _TILE, rows * (_TILE + _CAPTION)), "white")
  draw = ImageDraw.Draw(grid)
  for i in range(n):
    image = Image.fromarray(pixels[i].squeeze(-1) if pixels.shape[-1] == 1 else pixels[i])
    x, y = (i % columns) * _TILE, (i // columns) * (_TILE + _CAPTION)
    grid.paste(image.convert("RGB").resize((_TILE, _TILE), Image.NEAREST), (x, y))
    name = class_names[labels[i]].split(",")[0]  # ImageNet's first name.
    caption = f"{name}{' (substitute)' if substituted[i] else ''}"
    draw.text((x + 2, y + _TILE + 1), caption[:16], fill="black")
  return grid


def show(config: Any, out: str, *, images: int = 32, decode_check: bool = True) -> dict:
  """Writes OUT/summary.json (per split: image count, classes and their
  counts, unreadable files), OUT/train.png (the run's first `images` training
  examples, augmented, as step 0 receives them) and OUT/eval.png (the first
  evaluation examples); returns the summary."""
  config = config.copy_and_resolve_references()
  config_lib.validate(config, device_count=1)
  mode = "train"
  if config.dataset.name == "imagefolder":
    from mnv2_flax import folders  # pylint: disable=g-import-not-at-top

    if folders.find_splits(config.dataset.root)[0] is None:
      mode = "eval"  # An evaluation folder alone.
  names = ()
  if mode == "eval" and config.checkpoint_path:  # Labelled as the checkpoint's.
    names = tuple((checkpoint.read_settings(config.checkpoint_path) or {}).get("class_names", ()))

  def build() -> data.Dataset:
    return create_dataset(config, process_index=0, process_count=1, mode=mode, class_names=names)

  # The first examples of step 0 are those of a smaller batch's step 0: an
  # example's place and augmentation come from its position in the epoch.
  config.global_batch_size = config.eval_batch_size = 1
  info = build().info
  config.global_batch_size = min(images, info.num_train_examples or images)
  config.eval_batch_size = images
  dataset = build()
  normalization = info.normalization or (config.dataset.mean, config.dataset.std)
  summary: dict[str, Any] = {"dataset": config.dataset.name, "classes": list(info.class_names)}
  sources = {
      "train": getattr(dataset, "train_source", None),
      "eval": getattr(dataset, "eval_source", None),
  }
  os.makedirs(out, exist_ok=True)
  for split, count in (("train", info.num_train_examples), ("eval", info.num_eval_examples)):
    if not count:
      continue
    source = sources[split]
    if source is None:
      summary[split] = {"images": count}
    else:
      summary[split] = split_summary(source, info.class_names, dataset.workers, decode_check)
    batches = dataset.train_batches(0) if split == "train" else dataset.eval_batches()
    grid = image_grid(next(iter(batches)), normalization, info.class_names, images)
    grid.save(os.path.join(out, f"{split}.png"))
    summary[split]["grid"] = os.path.join(out, f"{split}.png")
  checkpoint.write_json(os.path.join(out, SUMMARY_FILE), summary)
  return summary


def print_summary(summary: dict) -> None:
  print(f"{summary['dataset']}: {len(summary['classes'])} classes")
  for split in ("train", "eval"):
    if split not in summary:
      continue
    part = summary[split]
    print(f"{split}: {part['images']} images in {part.get('location', summary['dataset'])}")
    for name, count in part.get("classes", {}).items():
      print(f"  {count:8d}  {name}")
    for name, reason in part.get("unreadable", {}).items():
      print(f"  unreadable: {name} ({reason})")
    if "unreadable" in part:
      print(f"  {len(part['unreadable'])} unreadable")
    print(f"  grid: {part['grid']}")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.show:
    fail("--show=DIR is required")
  config = FLAGS.config
  try:
    config.get("seed")  # config_flags loads the file on first access.
  except OSError as e:
    fail(" ".join(str(e).split()))
  summary = show(config, FLAGS.show, images=FLAGS.show_images, decode_check=FLAGS.decode_check)
  print_summary(summary)


def run() -> None:
  """Entry point of `python -m mnv2_flax.datasets`."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
