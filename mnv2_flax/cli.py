"""What the package's command lines share: a user error (bad flag, bad config
value, missing file) is one line `error: ...` on stderr and exit status 2,
never a traceback."""

from __future__ import annotations

import contextlib
import logging as pylogging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

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
  if verbosity < 0:
    handler = logging.get_absl_handler()
    if _not_orbax_read_only_notice not in handler.filters:
      handler.addFilter(_not_orbax_read_only_notice)


def _not_orbax_read_only_notice(record: pylogging.LogRecord) -> bool:
  """orbax warns three times that a checkpoint opened read-only will not be
  written ("read_only=True, setting create=False"): what reading means."""
  message = str(record.msg)
  return not ("/orbax/" in record.pathname and "read only" in message.replace("_", " ").lower())


def _is_library_noise(line: str) -> bool:
  """TensorFlow's C++ INFO lines ("I0000 00:00:... port.cc:153] oneDNN custom
  operations are on...") and absl's notice before them, which
  TF_CPP_MIN_LOG_LEVEL does not silence (TensorFlow 2.21)."""
  return line.startswith("I0000 ") or "before absl::InitializeLog() is called" in line


@contextlib.contextmanager
def filtered_stderr() -> Iterator[None]:
  """Runs the block with file descriptor 2 captured, then writes back every
  line but TensorFlow's C++ INFO noise (`_is_library_noise`): its import
  prints them from C++, below Python's logging."""
  if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("0", ""):
    yield  # Asked for INFO: nothing is dropped.
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      text = capture.read().decode("utf-8", errors="replace")
      kept = [line for line in text.splitlines(keepends=True) if not _is_library_noise(line)]
      sys.stderr.write("".join(kept))
      sys.stderr.flush()


def import_tensorflow() -> Any:
  """`import tensorflow`, without its C++ INFO lines when logs are quiet
  (TF_CPP_MIN_LOG_LEVEL >= 1); ImportError as usual."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  with filtered_stderr():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors are one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  except OSError as e:  # A missing --config file, read here when a --config.KEY follows it.
    fail(" ".join(str(e).split()))


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
