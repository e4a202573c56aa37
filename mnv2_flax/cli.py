"""What the package's command lines share: a user error (bad flag, bad config
value, missing file) is one line `error: ...` on stderr and exit status 2,
never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags

from mnv2_flax.errors import ConfigError

EXIT_USER_ERROR = 2


def fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors are one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])


def run(main: Callable[[list[str]], None]) -> None:
  """absl's app.run of `main`; a ConfigError it raises becomes one line."""
  try:
    app.run(main, flags_parser=parse_flags)
  except ConfigError as e:
    fail(str(e))
