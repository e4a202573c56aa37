"""Shared fixtures: tiny configs and a persistent compilation cache."""

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
# Compiled steps are reused across test runs (and by subprocesses, which
# inherit the environment); a 2-core machine compiles MobileNetV2 slowly.
CACHE_DIR = os.environ.setdefault("MNV2_TEST_CACHE_DIR", str(REPO / ".jax_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA's CPU backend generates code with LLVM at -O3 by default. The tests'
# models are small and run a few steps each: at -O1 (XLA's own HLO passes
# unchanged) a model's initialisation compiles in about half the CPU time, its
# train step in 10-15 % less, and the smoke model's steps run as fast; the
# suite takes a fifth less CPU time (measured 2026-12-03). Every process a
# test starts inherits it (see xla_flags); users and benchmarks keep XLA's
# default, under which a full-width model's steps run faster.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
# XLA_FLAGS of the float64 runs (tests/layout_worker.py, test_multiprocess.py):
# the tests' own, and without XLA's CPU fusion emitters, with which their
# steps compile in about two thirds of the CPU time (float32 steps compile
# slower without them).
FLOAT64_XLA_FLAGS = f"{os.environ['XLA_FLAGS']} --xla_cpu_use_fusion_emitters=false"

SMOKE_CONFIG = "configs/smoke.py"
# The model of the tests of plumbing (signals, resume, sweeps, device
# layouts, data paths): one block per stage, 7 of the paper's 17. The same
# kinds of layer, strides and data path, a third less to trace and compile.
SHALLOW = {"model.depth_multiplier": 0.25}
SHALLOW_FLAG = "--config.model.depth_multiplier=0.25"
# The device-layout runs (tests/layout_worker.py, test_multiprocess.py): the
# shallow model on 2 images per device of 4 (float64 steps are slow on a CPU).
LAYOUT_CONFIG = {**SHALLOW, "global_batch_size": 8}


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process with DEVICES fake CPU devices: this process's
  flags (TEST_XLA_FLAGS among them) with the device count replaced."""
  count = "--xla_force_host_platform_device_count"
  kept = [flag for flag in os.environ["XLA_FLAGS"].split() if not flag.startswith(count)]
  return " ".join([*kept, f"{count}={devices}"])


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
  full_env["XLA_FLAGS"] = xla_flags(devices)
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


def source_key(*texts: str, sources: tuple[str, ...] = ()) -> str:
  """A key of TEXTS, the package's source (every module, or SOURCES of it),
  the JAX version, XLA's flags and the CPU (another CPU or code generation
  rounds differently, and tests compare numbers made here with those a
  cached run recorded)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  cpu = platform.processor()
  with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
    cpu = next((line for line in f if line.startswith("model name")), cpu)
  digest = hashlib.sha256(
      "".join([*texts, metadata.version("jax"), os.environ["XLA_FLAGS"], cpu]).encode()
  )
  package = REPO / "mnv2_flax"
  for path in sorted(package.glob("*.py")) if not sources else [package / s for s in sources]:
    digest.update(path.read_bytes())
  return digest.hexdigest()[:16]


def cached(name: str, key: str, make: Callable[[str], None]) -> str:
  """CACHE_DIR/test_runs/NAME-KEY, made once for every test process (xdist
  runs a fixture once per worker): make(DIRECTORY) fills a new directory,
  which is then renamed into place; a file lock makes a second process wait
  for the first one's rather than make it again."""
  root = os.path.join(CACHE_DIR, "test_runs")
  target = os.path.join(root, f"{name}-{key}")
  if os.path.isdir(target):
    return target
  os.makedirs(root, exist_ok=True)
  with open(target + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.isdir(target):
      directory = tempfile.mkdtemp(dir=root, prefix=f"{name}-")
      try:
        make(directory)
      except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
      os.rename(directory, target)
  return target


def float64_layouts() -> str:
  """The directory of tests/layout_worker.py's float64 run (seeds 0-2, 4
  steps, with the restore onto 4 devices), made once per test session:
  results.json, and seed 0's 4-device weights after 2 and 4 steps and the
  dropped-shard run's after 4 (test_multiprocess.py's references)."""
  worker = REPO / "tests" / "layout_worker.py"

  def make(directory: str) -> None:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        XLA_FLAGS=FLOAT64_XLA_FLAGS,
    )
    command = [sys.executable, str(worker), "--dtype=float64", "--steps=4", "--seeds=0,1,2"]
    command += ["--restore", f"--out={directory}/results.json", f"--save_dir={directory}"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stderr[-3000:]

  return cached("float64-layouts", source_key(worker.read_text(), FLOAT64_XLA_FLAGS), make)


def random_batch_norm(rng: np.random.Generator, channels: int) -> list[np.ndarray]:
  """A BatchNorm layer's scale, offset, moving mean and moving variance, at
  random: the initial 1, 0, 0, 1 would hide a swapped pair in an importer."""
  return [
      rng.uniform(0.5, 1.5, channels),
      rng.normal(0, 0.3, channels),
      rng.normal(0, 0.3, channels),
      rng.uniform(0.3, 2.0, channels),
  ]
