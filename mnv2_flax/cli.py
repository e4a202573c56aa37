"""What the package's command lines share: a user error (bad flag, bad config
value, missing file) is one line `error: ...` on stderr and exit status 2,
never a traceback."""

from __future__ import annotations

import logging as pylogging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags, logging

from mnv2_flax.errors import ConfigError

EXIT_USER_ERROR = 2


def fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


# Libraries whose INFO lines (and TensorFlow's C++ ones) a command line's
# answer should not drown in.
_LIBRARY_LOGGERS = ("absl", "jax", "orbax", "tensorflow", "h5py", "keras", "jax2onnx")


def quiet_logs(verbosity: int = -1) -> None:
  """Warnings and errors only, unless verbosity >= 0 (absl's scale: 0 INFO,
  1 DEBUG). Call before TensorFlow is imported: its C++ INFO lines obey
  TF_CPP_MIN_LOG_LEVEL (a value the user set is kept)."""
  level = pylogging.WARNING if verbosity < 0 else pylogging.INFO
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if verbosity < 0 else "0")
  logging.set_verbosity(verbosity if verbosity >= 0 else logging.WARNING)
  for name in _LIBRARY_LOGGERS:
    pylogging.getLogger(name).setLevel(level)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors are one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])


def _parse_flags_quietly(argv: list[str]) -> list[str]:
  remaining = parse_flags(argv)
  # absl's --verbosity defaults to INFO; a tool's answer should not drown.
  quiet_logs(flags.FLAGS.verbosity if flags.FLAGS["verbosity"].present else -1)
  return remaining


def run(main: Callable[[list[str]], None], quiet: bool = False) -> None:
  """absl's app.run of `main`; a ConfigError it raises becomes one line.
  quiet: warnings only unless --verbosity is given (`quiet_logs`)."""
  try:
    app.run(main, flags_parser=_parse_flags_quietly if quiet else parse_flags)
  except ConfigError as e:
    fail(str(e))
