"""End-to-end training on digits: learning, checkpoints, eval, imports.

The device-layout equivalences (1 vs 4 devices, restoring onto another
device count) are in test_device_layouts.py and test_multiprocess.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mnv2_flax import checkpoint, train

import digits_model
from conftest import REPO, SMOKE_CONFIG, checkpoint_steps, run_main, tiny_config

# One worker with test_export.py and test_predict.py: the digits model is
# trained once for all three.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("export")]


def read_variables(workdir, step=None):
  """params and batch_stats saved in WORKDIR/checkpoints (newest step by default)."""
  state, step = checkpoint.read_checkpoint(os.path.join(workdir, "checkpoints"), step)
  return {"params": state["params"], "batch_stats": state["batch_stats"]}, step


@pytest.fixture(scope="module")
def trained():
  """(config, workdir, results) of the digits model the export and predict
  tests use too (tests/digits_model.py: configs/smoke.py for 300 steps, one
  checkpoint at the end). Its workdir is a cache: only read here."""
  checkpoints, results = digits_model.trained_digits()
  return digits_model.training_config(), os.path.dirname(checkpoints), results


def test_training_learns_digits(trained):
  _, workdir, results = trained
  assert results["top1"] > 0.6  # Chance is 0.1.
  assert results["top5"] >= results["top1"]
  assert results["num_examples"] == 360  # Every test example, none dropped.
  assert results["step"] == digits_model.STEPS
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert set(saved) >= {"top1", "top5", "loss", "num_examples", "step", "wall_clock_s"}
  assert saved["top1"] == results["top1"]
  assert checkpoint_steps(os.path.join(workdir, "checkpoints")) == [digits_model.STEPS]
  settings = checkpoint.read_settings(os.path.join(workdir, "checkpoints"))
  assert settings["class_names"] == [str(i) for i in range(10)]
  assert settings["config"]["model.width_multiplier"] == 0.35
  assert settings["config"]["dataset.image_size"] == 16


def test_restore_and_evaluate_gives_identical_metrics(trained, tmp_path):
  _, workdir, results = trained
  config = digits_model.training_config()
  config.checkpoint_path = os.path.join(workdir, "checkpoints")
  evaluated = train.evaluate(config, str(tmp_path))
  for key in ("top1", "top5", "loss", "num_examples"):
    assert evaluated[key] == results[key], key
  assert evaluated["step"] == digits_model.STEPS


def test_eval_mode_subprocess_on_four_devices(trained, tmp_path):
  _, workdir, results = trained
  proc = run_main(
      [
          f"--config={SMOKE_CONFIG}",
          f"--workdir={tmp_path}",
          "--mode=eval",
          f"--config.checkpoint_path={workdir}/checkpoints",
      ],
      devices=4,
  )
  evaluated = json.loads(proc.stdout.strip().splitlines()[-1])
  assert evaluated["num_examples"] == 360  # Every example once: none lost, none twice.
  # float32 sums in another order: the loss moves by rounding, and an image
  # whose top two logits tie to rounding may flip (at most one, allowed).
  assert abs(evaluated["top1"] - results["top1"]) <= 1 / 360 + 1e-9
  assert evaluated["loss"] == pytest.approx(results["loss"], rel=1e-5)
  assert json.loads((tmp_path / "results.json").read_text())["step"] == digits_model.STEPS


def test_saving_the_same_best_step_again_is_a_no_op(tmp_path):
  # What re-running a finished run does when its last step was also its best.
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=2, best_metric="top1")
  state = {"w": np.arange(3.0, dtype=np.float32)}
  for _ in range(2):
    ckpt.save(8, state)
    ckpt.save_best(8, state, {"top1": 0.5})
  ckpt.wait()
  assert ckpt.all_steps() == [8]
  assert os.listdir(tmp_path / "checkpoints_best") == ["8"]
  ckpt.close()


def test_eval_takes_the_model_from_the_checkpoint_settings(trained, tmp_path):
  config, workdir, results = trained
  # A config for another width and resolution: settings.json says what the weights need.
  other = tiny_config(
      **{
          "model.width_multiplier": 0.5,
          "dataset.image_size": 24,
          "checkpoint_path": f"{workdir}/checkpoints",
      }
  )
  evaluated = train.evaluate(other, str(tmp_path))
  assert evaluated["top1"] == results["top1"]


def test_checkpoint_from_another_model_names_the_shapes(trained, tmp_path):
  _, workdir, _ = trained
  # Without its settings file (as checkpoints written before 2026-12-01).
  bare = tmp_path / "bare"
  os.makedirs(bare)
  step = str(digits_model.STEPS)
  os.symlink(os.path.join(workdir, "checkpoints", step), bare / step)
  config = tiny_config(**{"model.width_multiplier": 0.5, "checkpoint_path": str(bare)})
  with pytest.raises(
      checkpoint.CheckpointError,
      match=r"does not fit the configured model .*params/block1/project/"
      r"kernel: checkpoint \(1, 1, 48, 8\) vs model \(1, 1, 48, 16\)",
  ):
    train.evaluate(config, str(tmp_path))


def test_finetuning_restores_every_matching_weight(trained, tmp_path):
  _, workdir, _ = trained
  # 3-channel images and 5 classes: the stem and classifier cannot be reused.
  config = tiny_config(
      **{
          "checkpoint_path": f"{workdir}/checkpoints",
          "dataset.name": "synthetic",
          "dataset.num_classes": 5,
      }
  )
  s = train.setup(config)
  state = train.restore_or_init(
      s, checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=1), config
  )
  saved, _ = checkpoint.read_checkpoint(f"{workdir}/checkpoints")
  assert int(state.step) == 0
  np.testing.assert_array_equal(
      state.params["block3"]["depthwise"]["kernel"],
      saved["params"]["block3"]["depthwise"]["kernel"],
  )
  np.testing.assert_array_equal(
      state.batch_stats["head_bn"]["mean"], saved["batch_stats"]["head_bn"]["mean"]
  )
  assert state.params["classifier"]["kernel"].shape[-1] == 5
  assert state.params["stem"]["kernel"].shape[2] == 3


def test_model_and_train_import_without_tensorflow():
  code = (
      "import sys, mnv2_flax.models, mnv2_flax.train, mnv2_flax.layers, "
      "mnv2_flax.checkpoint, mnv2_flax.data\n"
      "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
      "('tensorflow', 'tensorflow_datasets', 'keras'))\n"
      "assert not bad, bad"
  )
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
