"""Image folders: which files are a split's images, and their labels.

Layout: ROOT/train/ (training) and ROOT/test/ or ROOT/val/ (evaluation; test/
when both exist), each with one folder per class. Every file below a class
folder whose extension is one of the formats Pillow decodes (`IMAGE_EXTENSIONS`:
.jpg, .png, .tif, .bmp, .webp, .gif, ...) is an image of that class, at any
depth: files in nested sub-folders of a class folder belong to it. Hidden files
and folders (names starting with ".", such as .DS_Store) are ignored silently;
other files, and files directly in a split folder, are ignored with a warning
that counts them. Files are listed, never opened: whether an image decodes is
found when it is read (see `input_pipeline`).

A split's files are sorted by their path below the split folder, so the list,
and a run's data order, is the same on every machine. Labels are matched by
class name: the class names of the training split (its sorted class folders)
or of the checkpoint being evaluated label every split, so an evaluation folder
missing a class shifts nothing, and a class folder the names don't know is an
error naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageFile

from mnv2_flax import data
from mnv2_flax.errors import ConfigError

TRAIN_SPLIT = "train"
EVAL_SPLITS = ("test", "val")  # The first present is the evaluation split.


def _image_extensions() -> frozenset[str]:
  """Extensions of the formats Pillow opens (MPO, the cameras' multi-picture
  JPEG, is opened by the JPEG plugin), less its stub formats, which need a
  handler installed by the user."""
  Image.init()
  formats = {name for name, (factory, _) in Image.OPEN.items() if not _is_stub(factory)} | {"MPO"}
  return frozenset(ext for ext, name in Image.registered_extensions().items() if name in formats)


def _is_stub(factory: object) -> bool:
  return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)


IMAGE_EXTENSIONS = _image_extensions()


@dataclasses.dataclass(frozen=True)
class Split:
  """One split's images: paths below `directory` (sorted) and their labels.

  A random-access source of encoded images for `input_pipeline`."""

  directory: str
  paths: tuple[str, ...]
  labels: np.ndarray  # int32, an index into the class names.
  key = "dataset.root"  # The config key that messages about these files name.

  @property
  def location(self) -> str:
    return self.directory

  def __len__(self) -> int:
    return len(self.paths)

  def read(self, index: int) -> tuple[bytes, int]:
    """(the file's bytes, its label); OSError if it cannot be read."""
    with open(os.path.join(self.directory, self.paths[index]), "rb") as f:
      return f.read(), int(self.labels[index])

  def name(self, index: int) -> str:
    return os.path.join(self.directory, self.paths[index])


@dataclasses.dataclass(frozen=True)
class Listing:
  """What a split folder holds: class folders and image files below them."""

  directory: str
  classes: tuple[str, ...]  # Sorted class folder names, empty ones included.
  paths: tuple[str, ...]  # "<class>/.../<file>", sorted.

  def class_of(self, path: str) -> str:
    return path.split("/", 1)[0]


def list_split(directory: str) -> Listing:
  """The class folders and image files of a split folder (see the module doc)."""
  classes, ignored = [], []
  with os.scandir(directory) as entries:
    for entry in entries:
      if entry.name.startswith("."):
        continue
      if entry.is_dir():
        classes.append(entry.name)
      else:
        ignored.append(entry.name)
  paths = []
  for name in sorted(classes):
    class_dir = os.path.join(directory, name)
    for parent, folders, files in os.walk(class_dir, followlinks=True):
      folders[:] = [f for f in folders if not f.startswith(".")]
      relative = os.path.relpath(parent, directory).replace(os.sep, "/")
      for file in files:
        if file.startswith("."):
          continue
        if os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
          paths.append(f"{relative}/{file}")
        else:
          ignored.append(f"{relative}/{file}")
  if ignored:
    logging.warning(
        "imagefolder: ignored %d file(s) in %s that are not images of a class folder "
        "(e.g. %s); images are <class>/.../<file> with one of Pillow's extensions",
        len(ignored),
        directory,
        sorted(ignored)[0],
    )
  return Listing(directory, tuple(sorted(classes)), tuple(sorted(paths)))


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
  """ImageNet-1k's WordNet ids (n01440764, ...) in TFDS's label order: the
  class folders of ImageNet laid out as an image folder."""
  labels = importlib.resources.files("tensorflow_datasets") / "datasets/imagenet2012/labels.txt"
  return tuple(labels.read_text().split())


def labelled(listing: Listing, class_names: Sequence[str], known_by: str) -> Split:
  """The listing's images labelled by `class_names` (ImageNet's human-readable
  names also accept its WordNet-id folder names). `known_by` says whose names
  they are, for the error naming a class folder that is not among them."""
  index = {name: i for i, name in enumerate(class_names)}
  if tuple(class_names) == data.imagenet_class_names():
    index.update({synset: i for i, synset in enumerate(imagenet_synsets())})
  unknown = [c for c in listing.classes if c not in index]
  if unknown:
    shown = ", ".join(class_names[:5]) + (", ..." if len(class_names) > 5 else "")
    raise ConfigError(
        f"config.dataset.root: {os.path.join(listing.directory, unknown[0])} is a class "
        f"{known_by} does not know ({len(unknown)} such: {', '.join(unknown[:5])}); "
        f"its {len(class_names)} classes: {shown}"
    )
  labels = np.asarray([index[listing.class_of(p)] for p in listing.paths], np.int32)
  return Split(listing.directory, listing.paths, labels)


@dataclasses.dataclass(frozen=True)
class Folder:
  """The splits a run reads from an image folder, labelled."""

  class_names: tuple[str, ...]
  train: Split | None
  eval: Split | None


def find_splits(root: str) -> tuple[Listing | None, Listing | None]:
  """(train listing, evaluation listing) of ROOT; None where the split folder
  is absent or holds no image."""
  if not root or not os.path.isdir(root):
    raise ConfigError(
        f"config.dataset.root: {root!r} is not a directory; it needs train/ (training) "
        "and test/ or val/ (evaluation), each with one folder per class"
    )

  def listing(name: str) -> Listing | None:
    directory = os.path.join(root, name)
    if not os.path.isdir(directory):
      return None
    found = list_split(directory)
    return found if found.paths else None

  train = listing(TRAIN_SPLIT)
  evaluation = next(filter(None, map(listing, EVAL_SPLITS)), None)
  return train, evaluation


def open_folder(
    root: str, *, mode: str, class_names: Sequence[str] = (), eval_every_steps: int = -1
) -> Folder:
  """The splits of ROOT that `mode` reads, labelled.

  mode "train": train/ is required, labelled by its own class folders; the
  evaluation split is optional (required if `eval_every_steps` > 0) and
  labelled by the same names. mode "eval": only the evaluation split is read,
  labelled by `class_names` (a checkpoint's), or by its own sorted class
  folders if none are given.
  """
  train, evaluation = find_splits(root)
  expected = "<class>/<image> files below it (any format Pillow decodes: .jpg, .png, .tif, ...)"
  if mode == "eval":
    if evaluation is None:
      raise ConfigError(
          f"config.dataset.root: no images in {os.path.join(root, 'test')} or "
          f"{os.path.join(root, 'val')}; evaluation needs {expected}"
      )
    if not class_names:
      logging.warning(
          "imagefolder: the checkpoint records no class names; labelling %s by its sorted "
          "class folders",
          evaluation.directory,
      )
      class_names = evaluation.classes
    names = tuple(class_names)
    return Folder(names, None, labelled(evaluation, names, "the checkpoint"))
  if train is None:
    raise ConfigError(
        f"config.dataset.root: no images in {os.path.join(root, TRAIN_SPLIT)}; training needs "
        f"{expected} (--mode=eval needs only test/ or val/)"
    )
  if evaluation is None and eval_every_steps > 0:
    raise ConfigError(
        f"config.eval_every_steps: {eval_every_steps} needs an evaluation split, but {root} has "
        f"no images in test/ or val/ (-1: train without evaluating)"
    )
  names = train.classes
  return Folder(
      names,
      labelled(train, names, f"{train.directory}"),
      None if evaluation is None else labelled(evaluation, names, f"{train.directory}"),
  )
