"""Training on an image folder end to end: exact resume after SIGKILL with
another worker count, broken files counted in the train metrics, a train-only
and an eval-only folder, and the data path and `predict` without TensorFlow.

The killed run is stopped at a known step, not after some time: one image of
the folder is a FIFO, so the run blocks when it reads it, after saving the
checkpoint of the step before. It is then replaced by the image the reference
run read, and the run resumed.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mnv2_flax import checkpoint, datasets, train

from conftest import CACHE_DIR, REPO, SHALLOW, SHALLOW_FLAG, SMOKE_CONFIG, tiny_config, xla_flags
from image_files import encode, run_without_tensorflow, shared_memory_names, tensorflow_blocker

# One worker: the tests share the runs of the module fixture.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("image_training"),
    pytest.mark.timeout(600),  # The module's runs, on busy cores.
]

TIMEOUT_S = 300
IMAGE = 12  # Pixels: tiny images decode in microseconds.
BROKEN = {"empty.jpg": b"", "text.jpg": b"<html>404</html>\n"}
LATE_CLASS = "z"  # One image, the FIFO of the killed run.


def folder_config(root, **overrides):
  return tiny_config(
      **{
          "dataset.name": "imagefolder",
          "dataset.root": str(root),
          "dataset.image_size": 16,
          "dataset.workers": 0,
          "global_batch_size": 4,
          "eval_batch_size": 4,
          **SHALLOW,
          **overrides,
      }
  )


def late_step(root, seed: int, steps: int) -> tuple[int | None, int]:
  """(first step whose batch holds the LATE_CLASS image, unreadable images in
  the first `steps` steps), as the run will see them."""
  dataset = datasets.create_dataset(
      folder_config(root, seed=seed), process_index=0, process_count=1
  )
  late = dataset.info.class_names.index(LATE_CLASS)
  batches = list(itertools.islice(dataset.train_batches(), steps))
  first = next((k for k, b in enumerate(batches) if late in b["label"]), None)
  return first, int(sum(b["unreadable"].sum() for b in batches))


@pytest.fixture(scope="module")
def train_only(tmp_path_factory):
  """train/ only: classes a and b (4 PNG and JPEG images each, and the broken
  files in b) and z (one PNG); the seed, the killed run's last step and the
  step count such that the z image is first read at step >= 2."""
  root = tmp_path_factory.mktemp("train_only")
  rng = np.random.default_rng(0)
  for name, count in (("a", 4), ("b", 4), (LATE_CLASS, 1)):
    os.makedirs(root / "train" / name)
    for i in range(count):
      fmt, ext = (("PNG", "png"), ("JPEG", "jpg"))[i % 2]
      pixels = rng.integers(0, 256, (IMAGE, IMAGE + i, 3), dtype=np.uint8)
      (root / "train" / name / f"{i}.{ext}").write_bytes(encode(pixels, fmt))
  for name, content in BROKEN.items():
    (root / "train" / "b" / name).write_bytes(content)
  for seed in range(20):
    step, _ = late_step(root, seed, 6)
    if step is not None and step >= 2:
      break
  steps = step + 2
  return root, seed, step, steps, late_step(root, seed, steps)[1]


def start_main(args, *, without_tensorflow_in=None) -> subprocess.Popen:
  """`python -m mnv2_flax.main` on the smoke config with ARGS; where
  `import tensorflow` fails, with a directory for the blocker."""
  path = [str(REPO)]
  if without_tensorflow_in is not None:
    path.insert(0, tensorflow_blocker(without_tensorflow_in))
  env = dict(
      os.environ,
      PYTHONPATH=os.pathsep.join(path),
      XLA_FLAGS=xla_flags(1),
  )
  return subprocess.Popen(
      [sys.executable, "-m", "mnv2_flax.main", f"--config={SMOKE_CONFIG}", *args],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


def finish(proc: subprocess.Popen) -> str:
  _, stderr = proc.communicate(timeout=TIMEOUT_S)
  assert proc.returncode == 0, stderr[-3000:]
  return stderr


@pytest.fixture(scope="module")
def runs(train_only, tmp_path_factory):
  """The reference run (in-process decoding) and a run SIGKILLed at a known
  step with 2 workers, then resumed with 1 without TensorFlow: their workdirs
  and logs."""
  root, seed, late, steps, _ = train_only
  base = tmp_path_factory.mktemp("runs")
  args = [
      "--config.dataset.name=imagefolder",
      f"--config.dataset.root={root}",
      "--config.dataset.image_size=16",
      "--config.global_batch_size=4",
      "--config.eval_batch_size=4",
      f"--config.seed={seed}",
      f"--config.num_train_steps={steps}",
      f"--config.checkpoint_every_steps={late}",
      "--config.log_every_steps=1",
      SHALLOW_FLAG,
      f"--config.compilation_cache_dir={CACHE_DIR}",
  ]
  reference = start_main([*args, "--config.dataset.workers=0", f"--workdir={base / 'reference'}"])
  reference_log = finish(reference)

  (late_image,) = (root / "train" / LATE_CLASS).iterdir()
  kept = base / late_image.name
  shutil.move(late_image, kept)
  os.mkfifo(late_image)
  killed = base / "killed"
  proc = start_main([*args, "--config.dataset.workers=2", f"--workdir={killed}"])
  try:
    deadline = time.time() + TIMEOUT_S
    # Saved after the step before the one that reads the FIFO; the run then
    # waits for the FIFO.
    while not (killed / "checkpoints" / str(late)).is_dir():
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      assert time.time() < deadline, "no checkpoint in time"
      time.sleep(0.05)
    assert proc.poll() is None
    assert shared_memory_names(proc.pid)  # The workers' training-image blocks.
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    os.remove(late_image)
    shutil.move(kept, late_image)
  # Python's resource tracker unlinks them once the workers have followed.
  deadline = time.time() + 30
  while shared_memory_names(proc.pid):
    assert time.time() < deadline, shared_memory_names(proc.pid)
    time.sleep(0.1)
  # Resumed where TensorFlow cannot be imported: the folder's data path (a
  # worker process), the loop, its TensorBoard events and checkpoints.
  resumed = start_main(
      [*args, "--config.dataset.workers=1", f"--workdir={killed}"], without_tensorflow_in=base
  )
  resumed_log = finish(resumed)
  assert not shared_memory_names(resumed.pid)
  return base / "reference", reference_log, killed, resumed_log


def final_state(workdir: pathlib.Path):
  state, step = checkpoint.read_checkpoint(str(workdir / "checkpoints"))
  return {"params": state["params"], "batch_stats": state["batch_stats"]}, step


def test_sigkill_and_resume_with_other_workers_is_bitwise_identical(train_only, runs):
  _, _, late, steps, _ = train_only
  reference, _, killed, resumed_log = runs
  assert f"at step {late}." in resumed_log  # "Resumed from ... at step N."
  want, want_step = final_state(reference)
  got, got_step = final_state(killed)
  assert want_step == got_step == steps
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_unreadable_files_are_counted_and_named_once(train_only, runs):
  root, _, _, steps, unreadable = train_only
  _, reference_log, _, _ = runs
  logged = [int(n) for n in re.findall(r"unreadable_images=(\d+)", reference_log)]
  assert len(logged) == steps and sum(logged) == unreadable > 0
  for name in BROKEN:
    assert reference_log.count(os.path.join(root, "train", "b", name)) == 1
  # The run trains on train/ alone: no evaluation.
  assert "no evaluation split" in reference_log
  assert "eval_top1" not in reference_log


def test_eval_only_folder(runs, tmp_path):
  """val/ alone, without class b, with a broken file: labelled by the
  checkpoint's class names, the broken file named and counted."""
  reference = runs[0]
  rng = np.random.default_rng(1)
  for name in ("a", LATE_CLASS):
    os.makedirs(tmp_path / "data" / "val" / name / "nested")
    for i in range(2):
      pixels = rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)
      (tmp_path / "data" / "val" / name / "nested" / f"{i}.tif").write_bytes(encode(pixels, "TIFF"))
  (tmp_path / "data" / "val" / "a" / "empty.png").write_bytes(b"")
  config = folder_config(
      tmp_path / "data", checkpoint_path=str(reference / "checkpoints"), eval_batch_size=2
  )
  results = train.evaluate(config, str(tmp_path / "eval"))
  assert (results["num_examples"], results["unreadable_images"]) == (4, 1)
  with open(tmp_path / "eval" / "results.json") as f:
    assert json.load(f)["unreadable_images"] == 1


def test_training_and_predict_without_tensorflow(train_only, runs, tmp_path):
  """Where importing tensorflow fails: training on a folder (the resumed run
  of `runs`: its pipeline with a worker process, the loop, its TensorBoard
  events, the checkpoint), and `predict` on a checkpoint."""
  root = train_only[0]
  killed = runs[2]
  # One events file of the killed run, one of the resumed run.
  assert len(list(killed.glob("events.out.tfevents.*"))) == 2
  image = next((root / "train" / "a").iterdir())
  script = f"""
from mnv2_flax import predict
predictor = predict.Predictor.from_checkpoint({str(killed / "checkpoints")!r})
probabilities, errors = predictor.predict_files([{str(image)!r}])
print(len(probabilities), errors)
"""
  assert run_without_tensorflow(script, tmp_path).splitlines() == ["1 {}"]
