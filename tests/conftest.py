"""Shared fixtures: tiny configs and a persistent compilation cache."""

import contextlib
import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
# Compiled steps are reused across test runs (and by subprocesses, which
# inherit the environment); a 2-core machine compiles MobileNetV2 slowly.
CACHE_DIR = os.environ.setdefault("MNV2_TEST_CACHE_DIR", str(REPO / ".jax_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SMOKE_CONFIG = "configs/smoke.py"


def tiny_config(**overrides):
  """configs/smoke.py (digits at 16x16, width 0.35), with dotted-key overrides."""
  spec = importlib.util.spec_from_file_location("smoke", REPO / SMOKE_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.compilation_cache_dir = CACHE_DIR
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def checkpoint_steps(directory) -> list[int]:
  """The step numbers saved in a checkpoints directory (its other files, such
  as settings.json, left out)."""
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def run_main(
    args, *, devices: int = 1, timeout: int = 300, check: bool = True, env=None
) -> subprocess.CompletedProcess:
  """Runs `python -m mnv2_flax.main ARGS` with `devices` fake CPU devices."""
  full_env = dict(os.environ, **(env or {}))
  full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
  args = [*args, f"--config.compilation_cache_dir={CACHE_DIR}"]
  proc = subprocess.run(
      [sys.executable, "-m", "mnv2_flax.main", *args],
      cwd=REPO,
      env=full_env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  if check and proc.returncode != 0:
    raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def processes_mentioning(text: str) -> list[int]:
  """The pids of this machine's processes whose command line contains TEXT."""
  pids = []
  for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != os.getpid():
      try:
        with open(f"/proc/{entry}/cmdline", "rb") as f:
          if text.encode() in f.read():
            pids.append(int(entry))
      except OSError:  # Ended meanwhile.
        pass
  return pids


@contextlib.contextmanager
def started(command: list[str], marker: str, **popen_kwargs) -> Iterator[subprocess.Popen]:
  """Popen(COMMAND) in a process group of its own. On leaving (done, failed
  or timed out) whatever is left of it is killed: its process group, and
  every process whose command line contains MARKER (e.g. the test's own
  workdir), which reaches what it started in sessions of their own (the
  processes of launch.local), so that nothing keeps holding the cores."""
  proc = subprocess.Popen(command, start_new_session=True, **popen_kwargs)
  try:
    yield proc
  finally:
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)
    for pid in processes_mentioning(marker):
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    proc.wait()


def worst_ratio(
    run: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    update: Mapping[str, float],
) -> tuple[float, str]:
  """How far a run's arrays are from a reference run's, relative to each
  array's own update: the largest max|run - reference| / max(update, 1 % of
  the largest update among the params, or among the batch statistics), and
  that array's name. The floor keeps arrays whose update is itself rounding
  noise from dividing by ~0 (the layers of a residual branch whose last
  BatchNorm scale starts at 0, the mean of a BatchNorm after a BatchNorm).
  Names start with "params/" or "batch_stats/"."""
  worst = (0.0, "")
  for collection in ("params/", "batch_stats/"):
    names = [name for name in reference if name.startswith(collection)]
    floor = 0.01 * max(update[name] for name in names)
    for name in names:
      difference = float(np.max(np.abs(np.asarray(run[name]) - reference[name])))
      worst = max(worst, (difference / max(update[name], floor), name))
  return worst
