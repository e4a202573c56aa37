"""Never lose a run: exact resume after SIGKILL, SIGTERM preemption, corrupt
checkpoints, non-finite losses."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mnv2_flax import checkpoint, data, errors, train

from conftest import REPO, SMOKE_CONFIG, checkpoint_steps, tiny_config

pytestmark = pytest.mark.slow


def start_main(args) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.Popen(
      [sys.executable, "-m", "mnv2_flax.main", f"--config={SMOKE_CONFIG}", *args],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


def wait_for_checkpoint(workdir: pathlib.Path, step: int, proc, timeout=240) -> None:
  deadline = time.time() + timeout
  while not (workdir / "checkpoints" / str(step)).is_dir():
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    assert time.time() < deadline, "no checkpoint in time"
    time.sleep(0.05)


def final_params(workdir):
  state, step = checkpoint.read_checkpoint(str(workdir / "checkpoints"))
  return state["params"], state["batch_stats"], step


def test_sigkill_then_rerun_is_bitwise_identical(tmp_path):
  args = [
      "--config.num_train_steps=24",
      "--config.checkpoint_every_steps=4",
      f"--config.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}",
  ]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  proc = start_main([*args, f"--workdir={straight}"])
  assert proc.wait(timeout=300) == 0, proc.communicate()[1][-2000:]

  kill_after = int(np.random.default_rng().choice([4, 8, 12, 16]))
  proc = start_main([*args, f"--workdir={killed}"])
  wait_for_checkpoint(killed, kill_after, proc)
  proc.kill()  # SIGKILL: no handler runs, possibly mid-step or mid-save.
  proc.wait()
  proc = start_main([*args, f"--workdir={killed}"])
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-2000:]
  assert "Resumed from" in stderr

  a, b = final_params(straight), final_params(killed)
  assert a[2] == b[2] == 24
  jax.tree.map(np.testing.assert_array_equal, a[:2], b[:2])


def test_sigterm_saves_at_step_boundary_and_resume_continues(tmp_path):
  args = [
      f"--workdir={tmp_path}",
      "--config.num_train_steps=400",
      "--config.checkpoint_every_steps=4",
      f"--config.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}",
  ]
  proc = start_main(args)
  wait_for_checkpoint(tmp_path, 4, proc)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-2000:]
  preempted = int(stdout.strip().splitlines()[-1].split(":")[1].strip(" }"))
  assert 4 <= preempted < 400
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3, read_only=True)
  assert ckpt.latest_step() == preempted

  # Four more steps (a different schedule length, which resume allows).
  proc = start_main([*args[:1], f"--config.num_train_steps={preempted + 4}", *args[2:]])
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-2000:]
  assert f"at step {preempted}." in stderr  # "Resumed from ... at step N."


@pytest.fixture(scope="module")
def eight_steps(tmp_path_factory):
  """A run with good checkpoints at steps 4 and 8."""
  workdir = tmp_path_factory.mktemp("eight")
  train.train_and_evaluate(tiny_config(), str(workdir))
  return workdir


def truncate_largest_file(step_dir: pathlib.Path) -> None:
  largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


def remove_metadata(step_dir: pathlib.Path) -> None:
  for path in step_dir.rglob("*METADATA*"):
    path.unlink()


@pytest.mark.parametrize("damage", [truncate_largest_file, remove_metadata])
def test_corrupt_latest_checkpoint_falls_back_to_previous(eight_steps, tmp_path, damage):
  workdir = tmp_path / "run"
  shutil.copytree(eight_steps, workdir)
  damage(workdir / "checkpoints" / "8")
  results = train.train_and_evaluate(tiny_config(num_train_steps=12), str(workdir))
  assert results["step"] == 12
  assert (workdir / "checkpoints_corrupt" / "8").is_dir()  # Kept for inspection.
  assert checkpoint_steps(workdir / "checkpoints") == [4, 8, 12]
  # The re-trained step 8 equals the original one: resume was from step 4.
  original = checkpoint.read_checkpoint(str(eight_steps / "checkpoints"), 8)[0]
  again = checkpoint.read_checkpoint(str(workdir / "checkpoints"), 8)[0]
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
  config = tiny_config(num_train_steps=12)
  with pytest.raises(
      errors.NonFiniteError,
      match=r"at step 6; stopped at step 8\. Last good checkpoint: .*/checkpoints/4",
  ):
    train.train_and_evaluate(config, str(tmp_path))
  assert checkpoint_steps(tmp_path / "checkpoints") == [4]


def test_skip_nonfinite_updates_keeps_training(tmp_path, monkeypatch):
  poison_step(monkeypatch, 6)
  config = tiny_config(num_train_steps=12, skip_nonfinite_updates=True)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results["step"] == 12 and np.isfinite(results["loss"])
  params, _, _ = final_params(tmp_path)
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))
