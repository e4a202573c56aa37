"""Runs a sweep: one training run per set of config overrides, one at a time.

  python -m launch.sweep --sweep=configs/sweeps/expansion.py --workdir=/tmp/expansion
  python -m launch.sweep --sweep=configs/sweeps/expansion.py --workdir=DIR --dry_run
  python -m launch.sweep --sweep=FILE --workdir=DIR -- --config=configs/cifar10.py

A sweep file defines `get_sweep()`: a list of {config key: value} dicts. Each
run trains `python -m mnv2_flax.main` with `--config.KEY=VALUE` per override
in WORKDIR/NAME, NAME joining the overrides (`model.expansion=2,...`); flags
after `--` go to every run. A run whose results.json exists is skipped, so
repeating the command finishes an interrupted sweep (the unfinished run
resumes from its checkpoints). --dry_run prints the commands instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("sweep", None, "A sweep file (configs/sweeps/*.py).", required=True)
flags.DEFINE_string("workdir", None, "Parent directory of the runs' workdirs.",
                    required=True)
flags.DEFINE_bool("dry_run", False, "Print the commands, run nothing.")


def load_sweep(path: str) -> list[dict[str, Any]]:
  spec = importlib.util.spec_from_file_location("sweep", path)
  if spec is None or not os.path.isfile(path):
    raise app.UsageError(f"--sweep {path}: not a Python file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_sweep()


def run_name(overrides: dict[str, Any]) -> str:
  name = ",".join(f"{key}={value}" for key, value in overrides.items())
  return re.sub(r"[^\w.,=+-]", "", name)  # A directory name: no spaces, slashes...


def command(overrides: dict[str, Any], workdir: str, extra: list[str]) -> list[str]:
  # Overrides after `extra`, which may hold the --config file they apply to.
  return [sys.executable, "-m", "mnv2_flax.main", *extra, f"--workdir={workdir}",
          *(f"--config.{key}={value}" for key, value in overrides.items())]


def main(argv: list[str]) -> None:
  extra = argv[1:]
  sweep = load_sweep(FLAGS.sweep)
  names = [run_name(overrides) for overrides in sweep]
  if len(set(names)) != len(names):
    raise app.UsageError(f"--sweep {FLAGS.sweep}: two runs share a name: {names}")
  failed = []
  for name, overrides in zip(names, sweep):
    workdir = os.path.join(FLAGS.workdir, name)
    cmd = command(overrides, workdir, extra)
    if FLAGS.dry_run:
      print(shlex.join(cmd))
    elif os.path.exists(os.path.join(workdir, "results.json")):
      logging.info("%s: finished before, skipped.", name)
    else:
      logging.info("%s: %s", name, shlex.join(cmd))
      if subprocess.run(cmd, check=False).returncode != 0:
        failed.append(name)
  if FLAGS.dry_run:
    return
  for name in names:
    path = os.path.join(FLAGS.workdir, name, "results.json")
    if os.path.exists(path):
      with open(path) as f:
        results = json.load(f)
      print(f"{name}: top1 {results['top1']:.4f} loss {results['loss']:.4f}")
    else:
      print(f"{name}: no results")
  if failed:
    sys.exit(f"{len(failed)} of {len(names)} runs failed: {', '.join(failed)}")


if __name__ == "__main__":
  app.run(main)
