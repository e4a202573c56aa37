"""Orbax checkpoints of the TrainState: the last k, plus the best by a metric.

Saves are atomic (orbax writes to a temporary directory and renames it once
finalised), so a killed save never masquerades as a checkpoint. Restores take
an abstract target whose shardings belong to the *current* mesh, so a
checkpoint written on N devices restores on any other device count.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mnv2_flax import config_lib, models
from mnv2_flax.errors import ConfigError

# Beside the step directories: the settings the weights need (config values,
# class names, where they came from), so that evaluation, fine-tuning, export
# and prediction need no hand-set flag.
SETTINGS_FILE = "settings.json"


class CheckpointError(ConfigError):
  """No usable checkpoint, or one that does not fit the configured model."""


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def shape_mismatches(saved: Any, expected: Any) -> list[str]:
  """Human-readable differences between two trees of arrays/metadata."""
  saved_leaves = {
      _path_str(p): tuple(leaf.shape)
      for p, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]
      if hasattr(leaf, "shape")
  }
  expected_leaves = {
      _path_str(p): tuple(leaf.shape)
      for p, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]
  }
  problems = []
  # Parameters first: they say which layer differs; optimizer state follows.
  for key in sorted(
      expected_leaves.keys() | saved_leaves.keys(), key=lambda k: (not k.startswith("params/"), k)
  ):
    s, e = saved_leaves.get(key), expected_leaves.get(key)
    if s != e:
      problems.append(f"{key}: checkpoint {s or 'missing'} vs model {e or 'missing'}")
  return problems


class Checkpointer:
  """Keeps the last `keep` checkpoints in DIR and the best one in DIR_best."""

  def __init__(self, directory: str, *, keep: int, best_metric: str = "", read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
    )
    self._best = None
    self._read_only = read_only
    if best_metric and not read_only:
      best_options = ocp.CheckpointManagerOptions(
          max_to_keep=1,
          create=True,
          cleanup_tmp_directories=True,
          best_fn=lambda metrics: metrics[best_metric],
          best_mode="min" if best_metric == "loss" else "max",
      )
      self._best = ocp.CheckpointManager(self.directory + "_best", options=best_options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def holds_weights_only(self, step: int) -> bool:
    """True for a checkpoint of variables alone (`save_variables`: imported
    or exported weights), False for a TrainState."""
    saved = self._manager.item_metadata(step)
    return "opt_state" not in getattr(saved, "tree", saved)

  def save(self, step: int, state: Any) -> None:
    if self._manager.latest_step() == step:  # Already saved (periodic + final).
      return
    self._manager.save(step, args=ocp.args.StandardSave(state))

  def save_best(self, step: int, state: Any, metrics: Mapping[str, float]) -> None:
    # A finished run re-run re-evaluates its last step, which may be the best.
    if self._best is not None and step not in self._best.all_steps():
      self._best.save(
          step,
          args=ocp.args.StandardSave(state),
          metrics={k: float(v) for k, v in metrics.items()},
          force=True,
      )

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, int]:
    """Restores `step` (default: the newest good one) into `abstract_state`.

    A checkpoint that fails to load (truncated file, missing metadata) is
    moved to DIR_corrupt/ with a warning, and the previous one is tried, so
    later saves of that step are not blocked. A checkpoint whose shapes do not
    match the model raises CheckpointError listing the differences.
    """
    candidates = [step] if step is not None else self.all_steps()[::-1]
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    failures = []
    for candidate in candidates:
      try:
        saved = self._manager.item_metadata(candidate)
        saved = getattr(saved, "tree", saved)
        if not any(hasattr(leaf, "shape") for leaf in jax.tree.leaves(saved)):
          raise ValueError("its array metadata is missing")
        mismatches = shape_mismatches(saved, abstract_state)
        if not mismatches:
          state = self._manager.restore(candidate, args=ocp.args.StandardRestore(abstract_state))
          return state, candidate
      except Exception as e:  # pylint: disable=broad-except
        logging.warning(
            "Checkpoint %s/%s is unreadable (%s: %s); trying an older one.",
            self.directory,
            candidate,
            type(e).__name__,
            e,
        )
        failures.append(f"step {candidate}: {type(e).__name__}")
        self._quarantine(candidate)
        continue
      raise CheckpointError(
          f"checkpoint {self.directory}/{candidate} does not fit the configured "
          f"model ({len(mismatches)} differences): " + "; ".join(mismatches[:8])
      )
    raise CheckpointError(f"no readable checkpoint in {self.directory} ({', '.join(failures)})")

  def _quarantine(self, step: int) -> None:
    if self._read_only or jax.process_index() != 0:
      return
    target = os.path.join(self.directory + "_corrupt", str(step))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()
    if self._best is not None:
      self._best.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
    if self._best is not None:
      self._best.close()


def abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """ShapeDtypeStructs of `tree` placed with `sharding` (restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def read_checkpoint(directory: str, step: int | None = None) -> tuple[dict[str, Any], int]:
  """Any checkpoint as a plain tree on this process's first device, without
  knowing the model (inspection, export, comparing runs)."""
  manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers=ocp.StandardCheckpointHandler(),
  )
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {directory}")
  metadata = manager.item_metadata(step)
  metadata = getattr(metadata, "tree", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  return manager.restore(step, args=ocp.args.StandardRestore(target)), step


def merge_matching(target: Any, source: Any) -> tuple[Any, list[str]]:
  """`target` with every leaf that `source` has at the same path and shape
  replaced by source's (fine-tuning: a new classifier keeps its init).
  Returns the merged tree and the paths kept from `target`."""
  source_leaves = {
      _path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(source)[0]
  }
  kept = []

  def pick(path, leaf):
    other = source_leaves.get(_path_str(path))
    if other is not None and np.shape(other) == np.shape(leaf):
      return jax.numpy.asarray(other, leaf.dtype)
    kept.append(_path_str(path))
    return leaf

  return jax.tree_util.tree_map_with_path(pick, target), kept


def write_json(path: str, content: Any, sort_keys: bool = False) -> None:
  """Writes `content` as JSON to PATH atomically: readers never see half a file."""
  with open(path + ".tmp", "w") as f:
    json.dump(content, f, indent=2, sort_keys=sort_keys)
  os.replace(path + ".tmp", path)


def write_settings(
    directory: str, settings: Mapping[str, Any], class_names: Sequence[str], source: str
) -> None:
  """Writes DIRECTORY/settings.json (atomically): `settings` from
  `config_lib.settings_of`, one name per class, and where the weights came from."""
  os.makedirs(directory, exist_ok=True)
  content = {"source": source, "config": dict(settings), "class_names": list(class_names)}
  write_json(os.path.join(directory, SETTINGS_FILE), content)


def read_settings(directory: str) -> dict[str, Any] | None:
  """DIRECTORY/settings.json, or None for a checkpoint written without one."""
  path = os.path.join(directory, SETTINGS_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path} is unreadable: {e}") from e


def save_variables(
    directory: str,
    variables: Mapping[str, Any],
    settings: Mapping[str, Any],
    class_names: Sequence[str],
    source: str,
) -> str:
  """Saves {"params", "batch_stats"} as step 0 of an orbax checkpoint in
  DIRECTORY, with its settings file. Returns the step's path."""
  directory = os.path.abspath(directory)
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  if manager.latest_step() is not None:
    raise CheckpointError(f"{directory} already holds a checkpoint; choose a new directory")
  tree = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  manager.save(0, args=ocp.args.StandardSave(jax.tree.map(np.asarray, tree)))
  manager.wait_until_finished()
  manager.close()
  write_settings(directory, settings, class_names, source)
  return os.path.join(directory, "0")


def inference_variables(saved: Mapping[str, Any]) -> dict[str, Any]:
  """{"params", "batch_stats"} to predict with from a saved tree: the EMA of
  the weights when the run kept one."""
  params = saved.get("ema_params") or saved["params"]
  return {"params": params, "batch_stats": saved["batch_stats"]}


def model_from_settings(
    settings: Mapping[str, Any], conv_impl: str = "xla"
) -> tuple[models.MobileNetV2, Any]:
  """(model, config) of a settings file's "config" entry: the default config
  with every recorded weight and recipe key applied."""
  config, _ = config_lib.apply_settings(
      config_lib.base_config(), dict(settings), config_lib.WEIGHT_KEYS + config_lib.RECIPE_KEYS
  )
  config.model.conv_impl = conv_impl
  return models.create_model(config.model, config.dataset.num_classes), config


def load_model(
    checkpoint_path: str, conv_impl: str = "xla"
) -> tuple[models.MobileNetV2, dict[str, Any], Any, tuple[str, ...]]:
  """(model, variables, config, class names) of the newest checkpoint in
  CHECKPOINT_PATH, built from its settings file (export and prediction)."""
  if not os.path.isdir(checkpoint_path):
    raise CheckpointError(f"--checkpoint_path {checkpoint_path} is not a directory")
  settings = read_settings(checkpoint_path)
  if settings is None:
    raise CheckpointError(
        f"{checkpoint_path} has no {SETTINGS_FILE} (checkpoints written before "
        "2026-12-01 lack it): evaluate it with --mode=eval and the config it was trained with"
    )
  model, config = model_from_settings(settings["config"], conv_impl)
  saved, _ = read_checkpoint(checkpoint_path)
  variables = inference_variables(saved)
  class_names = tuple(settings.get("class_names") or ())
  return model, variables, config, class_names
