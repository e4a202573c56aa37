"""Never lose a run: exact resume after SIGKILL, SIGTERM preemption, corrupt
checkpoints, non-finite losses."""

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from mnv2_flax import checkpoint, data, errors, train

from conftest import (
    CACHE_DIR,
    REPO,
    SHALLOW,
    SHALLOW_FLAG,
    SMOKE_CONFIG,
    checkpoint_steps,
    started,
    tiny_config,
)

# One worker: the in-process runs share the compiled steps of this config.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fault_tolerance")]


# Every run here is configs/smoke.py as it is: 8 steps, a checkpoint every 4
# (the compiled steps most tests share).
STEPS = 8
RUN_FLAGS = [
    f"--config={SMOKE_CONFIG}",
    SHALLOW_FLAG,
    f"--config.compilation_cache_dir={CACHE_DIR}",
]


class Main:
  """`python -m mnv2_flax.main RUN_FLAGS --workdir=WORKDIR`, whose stderr
  (absl's log) is read line by line as it comes."""

  def __init__(self, workdir: pathlib.Path, stack: contextlib.ExitStack):
    self.workdir = workdir
    self.proc = stack.enter_context(
        started(
            [sys.executable, "-m", "mnv2_flax.main", *RUN_FLAGS, f"--workdir={workdir}"],
            str(workdir),
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
    self.log: list[str] = []

  def wait_for_line(self, text: str) -> None:
    """Reads the log until a line contains TEXT: a state the trainer reports."""
    for line in self.proc.stderr:
      self.log.append(line)
      if text in line:
        return
    raise AssertionError(f"the trainer ended without logging {text!r}:\n{''.join(self.log[-30:])}")

  def wait_for_checkpoint(self, step: int) -> None:
    """Polls for checkpoint STEP's directory (orbax renames it into place
    once complete); stderr is drained meanwhile, so the trainer never blocks
    on a full pipe."""
    drain = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
    drain.start()
    while not (self.workdir / "checkpoints" / str(step)).is_dir():
      assert self.proc.poll() is None, "".join(self.log[-30:])
      time.sleep(0.02)

  def finish(self) -> tuple[int, str, str]:
    stdout, stderr = self.proc.communicate()
    return self.proc.returncode, stdout, "".join(self.log) + (stderr or "")


def final_variables(workdir):
  state, step = checkpoint.read_checkpoint(str(workdir / "checkpoints"))
  return state["params"], state["batch_stats"], step


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """An uninterrupted run, in this process: checkpoints at steps 4 and 8."""
  workdir = tmp_path_factory.mktemp("finished")
  train.train_and_evaluate(tiny_config(**SHALLOW), str(workdir))
  return workdir


def test_preemption_and_sigkill_then_rerun_end_bitwise_identical(finished, tmp_path):
  """SIGTERM checkpoints at a step boundary and exits 0; a rerun resumes;
  SIGKILL, possibly mid-step or mid-save, loses only the steps since the last
  checkpoint; resuming after it (here in this process) ends bitwise where an
  uninterrupted run does."""
  interrupted = tmp_path / "interrupted"
  with contextlib.ExitStack() as stack:
    run = Main(interrupted, stack)
    run.wait_for_line("Training ")  # Logged once the signal handler is in place.
    run.proc.send_signal(signal.SIGTERM)
    code, stdout, log = run.finish()
    assert code == 0, log[-2000:]
    preempted = json.loads(stdout.strip().splitlines()[-1])["preempted_at_step"]
    assert 1 <= preempted < STEPS
    assert checkpoint_steps(interrupted / "checkpoints")[-1] == preempted

    run = Main(interrupted, stack)
    run.wait_for_line(f"Resumed from {interrupted / 'checkpoints'} at step {preempted}.")
    # The first checkpoint of this run, then SIGKILL: no handler runs.
    run.wait_for_checkpoint(preempted // 4 * 4 + 4)
    run.proc.kill()
    run.proc.wait()
  assert train.train_and_evaluate(tiny_config(**SHALLOW), str(interrupted))["step"] == STEPS
  a, b = final_variables(finished), final_variables(interrupted)
  assert a[2] == b[2] == STEPS
  jax.tree.map(np.testing.assert_array_equal, a[:2], b[:2])


def test_rerunning_a_finished_run_only_evaluates_it(finished, tmp_path):
  """The final and best checkpoints of its last step exist: nothing is
  trained, nothing re-saved; the metrics are those of the run."""
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  # The step directories' files (settings.json is rewritten at every start).
  saved = {p: p.stat().st_mtime_ns for d in workdir.glob("checkpoints*/*/") for p in d.rglob("*")}
  results = train.train_and_evaluate(tiny_config(**SHALLOW), str(workdir))
  with open(finished / "results.json") as f:
    first = json.load(f)
  assert {k: results[k] for k in ("step", "top1", "loss")} == {
      k: first[k] for k in ("step", "top1", "loss")
  }
  assert checkpoint_steps(workdir / "checkpoints") == [4, 8]
  assert {p: p.stat().st_mtime_ns for p in saved} == saved


def truncate_largest_file(step_dir: pathlib.Path) -> None:
  largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def remove_metadata(step_dir: pathlib.Path) -> None:
  for path in step_dir.rglob("*METADATA*"):
    path.unlink()


@pytest.mark.parametrize("damage", [truncate_largest_file, remove_metadata])
def test_corrupt_latest_checkpoint_falls_back_to_previous(finished, tmp_path, damage):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  damage(workdir / "checkpoints" / str(STEPS))
  results = train.train_and_evaluate(tiny_config(**SHALLOW), str(workdir))
  assert results["step"] == STEPS
  assert (workdir / "checkpoints_corrupt" / str(STEPS)).is_dir()  # Kept for inspection.
  assert checkpoint_steps(workdir / "checkpoints") == [4, 8]
  # The re-trained last step equals the original one: resume was from step 4.
  original = checkpoint.read_checkpoint(str(finished / "checkpoints"), STEPS)[0]
  again = checkpoint.read_checkpoint(str(workdir / "checkpoints"), STEPS)[0]
  jax.tree.map(np.testing.assert_array_equal, original["params"], again["params"])


def poison_step(monkeypatch, poisoned_step: int) -> None:
  """Makes the batch of `poisoned_step` (1-based) NaN."""
  original = data.ArrayDataset.train_batches

  def train_batches(self, start_step=0):
    for step, batch in enumerate(original(self, start_step), start_step + 1):
      if step == poisoned_step:
        batch = {**batch, "image": batch["image"] * np.nan}
      yield batch

  monkeypatch.setattr(data.ArrayDataset, "train_batches", train_batches)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  poison_step(monkeypatch, 6)
  with pytest.raises(
      errors.NonFiniteError,
      match=r"at step 6; stopped at step 8\. Last good checkpoint: .*/checkpoints/4",
  ):
    train.train_and_evaluate(tiny_config(**SHALLOW), str(tmp_path))
  assert checkpoint_steps(tmp_path / "checkpoints") == [4]
