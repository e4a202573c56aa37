"""config_lib: every key is declared with its check, and validate uses them all."""

import importlib.util
import math

import pytest

from mnv2_flax import config_lib

from conftest import REPO


def leaf_names(config, prefix=""):
  for name, value in config.items():
    if hasattr(value, "items"):
      yield from leaf_names(value, f"{prefix}{name}.")
    else:
      yield f"{prefix}{name}"


def load_config_file(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def with_value(name, value):
  """base_config() with `name` set to `value`, as a config file could: deleting
  the key first skips ml_collections' check against the default's type."""
  config = config_lib.base_config()
  *parents, leaf = name.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  del node[leaf]
  node[leaf] = value
  return config


def test_every_key_is_declared_once_and_its_default_passes():
  names = [key.name for key in config_lib.KEYS]
  assert len(names) == len(set(names))
  assert sorted(leaf_names(config_lib.base_config())) == sorted(names)
  for key in config_lib.KEYS:
    assert key.check.accepts(key.default), key.name
  config_lib.validate(config_lib.base_config(), device_count=1)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.name)
def test_config_files_validate(path):
  config_lib.validate(load_config_file(path), device_count=1)


def test_undeclared_key_is_refused():
  config = config_lib.base_config()
  config.model.widht = 1.0  # A config file's typo.
  with pytest.raises(
      config_lib.ConfigError, match=r"^config\.model\.widht: unknown key \(set to 1\.0\)"
  ):
    config_lib.validate(config, device_count=1)


def test_missing_key_is_refused():
  config = config_lib.base_config()
  del config.optimizer["momentum"]
  with pytest.raises(config_lib.ConfigError, match=r"^config\.optimizer\.momentum: is missing$"):
    config_lib.validate(config, device_count=1)


# Values only a config file can set: the CLI casts to the default's type.
@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("model.remat", 1, "config.model.remat: must be a bool, got 1"),
        ("skip_nonfinite_updates", "yes", "config.skip_nonfinite_updates: must be a bool"),
        ("seed", True, "config.seed: must be an int >= 0, got True"),
        ("global_batch_size", 64.0, "config.global_batch_size: must be an int >= 1, got 64.0"),
        ("model.stem_stride", True, "config.model.stem_stride: must be 1 or 2, got True"),
        ("model.stage_strides", [1, 2, 2, 2, 1, 2, True], "config.model.stage_strides:"),
        ("optimizer.learning_rate", math.inf, "config.optimizer.learning_rate:"),
        ("optimizer.momentum", False, "config.optimizer.momentum: must be a float"),
        ("dataset.mean", "0.5", "config.dataset.mean: must be a tuple"),
        ("dataset.data_dir", None, "config.dataset.data_dir: must be a string, got None"),
        ("model.residual", None, "config.model.residual: must be 'bottleneck', "),
    ],
)
def test_config_file_types_are_checked(name, value, expected):
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(with_value(name, value), device_count=1)
  assert str(error.value).startswith(expected)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "name,value",
    [
        ("num_epochs", 5),  # An int where a float is declared.
        ("model.stage_strides", [1, 1, 2, 2, 1, 2, 1]),  # A list for a tuple.
        ("eval_every_steps", 0),  # Any int: <= 0 disables periodic evals.
    ],
)
def test_accepts_what_a_config_file_may_write(name, value):
  config_lib.validate(with_value(name, value), device_count=1)


def test_cross_key_checks():
  config = config_lib.base_config()
  config.num_epochs = 0.0
  config.num_train_steps = 5  # Steps decide: no epochs needed.
  config_lib.validate(config, device_count=1)
  with pytest.raises(
      config_lib.ConfigError,
      match="^config.global_batch_size: 64 is not divisible by the 3 devices$",
  ):
    config_lib.validate(config, device_count=3)
