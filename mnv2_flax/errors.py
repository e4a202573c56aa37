"""Errors the user must fix; the CLI prints them as one line and exits 2."""


class ConfigError(ValueError):
  """A bad config value or input path; the message names the key or path."""


class NonFiniteError(RuntimeError):
  """Training produced a NaN/inf loss or gradient (not a user error: exit 1)."""
