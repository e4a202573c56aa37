"""Multi-process training: 2 processes x 2 CPU devices against 1 process x 4,
in float64.

Both runs build the same 4-device mesh and see the same global batches, so
they must train the same model: only the order of float sums differs, which
float64 keeps far below the tolerance (see test_device_layouts.py for the
measured spread and the ratio). The negative control: the same 1 x 4 run
with one device's shard arriving as zeros (config.testing.fault) must be
told apart from the 2 x 2 run by the same comparison.
"""

import contextlib
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, SMOKE_CONFIG, checkpoint_steps, run_main, started, worst_ratio

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]

TIMEOUT_S = 400
# configs/smoke.py (8 steps) in float64, so that the 1 x 4 runs share their
# compiled steps with test_device_layouts.py's; step 4 is compared, its
# update being the change from step 2 (rounding differences grow with every
# step, ~4x each here: compared at step 8 they reach 1e-6 of an update).
TRAIN_FLAGS = [
    f"--config={SMOKE_CONFIG}",
    "--config.model.dtype=float64",
    "--config.checkpoint_every_steps=2",
    "--config.keep_checkpoints=4",
]
COMPARED, BEFORE = 4, 2
TOLERANCE = 1e-9  # As test_device_layouts.py's float64 comparison.


def launch_two_processes(workdir: str) -> list[str]:
  """`launch.local` with 2 processes x 2 CPU devices."""
  return [
      sys.executable,
      "-m",
      "launch.local",
      "--num_processes=2",
      "--devices_per_process=2",
      "--",
      *TRAIN_FLAGS,
      f"--workdir={workdir}",
  ]


def restore(workdir: str, step: int) -> dict[str, np.ndarray]:
  """params and batch_stats of WORKDIR's checkpoint of `step`, as
  {"params/stem/kernel": array}."""
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  state = checkpointer.restore(path, target)
  tree = {"params": state["params"], "batch_stats": state["batch_stats"]}
  return {
      "/".join(str(k.key) for k in path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def read_results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs of the 2-process run, the 1-process run and its faulty twin;
  the single-process runs train while the 2 processes do."""
  multi = str(tmp_path_factory.mktemp("two_processes"))
  single = str(tmp_path_factory.mktemp("one_process"))
  faulty = str(tmp_path_factory.mktemp("one_process_drop_shard"))
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  log_path = os.path.join(multi, "launch.log")
  start = time.time()
  with (
      open(log_path, "w") as log,
      started(
          launch_two_processes(multi), multi, cwd=REPO, env=env, stdout=log, stderr=log
      ) as proc,
  ):
    run_main([*TRAIN_FLAGS, f"--workdir={single}"], devices=4, timeout=TIMEOUT_S)
    run_main(
        [*TRAIN_FLAGS, "--config.testing.fault=drop_shard", f"--workdir={faulty}"],
        devices=4,
        timeout=TIMEOUT_S,
    )
    with contextlib.suppress(subprocess.TimeoutExpired):  # Then killed: its log tells.
      proc.wait(timeout=max(TIMEOUT_S - (time.time() - start), 1))
  with open(log_path) as f:
    output = f.read()
  assert proc.returncode == 0, f"launch.local exited {proc.returncode}:\n{output[-5000:]}"
  return multi, single, faulty


def test_two_processes_train_like_one(runs):
  multi, single, faulty = runs
  reference, before = restore(single, COMPARED), restore(single, BEFORE)
  update = {name: float(np.max(np.abs(reference[name] - before[name]))) for name in reference}
  ratio, array = worst_ratio(restore(multi, COMPARED), reference, update)
  print(f"2 x 2 against 1 x 4: {ratio:.3g} ({array})")
  assert ratio < TOLERANCE, f"{array} is {ratio:.3g} of its update away"
  # The negative control: a lost shard is seen.
  ratio, array = worst_ratio(restore(faulty, COMPARED), reference, update)
  print(f"1 x 4 with a dropped shard: {ratio:.3g} ({array})")
  assert ratio > TOLERANCE, f"a dropped shard went unnoticed (worst: {array}, {ratio:.3g})"


def test_every_checkpoint_written(runs):
  multi, _, _ = runs
  assert checkpoint_steps(os.path.join(multi, "checkpoints")) == [2, 4, 6, 8]
  assert read_results(multi)["step"] == 8


def test_eval_sees_every_example_once(runs, tmp_path):
  """Evaluating the 2-process run's checkpoint in one process gives the same
  metrics: the two processes' padded eval shards cover the test set exactly."""
  multi, _, _ = runs
  results = read_results(multi)
  assert results["num_examples"] == 360
  run_main(
      [
          f"--config={SMOKE_CONFIG}",
          f"--workdir={os.path.join(multi, 'eval')}",
          "--mode=eval",
          f"--config.checkpoint_path={multi}/checkpoints",
          "--config.model.dtype=float64",
      ],
      devices=4,
  )
  evaluated = read_results(os.path.join(multi, "eval"))
  assert evaluated["step"] == 8 and evaluated["num_examples"] == 360
  assert evaluated["top1"] == results["top1"]
  np.testing.assert_allclose(evaluated["loss"], results["loss"], rtol=1e-9)
