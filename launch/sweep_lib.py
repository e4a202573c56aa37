"""Sweep files, the runs' files, and running one run; for sweep.py and report.py.

A sweep file (configs/sweeps/*.py) defines
  get_sweep()  a list of {config key: value} dicts, one per point;
  CONFIG       optional: the base config file, relative to the repository
               root (default: the embedded digits config);
  BASE         optional: {config key: value} applied to every point;
  NAMES        optional: {config key: short name} for the point names;
and may import its sibling sweep files (`from expansion import get_sweep`).
A point is named by its overrides, `expansion=6,bottleneck=linear` (the last
part of each key unless NAMES says otherwise). Its run for seed k lives in
WORKDIR/<point name>/seed=<k>/: the trainer's results.json, checkpoints and
event files, plus log.txt (every attempt's output, each after a `==> ` line),
RUNNING (a lock held while the run is alive), FAILED (exit code and log tail
of its last failure) and job.json (its SLURM job). WORKDIR/sweep.json is the
sweep's manifest.

The SLURM jobs unpickle `SlurmTask` from here (never from `__main__`). This
module imports neither JAX nor TensorFlow: --status and the report stay fast.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import importlib.util
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST_FILE = "sweep.json"
RESULTS_FILE = "results.json"
LOG_FILE = "log.txt"
LOCK_FILE = "RUNNING"
FAILED_FILE = "FAILED"
JOB_FILE = "job.json"
EXIT_USAGE = 2
# log.txt lines the launcher adds: before each attempt, and after it.
ATTEMPT_MARK, EXIT_MARK = "==> ", "<== "

# Run states. queued: submitted to SLURM and waiting there (sweep.py asks it).
DONE, RUNNING, QUEUED, FAILED, PENDING = "done", "running", "queued", "failed", "pending"
STATES = (DONE, RUNNING, QUEUED, FAILED, PENDING)


class UsageError(Exception):
  """A mistake in the command or the sweep file: one line, exit status 2."""


def fail(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def run_cli(main: Callable[[list[str]], int | None]) -> None:
  """app.run with one-line errors and exit status 2 for usage errors."""

  def parse_flags(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(str(e).splitlines()[0])

  try:
    app.run(main, flags_parser=parse_flags)
  except UsageError as e:
    fail(str(e))


def product(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """Every combination of the axes' values, the last axis varying fastest."""
  return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


@dataclasses.dataclass(frozen=True)
class Point:
  name: str
  overrides: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SweepFile:
  path: str
  config: str | None  # As written in the file; None: the embedded default.
  base: dict[str, Any]
  points: list[Point]


def point_name(overrides: Mapping[str, Any], names: Mapping[str, str]) -> str:
  parts = [f"{names.get(key, key.rsplit('.', 1)[-1])}={value}" for key, value in overrides.items()]
  name = ",".join(parts).replace(" ", "") or "base"
  return re.sub(r"[^\w.,=+-]+", "_", name)  # A directory name: no slashes...


def _string_keyed_dict(value: Any) -> bool:
  return isinstance(value, dict) and all(isinstance(k, str) for k in value)


def load_sweep_file(path: str) -> SweepFile:
  """Runs a sweep file; raises UsageError on anything a sweep cannot use."""
  if not os.path.isfile(path):
    raise UsageError(f"--sweep={path}: no such file")
  spec = importlib.util.spec_from_file_location("sweep_file", path)
  if spec is None:
    raise UsageError(f"--sweep={path}: not a Python file")
  module = importlib.util.module_from_spec(spec)
  # Sweep files may import their siblings' points, as scripts import siblings.
  directory = os.path.dirname(os.path.abspath(path))
  sys.path.insert(0, directory)
  try:
    spec.loader.exec_module(module)
    points = module.get_sweep() if hasattr(module, "get_sweep") else None
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f"--sweep={path}: {type(e).__name__}: {e}") from None
  finally:
    sys.path.remove(directory)
  if points is None:
    raise UsageError(f"--sweep={path}: defines no get_sweep()")
  if not (isinstance(points, list) and points and all(_string_keyed_dict(p) for p in points)):
    raise UsageError(
        f"--sweep={path}: get_sweep() must return a non-empty list of "
        f"{{config key: value}} dicts, got {str(points)[:80]}"
    )
  config = getattr(module, "CONFIG", None)
  base = getattr(module, "BASE", {})
  names = getattr(module, "NAMES", {})
  if config is not None and not isinstance(config, str):
    raise UsageError(f"--sweep={path}: CONFIG must be a path, got {config!r}")
  for label, value in (("BASE", base), ("NAMES", names)):
    if not _string_keyed_dict(value):
      raise UsageError(f"--sweep={path}: {label} must be a dict keyed by config keys")
  named = [Point(point_name(p, names), p) for p in points]
  counts = collections.Counter(point.name for point in named)
  duplicates = sorted(name for name, count in counts.items() if count > 1)
  if duplicates:
    raise UsageError(
        f"--sweep={path}: several points are named {', '.join(duplicates)}"
        " (identical overrides, or NAMES too short)"
    )
  return SweepFile(path, config, base, named)


def resolve_config(config: str | None) -> str | None:
  """A sweep file's CONFIG as a path: relative ones start at the repository root."""
  return None if config is None else os.path.join(REPO_ROOT, config)


def run_dir(workdir: str, point: str, seed: int) -> str:
  return os.path.join(workdir, point, f"seed={seed}")


def read_json(path: str) -> Any:
  """A JSON file's contents, or None if it is absent or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_json(path: str, value: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)  # Readers never see half a file.


def read_manifest(workdir: str) -> dict[str, Any] | None:
  return read_json(os.path.join(workdir, MANIFEST_FILE))


def manifest_runs(
    manifest: Mapping[str, Any], workdir: str
) -> list[tuple[dict[str, Any], int, str]]:
  """(point, seed, run directory) of every run, point by point."""
  return [
      (point, seed, run_dir(workdir, point["name"], seed))
      for point in manifest["points"]
      for seed in manifest["seeds"]
  ]


# Locks: a run's RUNNING file is flock-ed by the launcher and inherited by the
# trainer, so it is held exactly while either lives, whoever killed whom.
def acquire_lock(directory: str) -> int | None:
  """The fd of the run's lock, now held; None if another process holds it."""
  os.makedirs(directory, exist_ok=True)
  fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return None
  describe_lock(fd, os.getpid())
  return fd


def release_lock(directory: str, fd: int) -> None:
  os.remove(os.path.join(directory, LOCK_FILE))
  os.close(fd)


def describe_lock(fd: int, pid: int) -> None:
  """Says in the lock file who holds it (for --status; the flock decides)."""
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": pid}).encode(), 0)


def lock_holder(directory: str) -> dict[str, Any] | None:
  """{host, pid} of the process holding the run's lock, None if none does."""
  path = os.path.join(directory, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    return read_json(path) or {}
  else:
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  finally:
    os.close(fd)


def run_state(directory: str) -> str:
  """done, running, failed or pending, from the run's files alone."""
  if os.path.exists(os.path.join(directory, RESULTS_FILE)):
    return DONE
  if lock_holder(directory) is not None:
    return RUNNING
  if os.path.exists(os.path.join(directory, FAILED_FILE)):
    return FAILED
  return PENDING


def latest_checkpoint_step(directory: str) -> int | None:
  try:
    steps = [int(d) for d in os.listdir(os.path.join(directory, "checkpoints")) if d.isdigit()]
  except OSError:
    return None
  return max(steps, default=None)


def state_detail(directory: str, state: str) -> str:
  """One line on a run: its accuracy, its failure, who runs it, how far it got."""
  if state == DONE:
    results = read_json(os.path.join(directory, RESULTS_FILE)) or {}
    return (
        f"top1 {100 * results.get('top1', float('nan')):.2f} %, step "
        f"{results.get('step')}, {results.get('wall_clock_s', 0):.0f} s"
    )
  if state == FAILED:
    failure = read_json(os.path.join(directory, FAILED_FILE)) or {}
    tail = [
        line
        for line in failure.get("log_tail", [])
        if line.strip() and not line.startswith((ATTEMPT_MARK, EXIT_MARK))
    ]
    return (
        f"exit {failure.get('exit_code')} after {failure.get('attempts')} "
        f"attempt(s): {tail[-1].strip()[:100] if tail else 'no output'}"
    )
  parts = []
  if state == RUNNING:
    holder = lock_holder(directory) or {}
    parts.append(f"pid {holder.get('pid')} on {holder.get('host')}")
  job = read_json(os.path.join(directory, JOB_FILE))
  if state == QUEUED and job:
    parts.append(f"{job['cluster']} job {job['job_id']}")
  step = latest_checkpoint_step(directory)
  if step is not None:
    parts.append(f"checkpoint at step {step}")
  return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a point at a seed, its directory and its command."""

  point: str
  seed: int
  directory: str
  command: tuple[str, ...]

  @property
  def label(self) -> str:
    return f"{self.point}/seed={self.seed}"


def exit_status(returncode: int) -> int:
  # A child killed by signal N reports -N; shells report 128 + N.
  return returncode if returncode >= 0 else 128 - returncode


def start_attempt(
    run: Run,
    attempt: int,
    lock_fd: int,
    *,
    env: Mapping[str, str] | None = None,
    cpus: Sequence[int] | None = None,
) -> subprocess.Popen:
  """Starts the run's command, appending its output to log.txt after a `==> ` line."""
  where = f", cpus {','.join(map(str, cpus))}" if cpus else ""
  env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
  with open(os.path.join(run.directory, LOG_FILE), "a") as log:
    log.write(
        f"{ATTEMPT_MARK}{time.strftime('%Y-%m-%d %H:%M:%S')} attempt {attempt} on "
        f"{socket.gethostname()}{where}: {shlex.join(run.command)}\n"
    )
    log.flush()
    proc = subprocess.Popen(
        run.command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        # Pinned before exec, so XLA's and TF's thread pools size to the share.
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        # Its own session: a terminal's Ctrl-C reaches the launcher only,
        # which stops the runs with SIGTERM (they checkpoint, then exit).
        start_new_session=True,
        pass_fds=(lock_fd,),
    )  # The run holds its lock even if we die.
  describe_lock(lock_fd, proc.pid)
  return proc


def finish_attempt(run: Run, returncode: int, started: float) -> str:
  """DONE, PENDING (stopped early after a checkpoint: resumable) or FAILED."""
  code = exit_status(returncode)
  with open(os.path.join(run.directory, LOG_FILE), "a") as log:
    log.write(f"{EXIT_MARK}exit status {code} after {time.time() - started:.0f} s\n")
  if os.path.exists(os.path.join(run.directory, RESULTS_FILE)):
    return DONE
  return PENDING if code == 0 else FAILED


def log_tail(path: str, lines: int = 20) -> list[str]:
  try:
    with open(path, "rb") as f:
      f.seek(max(0, os.fstat(f.fileno()).st_size - 16_384))
      return f.read().decode(errors="replace").splitlines()[-lines:]
  except OSError:
    return []


def record_failure(run: Run, returncode: int, attempts: int) -> None:
  log = os.path.join(run.directory, LOG_FILE)
  write_json(
      os.path.join(run.directory, FAILED_FILE),
      {
          "exit_code": exit_status(returncode),
          "attempts": attempts,
          "time": time.strftime("%Y-%m-%d %H:%M:%S"),
          "host": socket.gethostname(),
          "log": log,
          "log_tail": log_tail(log),
      },
  )


def clear_failure(run: Run) -> None:
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(run.directory, FAILED_FILE))


def poll_until_exit(proc: subprocess.Popen) -> int:
  # Not proc.wait(): a signal handler that polls the child (SlurmTask.checkpoint)
  # would deadlock on the lock wait() holds.
  while proc.poll() is None:
    time.sleep(0.5)
  return proc.returncode


_child: subprocess.Popen | None = None  # The trainer a SlurmTask runs now.


class SlurmTask:
  """A SLURM job's work: one run, retried in place, requeued when preempted.

  submitit calls `checkpoint` on a preemption or timeout notice: the trainer
  gets SIGTERM, saves a checkpoint and exits, and the job is requeued with a
  fresh task that resumes from it.
  """

  def __init__(self, run: Run, retries: int):
    self.run = run
    self.retries = retries

  def __call__(self) -> str:
    global _child
    if os.path.exists(os.path.join(self.run.directory, RESULTS_FILE)):
      return DONE
    lock_fd = acquire_lock(self.run.directory)
    if lock_fd is None:
      return RUNNING  # Submitted twice: the other job has it.
    try:
      clear_failure(self.run)
      for attempt in range(1, self.retries + 2):
        started = time.time()
        _child = start_attempt(self.run, attempt, lock_fd)
        returncode = poll_until_exit(_child)
        outcome = finish_attempt(self.run, returncode, started)
        if outcome != FAILED:
          return outcome
      record_failure(self.run, returncode, attempt)
      raise RuntimeError(
          f"{self.run.label} failed with exit status "
          f"{exit_status(returncode)}: see "
          f"{os.path.join(self.run.directory, LOG_FILE)}"
      )
    finally:
      release_lock(self.run.directory, lock_fd)

  def checkpoint(self) -> Any:
    import submitit  # pylint: disable=g-import-not-at-top

    if _child is not None and _child.poll() is None:
      os.killpg(_child.pid, signal.SIGTERM)
      poll_until_exit(_child)
    return submitit.helpers.DelayedSubmission(SlurmTask(self.run, self.retries))
