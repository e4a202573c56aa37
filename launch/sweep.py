"""Runs a sweep: one training run per point of a sweep file and per seed.

  python -m launch.sweep --sweep=configs/sweeps/expansion.py --workdir=DIR \\
      --seeds=0,1,2,3,4
  python -m launch.sweep --sweep=FILE --workdir=DIR --parallel=2  # Cores split in two.
  python -m launch.sweep --sweep=FILE --workdir=DIR --devices=0,1,2,3  # A run per GPU.
  python -m launch.sweep --sweep=FILE --workdir=DIR --backend=slurm \\
      --slurm_partition=gpu --slurm_gpus_per_task=1 --slurm_time=1440
  python -m launch.sweep --sweep=FILE --workdir=DIR --dry_run  # The commands only.
  python -m launch.sweep --sweep=FILE --workdir=DIR --points=NAME,...  # Only these.
  python -m launch.sweep --workdir=DIR --status  # A table of the runs.
  python -m launch.sweep --sweep=FILE --workdir=DIR -- --config.num_epochs=5
  python -m launch.report DIR  # Statistics and plots.

Each run is `python -m mnv2_flax.main` in WORKDIR/<point>/seed=<k>, its
output in log.txt there (layout and sweep files: launch/sweep_lib.py); flags
after `--` go to every run. Before anything runs, the sweep file and every
point's config are checked in-process; a mistake is one line, exit status 2.
WORKDIR/sweep.json records the sweep. Rerunning the same command resumes it:
finished runs are skipped, interrupted and failed ones restart from their
checkpoints, more --seeds add runs; any other change is refused (use a new
WORKDIR).

Local backend: --parallel runs at once, each pinned to its share of the CPU
cores or given one --devices slot (CUDA_VISIBLE_DEVICES). A failed run is
retried --retries times, then recorded in its FAILED file; the others go on.
Ctrl-C or SIGTERM makes the runs checkpoint and stop; a second one kills them.

SLURM backend (`pip install 'mnv2_flax[sweep]'`, for submitit): submits the
runs to start as job arrays of at most --slurm_array_limit tasks and exits
(--wait: waits for them). A preempted or timed-out job checkpoints and is
requeued. Rerunning the command reports, and resubmits the runs that are
neither finished, running nor queued.

Exit status: 0 every run finished; 1 none failed but some are unfinished
(interrupted, running elsewhere, queued); 2 a usage error or a refused SLURM
submission, nothing (more) ran; 10 + min(F, 100) F runs failed, named by the
last line printed.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import flags

from launch import sweep_lib
from launch.sweep_lib import DONE, FAILED, PENDING, QUEUED, Run, UsageError

EXIT_UNFINISHED = 1
EXIT_FAILED_BASE = 10  # Exit status 10 + min(failed runs, 100).
POLL_S = 0.2
# SLURM job states in which a job will still run (or runs).
SLURM_ACTIVE = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
)

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line. Defined when run, not on import: the tests import this
  module next to mnv2_flax.main, whose --workdir would clash."""
  flags.DEFINE_string(
      "sweep",
      None,
      "A sweep file (configs/sweeps/*.py); --status reads WORKDIR/sweep.json instead.",
  )
  flags.DEFINE_string(
      "workdir", None, "The sweep's directory: a sub-directory per run.", required=True
  )
  flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed): each point runs once per seed.")
  flags.DEFINE_list(
      "points", [], "Start only these points (names as in --dry_run); the others stay pending."
  )
  flags.DEFINE_integer(
      "parallel",
      None,
      "Runs at once here (default: one per --devices "
      "slot, else 1); on CPU each gets its share of the cores.",
      lower_bound=1,
  )
  flags.DEFINE_list("devices", [], "GPU slots, one run each: 0,1,2,3 (0+1: a slot of two GPUs).")
  flags.DEFINE_integer(
      "retries",
      0,
      "Reruns of a failed run, resuming from its checkpoints, before it counts as failed.",
      lower_bound=0,
  )
  flags.DEFINE_bool("dry_run", False, "Print the commands of the runs to start; run nothing.")
  flags.DEFINE_bool("status", False, "Print the state of every run; run nothing.")
  flags.DEFINE_enum("backend", "local", ["local", "slurm"], "Where the runs run.")
  flags.DEFINE_string("slurm_partition", None, "SLURM partition.")
  flags.DEFINE_integer(
      "slurm_time",
      24 * 60,
      "Time limit of a job in minutes; a run that needs longer checkpoints and is requeued.",
      lower_bound=1,
  )
  flags.DEFINE_integer("slurm_gpus_per_task", None, "GPUs per run.")
  flags.DEFINE_integer("slurm_cpus_per_task", None, "CPU cores per run.")
  flags.DEFINE_float("slurm_mem_gb", None, "Memory per run, GB.")
  flags.DEFINE_integer(
      "slurm_array_limit",
      1000,
      "Most tasks in one job array (the cluster's MaxArraySize - 1).",
      lower_bound=1,
  )
  flags.DEFINE_multi_string(
      "slurm_param",
      [],
      "Another submitit SLURM parameter "
      "KEY=VALUE, e.g. account=abc, qos=high, "
      "array_parallelism=16.",
  )
  flags.DEFINE_enum(
      "slurm_cluster",
      "slurm",
      ["slurm", "local", "debug"],
      "submitit's executor; local and debug (for tests) run the jobs "
      "on this machine and always wait for them.",
  )
  flags.DEFINE_bool("wait", False, "--backend=slurm: wait for the jobs, then report.")


def say(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_seeds(values: Sequence[str]) -> list[int]:
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    raise UsageError(f"--seeds={','.join(values)}: not a list of ints") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise UsageError(f"--seeds={','.join(values)}: give each seed once")
  return seeds


def override_args(overrides: dict[str, Any]) -> list[str]:
  return [f"--config.{key}={value}" for key, value in overrides.items()]


def is_config_flag(arg: str) -> bool:
  return arg.startswith("--config")


def override_key(arg: str) -> str | None:
  """`model.expansion` of `--config.model.expansion=6`; None for other flags."""
  return arg.split("=", 1)[0][len("--config.") :] if arg.startswith("--config.") else None


def check_extra_flags(extra: Sequence[str], sweep: sweep_lib.SweepFile) -> None:
  point_keys = {key for point in sweep.points for key in point.overrides}
  for arg in extra:
    if arg.split("=", 1)[0] == "--workdir":
      raise UsageError("flags after --: --workdir is the launcher's (WORKDIR/<point>/seed=<k>)")
    if not is_config_flag(arg):
      continue
    if "=" not in arg:
      raise UsageError(f"flags after --: write {arg}=VALUE, with '='")
    if arg.startswith("--config="):
      if sweep.config is not None:
        raise UsageError(
            f"flags after --: {arg}, but the sweep file sets CONFIG = {sweep.config!r}"
        )
    elif override_key(arg) == "seed":
      raise UsageError("flags after --: set seeds with --seeds")
    elif override_key(arg) in point_keys:
      raise UsageError(f"flags after --: {arg.split('=')[0]} is set by the sweep's points")


def base_args(sweep: sweep_lib.SweepFile) -> list[str]:
  """The config file and BASE overrides of every run of the sweep."""
  config = sweep_lib.resolve_config(sweep.config)
  return ([f"--config={config}"] if config else []) + override_args(sweep.base)


def build_config(args: Sequence[str]) -> Any:
  """The config `mnv2_flax.main` would get from these flags."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from mnv2_flax import config_lib  # pylint: disable=g-import-not-at-top

  argv = ["sweep", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", config_lib.__file__, flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return flag_values.config


def config_keys(config: Any, prefix: str = "") -> set[str]:
  """Dotted names of every key and sub-dict of a ConfigDict."""
  keys = set()
  for name, value in config.items():
    keys.add(prefix + name)
    if hasattr(value, "items"):
      keys |= config_keys(value, f"{prefix}{name}.")
  return keys


def validate_points(sweep: sweep_lib.SweepFile, extra: Sequence[str], seed: int) -> None:
  """Builds every point's config as the trainer will and runs its checks."""
  from mnv2_flax import config_lib, errors  # pylint: disable=g-import-not-at-top

  args = [*base_args(sweep), *(arg for arg in extra if is_config_flag(arg))]
  try:
    known = config_keys(build_config([a for a in args if a.startswith("--config=")]))
  except OSError as e:
    raise UsageError(" ".join(str(e).split())) from None
  sources = [
      ("the sweep file's BASE", list(sweep.base)),
      ("flags after --", [k for a in extra if (k := override_key(a))]),
  ]
  sources += [(f"point {p.name}", list(p.overrides)) for p in sweep.points]
  for where, keys in sources:
    for key in keys:
      if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        raise UsageError(
            f"{where}: unknown config key {key!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
        )
  for point in sweep.points:
    try:
      config = build_config([*args, *override_args(point.overrides), f"--config.seed={seed}"])
      config_lib.validate(config, device_count=1)
    except (flags.Error, errors.ConfigError, TypeError, ValueError) as e:
      raise UsageError(f"point {point.name}: {str(e).splitlines()[0]}") from None


def git_commit() -> str | None:
  """HEAD of the project's checkout, marked if tracked files differ from it."""

  def git(*args: str) -> str:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # Read only: no index refresh.
    return subprocess.run(
        ["git", *args], cwd=sweep_lib.REPO_ROOT, env=env, text=True, capture_output=True, check=True
    ).stdout.strip()

  try:
    commit, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "-uno")
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + (" (with uncommitted changes)" if changes else "")


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  changes = []
  if old["config"] != new["config"]:
    changes.append(f"CONFIG {old['config']} -> {new['config']}")
  if old["base"] != new["base"]:
    changes.append(f"BASE {old['base']} -> {new['base']}")
  before = {p["name"]: p["overrides"] for p in old["points"]}
  after = {p["name"]: p["overrides"] for p in new["points"]}
  for label, names in (
      ("points added", [n for n in after if n not in before]),
      ("points removed", [n for n in before if n not in after]),
      ("overrides changed", [n for n in after if n in before and after[n] != before[n]]),
  ):
    if names:
      changes.append(f"{label}: {', '.join(names)}")
  if old["extra_flags"] != new["extra_flags"]:
    changes.append(
        f"flags after -- {shlex.join(old['extra_flags'])!r} -> "
        f"{shlex.join(new['extra_flags'])!r}"
    )
  return changes


def make_manifest(
    sweep: sweep_lib.SweepFile, seeds: list[int], extra: list[str], workdir: str
) -> dict[str, Any]:
  """This launch's sweep.json; refuses one that contradicts the workdir's."""
  manifest = {
      "sweep_file": sweep.path,
      "config": sweep.config,
      "base": sweep.base,
      "points": [{"name": p.name, "overrides": p.overrides} for p in sweep.points],
      "seeds": seeds,
      "extra_flags": extra,
  }
  try:
    manifest = json.loads(json.dumps(manifest))  # As it reads back: lists, not tuples.
  except TypeError as e:
    raise UsageError(f"--sweep={sweep.path}: {e} (overrides must be JSON values)") from None
  old = sweep_lib.read_manifest(workdir)
  now = {
      "time": time.strftime("%Y-%m-%d %H:%M:%S"),
      "git_commit": git_commit(),
      "command": shlex.join(sys.argv),
  }
  if old is None:
    return {**manifest, "created": now["time"], "git_commit": now["git_commit"], "launches": [now]}
  changes = describe_changes(old, manifest)
  if changes:
    raise UsageError(
        f"{workdir} holds another sweep ({'; '.join(changes)}): use a new "
        "--workdir, or the sweep file and flags it was started with"
    )
  dropped = [s for s in old["seeds"] if s not in seeds]
  if dropped:
    raise UsageError(
        f"--seeds drops seeds {dropped} of the sweep in {workdir}: "
        f"pass at least --seeds={','.join(map(str, old['seeds']))}"
    )
  return {**old, "seeds": seeds, "launches": [*old["launches"], now]}


def plan_runs(
    sweep: sweep_lib.SweepFile, seeds: list[int], extra: list[str], workdir: str
) -> list[Run]:
  """Every run, seed by seed: a first seed of every point comes early."""
  runs = []
  for seed in seeds:
    for point in sweep.points:
      directory = sweep_lib.run_dir(workdir, point.name, seed)
      command = (
          sys.executable,
          "-m",
          "mnv2_flax.main",
          *base_args(sweep),
          *extra,
          f"--workdir={directory}",
          *override_args(point.overrides),
          f"--config.seed={seed}",
      )
      runs.append(Run(point.name, seed, directory, command))
  return runs


def select_points(runs: list[Run], sweep: sweep_lib.SweepFile, names: Sequence[str]) -> list[Run]:
  """The runs of the named points (all of them when none is named)."""
  known = [point.name for point in sweep.points]
  unknown = [name for name in names if name not in known]
  if unknown:
    raise UsageError(
        f"--points: {', '.join(unknown)} not in the sweep; its points: {', '.join(known)}"
    )
  return [run for run in runs if not names or run.point in names]


def import_submitit() -> Any:
  try:
    import submitit  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UsageError(
        "--backend=slurm needs submitit: pip install 'mnv2_flax[sweep]' "
        "(or pip install submitit)"
    ) from None
  return submitit


def current_states(directories: Sequence[str]) -> dict[str, str]:
  """Each run's state; pending runs with a live SLURM job are queued."""
  states = {d: sweep_lib.run_state(d) for d in directories}
  jobs = {
      d: sweep_lib.read_json(os.path.join(d, sweep_lib.JOB_FILE))
      for d, state in states.items()
      if state == PENDING
  }
  jobs = {d: job for d, job in jobs.items() if job and job["cluster"] == "slurm"}
  if jobs:
    submitit = import_submitit()
    # Every job is created before any state is read: one sacct call for all.
    handles = {
        d: submitit.SlurmJob(folder=job["folder"], job_id=job["job_id"]) for d, job in jobs.items()
    }
    for d, handle in handles.items():
      if handle.state in SLURM_ACTIVE:
        states[d] = QUEUED
  return states


def summary_line(states: Sequence[str]) -> str:
  counts = collections.Counter(states)
  parts = [f"{counts[s]} {s}" for s in sweep_lib.STATES if counts[s]]
  return f"{len(states)} runs: {', '.join(parts)}"


def show_status(workdir: str) -> int:
  manifest = sweep_lib.read_manifest(workdir)
  if manifest is None:
    raise UsageError(f"{workdir}: no {sweep_lib.MANIFEST_FILE}, so no sweep was launched there")
  runs = sweep_lib.manifest_runs(manifest, workdir)
  states = current_states([directory for _, _, directory in runs])
  width = max(len("point"), *(len(point["name"]) for point, _, _ in runs))
  print(f"{'point':<{width}}  seed  {'status':<8} detail")
  for point, seed, directory in runs:
    state = states[directory]
    print(
        f"{point['name']:<{width}}  {seed:>4}  {state:<8} "
        f"{sweep_lib.state_detail(directory, state)}"
    )
  print(summary_line(list(states.values())))
  return 0


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where one local run at a time runs: GPUs (environment) or CPU cores."""

  env: dict[str, str]
  cpus: tuple[int, ...] | None


def make_slots(parallel: int | None, devices: Sequence[str]) -> list[Slot]:
  if devices:
    if not all(part.isdigit() for slot in devices for part in slot.split("+")):
      raise UsageError(f"--devices={','.join(devices)}: GPU ids, e.g. 0,1 or 0+1,2+3")
    if (parallel or len(devices)) > len(devices):
      raise UsageError(f"--parallel={parallel} is more than the {len(devices)} --devices slots")
    return [
        Slot({"CUDA_VISIBLE_DEVICES": slot.replace("+", ",")}, None)
        for slot in devices[: parallel or len(devices)]
    ]
  parallel = parallel or 1
  if parallel == 1:
    return [Slot({}, None)]
  cores = sorted(os.sched_getaffinity(0))
  if parallel > len(cores):
    raise UsageError(
        f"--parallel={parallel} is more than the {len(cores)} CPU cores this process may use"
    )
  return [
      Slot({}, tuple(cores[i * len(cores) // parallel : (i + 1) * len(cores) // parallel]))
      for i in range(parallel)
  ]


class StopSignals:
  """SIGINT/SIGTERM: the first stops the runs (they checkpoint), the next kills."""

  def __init__(self):
    self.received = 0
    self._forwarded = 0
    self._previous = {
        sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
    }

  def _handle(self, signum, frame):
    del signum, frame
    self.received += 1

  def forward(self, procs: Sequence[subprocess.Popen]) -> None:
    if self.received == self._forwarded:
      return
    self._forwarded = self.received
    sig = signal.SIGTERM if self.received == 1 else signal.SIGKILL
    say("stopping: the runs checkpoint and exit" if sig == signal.SIGTERM else "killing the runs")
    for proc in procs:
      try:
        os.killpg(proc.pid, sig)  # The trainer and anything it started.
      except ProcessLookupError:
        pass

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


@dataclasses.dataclass
class Active:
  """A run started by this launcher and the state of its current attempt."""

  run: Run
  lock_fd: int
  proc: subprocess.Popen
  attempt: int
  started: float


def run_local(runs: Sequence[Run], slots: Sequence[Slot], retries: int) -> None:
  """Runs each on a free slot; returns when all ended or a signal stopped them."""
  todo = collections.deque(runs)
  active: dict[int, Active] = {}  # By slot index.
  stop = StopSignals()

  def start(run: Run, lock_fd: int, attempt: int, slot: Slot) -> Active:
    proc = sweep_lib.start_attempt(run, attempt, lock_fd, env=slot.env, cpus=slot.cpus)
    where = (
        f", cpus {','.join(map(str, slot.cpus))}"
        if slot.cpus
        else "".join(f", {k}={v}" for k, v in slot.env.items())
    )
    say(f"start {run.label} (attempt {attempt}{where})")
    return Active(run, lock_fd, proc, attempt, time.time())

  try:
    # After a stop signal the runs not yet started stay pending: wait only for
    # the active ones to checkpoint and exit.
    while active or (todo and not stop.received):
      for i, slot in enumerate(slots):
        while i not in active and todo and not stop.received:
          run = todo.popleft()
          lock_fd = sweep_lib.acquire_lock(run.directory)
          if lock_fd is None:
            say(f"skip {run.label}: another process runs it")
          elif sweep_lib.run_state(run.directory) == DONE:  # Finished meanwhile.
            sweep_lib.release_lock(run.directory, lock_fd)
          else:
            sweep_lib.clear_failure(run)
            active[i] = start(run, lock_fd, 1, slot)
      stop.forward([a.proc for a in active.values()])
      time.sleep(POLL_S)
      for i, a in list(active.items()):
        if a.proc.poll() is None:
          continue
        outcome = sweep_lib.finish_attempt(a.run, a.proc.returncode, a.started)
        if outcome == FAILED and stop.received:
          outcome = PENDING  # Killed by us, not broken.
        if outcome == FAILED and a.attempt <= retries:
          say(f"retry {a.run.label}: exit status {sweep_lib.exit_status(a.proc.returncode)}")
          active[i] = start(a.run, a.lock_fd, a.attempt + 1, slots[i])
          continue
        if outcome == FAILED:
          sweep_lib.record_failure(a.run, a.proc.returncode, a.attempt)
        sweep_lib.release_lock(a.run.directory, a.lock_fd)
        del active[i]
        state = sweep_lib.run_state(a.run.directory)
        say(
            f"{'stopped' if outcome == PENDING else state} {a.run.label}: "
            f"{sweep_lib.state_detail(a.run.directory, state) or 'resumes next time'}"
        )
  finally:
    stop.restore()


def slurm_parameters() -> dict[str, Any]:
  params = {
      "timeout_min": FLAGS.slurm_time,
      "nodes": 1,
      "tasks_per_node": 1,
      "cpus_per_task": FLAGS.slurm_cpus_per_task,
      "mem_gb": FLAGS.slurm_mem_gb,
      "slurm_partition": FLAGS.slurm_partition,
      "slurm_gpus_per_task": FLAGS.slurm_gpus_per_task,
  }
  for param in FLAGS.slurm_param:
    key, sep, value = param.partition("=")
    if not sep:
      raise UsageError(f"--slurm_param={param}: write KEY=VALUE")
    try:
      params[f"slurm_{key}"] = json.loads(value)
    except ValueError:
      params[f"slurm_{key}"] = value  # A plain string, e.g. an account name.
  return {k: v for k, v in params.items() if v is not None}


def slurm_executor(workdir: str) -> Any:
  """submitit's executor, its parameters from the flags."""
  submitit = import_submitit()
  try:
    executor = submitit.AutoExecutor(
        folder=os.path.join(workdir, "slurm"), cluster=FLAGS.slurm_cluster
    )
    executor.update_parameters(name=f"sweep_{os.path.basename(workdir)}", **slurm_parameters())
  except (AssertionError, NameError, RuntimeError, TypeError, ValueError) as e:
    raise UsageError(f"--backend=slurm: {str(e).splitlines()[0]}") from None
  return executor


def run_slurm(executor: Any, runs: Sequence[Run], retries: int, wait: bool) -> None:
  """Submits the runs as job arrays; with `wait`, returns when all jobs ended."""
  submitted = []
  for first in range(0, len(runs), FLAGS.slurm_array_limit):
    chunk = runs[first : first + FLAGS.slurm_array_limit]
    for run in chunk:
      os.makedirs(run.directory, exist_ok=True)
      sweep_lib.clear_failure(run)  # It is queued now.
    try:
      with executor.batch():
        jobs = [executor.submit(sweep_lib.SlurmTask(run, retries)) for run in chunk]
    except (OSError, RuntimeError) as e:  # sbatch refused (partition, account...).
      raise UsageError(f"SLURM submission failed: {str(e).splitlines()[0]}") from None
    for run, job in zip(chunk, jobs):
      sweep_lib.write_json(
          os.path.join(run.directory, sweep_lib.JOB_FILE),
          {
              "cluster": FLAGS.slurm_cluster,
              "job_id": job.job_id,
              "folder": str(executor.folder),
              "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
          },
      )
    say(
        f"submitted {len(chunk)} run(s): job(s) {jobs[0].job_id}"
        + (f" to {jobs[-1].job_id}" if len(jobs) > 1 else "")
    )
    submitted += zip(chunk, jobs)
  if not wait:
    return
  try:
    for run, job in submitted:
      try:
        job.result()
      except Exception:  # pylint: disable=broad-except
        pass  # Its FAILED file (or its absence) tells.
      state = sweep_lib.run_state(run.directory)
      say(f"{state} {run.label}: {sweep_lib.state_detail(run.directory, state)}")
  except KeyboardInterrupt:
    say("stopped waiting; the jobs go on")


def conclude(runs: Sequence[Run]) -> int:
  """Prints the sweep's state; the exit status (module docstring)."""
  states = current_states([run.directory for run in runs])
  print(summary_line(list(states.values())))
  failed = [run for run in runs if states[run.directory] == FAILED]
  for run in failed:
    print(
        f"  {run.label}: {sweep_lib.state_detail(run.directory, FAILED)} "
        f"(log: {os.path.join(run.directory, sweep_lib.LOG_FILE)})"
    )
  if failed:
    print(f"{len(failed)} of {len(runs)} runs failed: {', '.join(run.label for run in failed)}")
    return EXIT_FAILED_BASE + min(len(failed), 100)
  if any(state != DONE for state in states.values()):
    print("Not finished yet: rerun the same command to resume, or to see how far the runs got.")
    return EXIT_UNFINISHED
  return 0


def main(argv: list[str]) -> int:
  extra = argv[1:]
  workdir = os.path.abspath(FLAGS.workdir)
  if FLAGS.status:
    return show_status(workdir)
  if not FLAGS.sweep:
    raise UsageError("--sweep is required (except with --status)")
  sweep = sweep_lib.load_sweep_file(FLAGS.sweep)
  seeds = parse_seeds(FLAGS.seeds)
  check_extra_flags(extra, sweep)
  manifest = make_manifest(sweep, seeds, extra, workdir)
  slots = make_slots(FLAGS.parallel, FLAGS.devices) if FLAGS.backend == "local" else []
  validate_points(sweep, extra, min(seeds))
  runs = select_points(plan_runs(sweep, seeds, extra, workdir), sweep, FLAGS.points)
  states = current_states([run.directory for run in runs])
  todo = [run for run in runs if states[run.directory] in (PENDING, FAILED)]
  if FLAGS.dry_run:
    for run in todo:
      print(shlex.join(run.command))
    print(f"# {len(todo)} of {len(runs)} runs to start; the others are finished, running or queued")
    return 0
  executor = slurm_executor(workdir) if FLAGS.backend == "slurm" and todo else None
  os.makedirs(workdir, exist_ok=True)
  sweep_lib.write_json(os.path.join(workdir, sweep_lib.MANIFEST_FILE), manifest)
  if FLAGS.backend == "local":
    run_local(todo, slots, FLAGS.retries)
  elif todo:
    run_slurm(executor, todo, FLAGS.retries, wait=FLAGS.wait or FLAGS.slurm_cluster != "slurm")
  return conclude(runs)


if __name__ == "__main__":
  define_flags()
  sweep_lib.run_cli(main)
