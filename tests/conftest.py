"""Shared fixtures: tiny configs and a persistent compilation cache."""

import importlib.util
import os
import pathlib
import subprocess
import sys

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
