"""launch.sweep: real sweeps of configs/smoke.py, and its parts on stand-in runs."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from launch import report, sweep, sweep_lib

from conftest import CACHE_DIR, REPO, SHALLOW_FLAG, processes_mentioning, started, xla_flags

# Two points: one trains; one fails at run time (no checkpoint to start from),
# after passing the checks made before anything runs.
SWEEP = '''"""A test sweep."""
CONFIG = "configs/smoke.py"


def get_sweep():
  return [{"model.bottleneck": "linear"}, {"checkpoint_path": "no_such_checkpoint"}]
'''
GOOD, BAD = "bottleneck=linear", "checkpoint_path=no_such_checkpoint"
RUN_FLAGS = [
    "--",
    SHALLOW_FLAG,
    "--config.num_train_steps=2",
    f"--config.compilation_cache_dir={CACHE_DIR}",
]
ENV = dict(
    os.environ,
    XLA_FLAGS=xla_flags(1),
    PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
)


def launcher(*args):
  return [sys.executable, "-m", "launch.sweep", *args]


def run_launcher(*args, timeout=300):
  return subprocess.run(
      launcher(*args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
  )


def log_text(directory):
  path = os.path.join(directory, sweep_lib.LOG_FILE)
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    return f.read()


def attempts(directory):
  """How often the launcher started the run: its log's attempt lines."""
  return sum(line.startswith(sweep_lib.ATTEMPT_MARK) for line in log_text(directory).splitlines())


def wait_for(condition, timeout):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, "timed out"
    time.sleep(0.1)


@pytest.mark.slow  # Four training runs, one of them killed.
def test_killed_sweep_resumes_on_slurm_and_reports_failures(tmp_path):
  sweep_file, workdir = tmp_path / "sweep.py", tmp_path / "sweep"
  sweep_file.write_text(SWEEP)
  # configs/smoke.py as it is: 8 steps.
  args = [f"--sweep={sweep_file}", f"--workdir={workdir}", "--", SHALLOW_FLAG, RUN_FLAGS[-1]]
  good, bad = workdir / GOOD / "seed=0", workdir / BAD / "seed=0"
  with started(
      launcher(*args),
      str(workdir),
      cwd=REPO,
      env=ENV,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  ) as proc:
    # The trainer logs this once its SIGTERM handler is installed; it is then
    # frozen (SIGSTOP) so that it cannot finish before the launcher has
    # relayed the signal, which it says on stdout; SIGCONT delivers it.
    wait_for(lambda: "Training 8 steps" in log_text(good), timeout=240)
    (trainer,) = processes_mentioning(f"--workdir={good}")
    os.kill(trainer, signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    said = [proc.stdout.readline()]
    while not said[-1].rstrip().endswith("stopping: the runs checkpoint and exit"):
      assert said[-1], f"the launcher ended without relaying the signal: {said}"
      said.append(proc.stdout.readline())
    os.kill(trainer, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
  assert proc.returncode == sweep.EXIT_UNFINISHED, err
  assert sweep_lib.run_state(str(good)) == sweep_lib.PENDING  # Checkpointed, resumable.
  assert sweep_lib.run_state(str(bad)) == sweep_lib.PENDING  # Never started.
  assert (attempts(good), attempts(bad)) == (1, 0)

  # Resumed through the SLURM backend (submitit's local executor): the
  # interrupted run resumes from its checkpoint and ends, the other fails.
  rerun = run_launcher(
      *args[:2],
      "--backend=slurm",
      "--slurm_cluster=local",
      "--slurm_array_limit=1",
      "--slurm_partition=ignored_here",
      "--slurm_time=10",
      *args[2:],
  )
  assert rerun.returncode == sweep.EXIT_FAILED_BASE + 1, rerun.stderr
  lines = rerun.stdout.splitlines()
  assert lines[-1] == f"1 of 2 runs failed: {BAD}/seed=0"
  assert "2 runs: 1 done, 1 failed" in lines
  assert json.loads((bad / sweep_lib.JOB_FILE).read_text())["cluster"] == "local"
  assert (attempts(good), attempts(bad)) == (2, 1)
  assert "Resumed from" in log_text(good)
  failure = json.loads((bad / sweep_lib.FAILED_FILE).read_text())
  assert failure["exit_code"] == 2 and failure["attempts"] == 1
  assert "error: no checkpoint in no_such_checkpoint" in failure["log_tail"]
  results = json.loads((good / sweep_lib.RESULTS_FILE).read_text())
  assert results["step"] == 8 and results["num_params"] > 0 and results["macs"] > 0
  manifest = json.loads((workdir / sweep_lib.MANIFEST_FILE).read_text())
  assert len(manifest["launches"]) == 2 and manifest["seeds"] == [0]

  status = run_launcher(f"--workdir={workdir}", "--status")
  assert status.returncode == 0, status.stderr
  table = status.stdout.splitlines()
  assert table[1].split()[:3] == [GOOD, "0", "done"]
  assert table[2].split()[:3] == [BAD, "0", "failed"]
  assert table[2].endswith("error: no checkpoint in no_such_checkpoint")
  assert table[-1] == "2 runs: 1 done, 1 failed"

  # The trainer's event files, read back as the report does.
  curves = report.read_scalars(str(good), ["eval_top1", "loss"])
  assert curves["eval_top1"] == {8: pytest.approx(results["top1"])}
  assert 8 in curves["loss"]

  # Another sweep in the same workdir is refused before anything runs.
  sweep_file.write_text(SWEEP.replace('"linear"', '"relu6"'))
  changed = run_launcher(*args)
  assert changed.returncode == 2
  assert changed.stderr == (
      f"error: {workdir} holds another sweep (points added: bottleneck=relu6; points "
      "removed: bottleneck=linear): use a new --workdir, or the sweep file and flags "
      "it was started with\n"
  )


def fake_run(tmp_path, name, code):
  """A stand-in run: Python code (`{directory}`: its directory), not the trainer."""
  directory = str(tmp_path / name / "seed=0")
  os.makedirs(directory)
  return sweep_lib.Run(
      name, 0, directory, (sys.executable, "-c", code.replace("{directory}", directory))
  )


def test_run_local_retries_pins_cores_and_goes_on_after_a_failure(tmp_path):
  broken = fake_run(tmp_path, "broken", "import sys; print('boom'); sys.exit(3)")
  fine = [
      fake_run(
          tmp_path,
          f"fine{i}",
          (
              "import json, os; print(sorted(os.sched_getaffinity(0))); "
              "json.dump({'top1': 0.5}, open('{directory}/results.json', 'w'))"
          ),
      )
      for i in range(3)
  ]
  cores = sorted(os.sched_getaffinity(0))[:2]
  sweep.run_local([broken, *fine], [sweep.Slot({}, (c,)) for c in cores], retries=1)
  assert attempts(broken.directory) == 2
  with open(os.path.join(broken.directory, sweep_lib.FAILED_FILE)) as f:
    failure = json.load(f)
  assert failure["exit_code"] == 3 and failure["attempts"] == 2
  assert failure["log_tail"][-2] == "boom"
  assert failure["log_tail"][-1].startswith(f"{sweep_lib.EXIT_MARK}exit status 3 after")
  for run in fine:
    assert sweep_lib.run_state(run.directory) == sweep_lib.DONE
    assert log_text(run.directory).splitlines()[1] in [f"[{c}]" for c in cores]
    assert not os.path.exists(os.path.join(run.directory, sweep_lib.LOCK_FILE))
  assert sweep.conclude([broken, *fine]) == sweep.EXIT_FAILED_BASE + 1


def test_slurm_task_retries_finishes_and_requeues(tmp_path):
  """A SLURM job's task: retried in place; on preemption (submitit calls
  `checkpoint` while it runs) the trainer checkpoints and a task is requeued."""
  flaky = fake_run(
      tmp_path,
      "flaky",
      (
          "import json, os, sys; first = not os.path.exists('{directory}/once'); "
          "open('{directory}/once', 'w'); "
          "sys.exit(1) if first else json.dump({}, open('{directory}/results.json', 'w'))"
      ),
  )
  assert sweep_lib.SlurmTask(flaky, retries=1)() == sweep_lib.DONE
  assert attempts(flaky.directory) == 2
  broken = fake_run(tmp_path, "broken", "raise SystemExit(5)")
  with pytest.raises(RuntimeError, match="failed with exit status 5"):
    sweep_lib.SlurmTask(broken, retries=0)()
  assert sweep_lib.run_state(broken.directory) == sweep_lib.FAILED

  long = fake_run(
      tmp_path,
      "long",
      (
          "import signal, sys, time; "
          "signal.signal(signal.SIGTERM, lambda *_: sys.exit(print('saved') or 0)); "
          "print('training', flush=True); time.sleep(60)"
      ),
  )
  task = sweep_lib.SlurmTask(long, retries=2)
  outcome = []
  thread = threading.Thread(target=lambda: outcome.append(task()))
  thread.start()
  # The trainer's own output line: the logged command also contains the word,
  # and signalling before the handler is installed kills it (exit 143, retried).
  wait_for(lambda: "training" in log_text(long.directory).splitlines(), timeout=30)
  assert sweep_lib.run_state(long.directory) == sweep_lib.RUNNING
  requeued = task.checkpoint()
  thread.join(10)
  assert outcome == [sweep_lib.PENDING]  # Checkpointed: neither done nor failed.
  assert "saved" in log_text(long.directory).splitlines()
  assert isinstance(requeued.function, sweep_lib.SlurmTask)
  assert requeued.function.run == long and requeued.function.retries == 2


def test_status_table_and_half_written_results(tmp_path):
  names = ["done", "running", "failed", "half_written", "queued_elsewhere"]
  sweep_lib.write_json(
      str(tmp_path / "sweep.json"),
      {"points": [{"name": n, "overrides": {}} for n in names], "seeds": [0]},
  )
  directories = {n: tmp_path / n / "seed=0" for n in names}
  for directory in directories.values():
    directory.mkdir(parents=True)
  (directories["done"] / "results.json").write_text(
      json.dumps({"top1": 0.75, "step": 8, "wall_clock_s": 3.0})
  )
  sweep_lib.write_json(
      str(directories["failed"] / "FAILED"),
      {"exit_code": 1, "attempts": 1, "log_tail": ["ValueError: bad", "<== exit status 1"]},
  )
  (directories["half_written"] / "results.json.tmp").write_text('{"top1": 0.')
  (directories["half_written"] / "checkpoints" / "4").mkdir(parents=True)
  sweep_lib.write_json(
      str(directories["queued_elsewhere"] / "job.json"),
      {"cluster": "local", "job_id": "123", "folder": str(tmp_path)},
  )
  lock = sweep_lib.acquire_lock(str(directories["running"]))
  try:
    proc = run_launcher(f"--workdir={tmp_path}", "--status")
  finally:
    sweep_lib.release_lock(str(directories["running"]), lock)
  assert proc.returncode == 0, proc.stderr
  rows = [line.split(None, 3) for line in proc.stdout.splitlines()[1:-1]]
  assert rows == [
      ["done", "0", "done", "top1 75.00 %, step 8, 3 s"],
      ["running", "0", "running", f"pid {os.getpid()} on {socket.gethostname()}"],
      ["failed", "0", "failed", "exit 1 after 1 attempt(s): ValueError: bad"],
      ["half_written", "0", "pending", "checkpoint at step 4"],
      ["queued_elsewhere", "0", "pending"],  # A local job does not outlive its launcher.
  ]
  assert proc.stdout.splitlines()[-1] == "5 runs: 1 done, 1 running, 1 failed, 2 pending"


def test_dry_run_prints_the_runs_to_start(tmp_path):
  sweep_file, workdir = tmp_path / "sweep.py", tmp_path / "sweep"
  sweep_file.write_text(SWEEP)
  (workdir / GOOD / "seed=1").mkdir(parents=True)
  (workdir / GOOD / "seed=1" / "results.json").write_text("{}")
  (workdir / BAD / "seed=1").mkdir(parents=True)
  (workdir / BAD / "seed=1" / "results.json.tmp").write_text("{")  # Not finished.
  proc = run_launcher(
      f"--sweep={sweep_file}", f"--workdir={workdir}", "--seeds=1,0", "--dry_run", *RUN_FLAGS
  )
  assert proc.returncode == 0, proc.stderr
  commands = proc.stdout.splitlines()
  assert commands[-1] == ("# 3 of 4 runs to start; the others are finished, running or queued")
  assert shlex.split(commands[0]) == [
      sys.executable,
      "-m",
      "mnv2_flax.main",
      f"--config={REPO}/configs/smoke.py",
      *RUN_FLAGS[1:],
      f"--workdir={workdir}/{BAD}/seed=1",
      "--config.checkpoint_path=no_such_checkpoint",
      "--config.seed=1",
  ]
  assert [shlex.split(c)[-1] for c in commands[1:3]] == ["--config.seed=0"] * 2
  assert not (workdir / "sweep.json").exists()  # Nothing ran, nothing recorded.
  # --points starts only the named points.
  proc = run_launcher(
      f"--sweep={sweep_file}",
      f"--workdir={workdir}",
      "--seeds=1,0",
      f"--points={GOOD}",
      "--dry_run",
      *RUN_FLAGS,
  )
  assert proc.returncode == 0, proc.stderr
  commands = proc.stdout.splitlines()
  assert commands[-1] == "# 1 of 2 runs to start; the others are finished, running or queued"
  assert f"--workdir={workdir}/{GOOD}/seed=0" in shlex.split(commands[0])
  proc = run_launcher(
      f"--sweep={sweep_file}", f"--workdir={workdir}", "--points=nope", "--dry_run", *RUN_FLAGS
  )
  assert proc.returncode == 2 and proc.stderr.startswith("error: --points: nope not in the sweep")


@pytest.mark.parametrize(
    "source, message",
    [
        (None, "no such file"),
        ("X = 1", "defines no get_sweep()"),
        ("def get_sweep():\n  return {'a': 1}", "must return a non-empty list"),
        ("def get_sweep():\n  return [1, 2]", "must return a non-empty list"),
        (
            "def get_sweep():\n  return [{'model.expansion': 2}, {'model.expansion': 2}]",
            "several points are named expansion=2",
        ),
        ("def get_sweep():\n  raise ValueError('oops')", "ValueError: oops"),
        ("BASE = 3\ndef get_sweep():\n  return [{}]", "BASE must be a dict"),
    ],
)
def test_bad_sweep_files(tmp_path, source, message):
  path = tmp_path / "bad.py"
  if source is not None:
    path.write_text(source)
  with pytest.raises(sweep_lib.UsageError, match=message):
    sweep_lib.load_sweep_file(str(path))


def test_point_names_and_helpers():
  assert sweep_lib.product({"a": (1, 2), "b": "xy"}) == [
      {"a": 1, "b": "x"},
      {"a": 1, "b": "y"},
      {"a": 2, "b": "x"},
      {"a": 2, "b": "y"},
  ]
  assert (
      sweep_lib.point_name(
          {"model.expansion": 6, "model.bottleneck": "linear"}, {"model.expansion": "t"}
      )
      == "t=6,bottleneck=linear"
  )
  assert sweep_lib.point_name({"model.stage_strides": (1, 2), "x": "a/b"}, {}) == (
      "stage_strides=_1,2_,x=a_b"
  )
  assert sweep_lib.point_name({}, {}) == "base"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"model.expanson": 2},
            "point expanson=2: unknown config key 'model.expanson' "
            "(did you mean 'model.expansion'?)",
        ),
        (
            {"model.expansion": 0},
            "point expansion=0: config.model.expansion: must be an int >= 1, got 0",
        ),
        (
            {"model.expansion": "six"},
            "point expansion=six: flag --config.model.expansion=six: invalid literal for int()",
        ),
    ],
)
def test_points_are_checked_as_the_trainer_builds_them(tmp_path, overrides, message):
  path = tmp_path / "sweep.py"
  path.write_text(f"CONFIG = 'configs/smoke.py'\ndef get_sweep():\n  return [{overrides!r}]")
  with pytest.raises(sweep_lib.UsageError) as error:
    sweep.validate_points(sweep_lib.load_sweep_file(str(path)), [], seed=0)
  assert str(error.value).startswith(message)


def test_usage_errors_are_one_line_and_run_nothing(tmp_path):
  sweep_file, workdir = tmp_path / "sweep.py", tmp_path / "sweep"
  sweep_file.write_text(SWEEP.replace("model.bottleneck", "model.bottlenek"))
  proc = run_launcher(f"--sweep={sweep_file}", f"--workdir={workdir}", *RUN_FLAGS)
  assert proc.returncode == 2
  assert proc.stderr == (
      "error: point bottlenek=linear: unknown config key "
      "'model.bottlenek' (did you mean 'model.bottleneck'?)\n"
  )
  assert not workdir.exists()
  proc = run_launcher(f"--sweep={tmp_path / 'nope.py'}", f"--workdir={workdir}")
  assert (proc.returncode, proc.stderr) == (
      2,
      f"error: --sweep={tmp_path}/nope.py: no such file\n",
  )


def test_extra_flags_and_changes_are_checked(tmp_path):
  sweep_file = tmp_path / "sweep.py"
  sweep_file.write_text(SWEEP)
  loaded = sweep_lib.load_sweep_file(str(sweep_file))
  for extra, message in (
      (["--workdir=x"], "--workdir is the launcher's"),
      (["--config.seed=3"], "set seeds with --seeds"),
      (["--config.model.bottleneck=relu6"], "set by the sweep's points"),
      (["--config=configs/cifar10.py"], "the sweep file sets CONFIG"),
      (["--config.num_epochs", "3"], "with '='"),
  ):
    with pytest.raises(sweep_lib.UsageError, match=message):
      sweep.check_extra_flags(extra, loaded)
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  manifest = sweep.make_manifest(loaded, [0, 1], ["--config.num_epochs=3"], workdir)
  sweep_lib.write_json(os.path.join(workdir, "sweep.json"), manifest)
  resumed = sweep.make_manifest(loaded, [0, 1, 2], ["--config.num_epochs=3"], workdir)
  assert resumed["seeds"] == [0, 1, 2] and len(resumed["launches"]) == 2  # Seeds added.
  with pytest.raises(sweep_lib.UsageError, match=r"--seeds drops seeds \[1\]"):
    sweep.make_manifest(loaded, [0], ["--config.num_epochs=3"], workdir)
  with pytest.raises(
      sweep_lib.UsageError,
      match="flags after -- '--config.num_epochs=3' -> '--config.num_epochs=4'",
  ):
    sweep.make_manifest(loaded, [0, 1], ["--config.num_epochs=4"], workdir)


def test_slots():
  cores = sorted(os.sched_getaffinity(0))
  assert sweep.make_slots(None, []) == [sweep.Slot({}, None)]
  assert [s.env for s in sweep.make_slots(None, ["0", "1+2"])] == [
      {"CUDA_VISIBLE_DEVICES": "0"},
      {"CUDA_VISIBLE_DEVICES": "1,2"},
  ]
  if len(cores) >= 2:
    halves = sweep.make_slots(2, [])
    assert sorted(c for s in halves for c in s.cpus) == cores
  with pytest.raises(sweep_lib.UsageError, match="more than the 2 --devices"):
    sweep.make_slots(3, ["0", "1"])
  with pytest.raises(sweep_lib.UsageError, match="CPU cores"):
    sweep.make_slots(len(cores) + 1, [])
  with pytest.raises(sweep_lib.UsageError, match="GPU ids"):
    sweep.make_slots(None, ["gpu0"])
