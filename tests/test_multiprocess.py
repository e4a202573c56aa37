"""Multi-process training: 2 processes x 2 CPU devices against 1 process x 4,
in float64.

Both runs build the same 4-device mesh and see the same global batches, so
they must train the same model: only the order of float sums differs, which
float64 keeps far below the tolerance (see test_device_layouts.py for the
measured spread and the ratio). The 1 x 4 references are the trainer's own
set-up and step in one process (conftest.float64_layouts, shared with
test_device_layouts.py): the clean run, and its negative control, whose
shard of one device arrives as zeros (config.testing.fault), which the same
comparison must tell apart from the 2 x 2 run.
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

from conftest import (
    FLOAT64_XLA_FLAGS,
    LAYOUT_CONFIG,
    REPO,
    SMOKE_CONFIG,
    checkpoint_steps,
    float64_layouts,
    run_main,
    started,
    worst_ratio,
)

# The module's fixture trains 2 processes beside the float64 layout run:
# minutes when the cores are busy (the default limit is 300 s per test).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess"), pytest.mark.timeout(900)]

TIMEOUT_S = 600
# configs/smoke.py in float64 with LAYOUT_CONFIG, as the references, for 4
# steps: step 4 is compared, its update being the change from step 2
# (rounding differences grow with every step, ~4x each here: compared at step
# 8 they reach 1e-6 of an update).
TRAIN_FLAGS = [
    f"--config={SMOKE_CONFIG}",
    "--config.model.dtype=float64",
    "--config.num_train_steps=4",
    "--config.checkpoint_every_steps=2",
    "--config.keep_checkpoints=2",
    *(f"--config.{key}={value}" for key, value in LAYOUT_CONFIG.items()),
]
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
  {"params/stem/kernel": array}: numpy arrays of the stored dtype (through a
  jax array, float64 would become float32 in this process, which has no
  jax_enable_x64)."""
  path = os.path.join(workdir, "checkpoints", str(step), "default")
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  tree = {"params": state["params"], "batch_stats": state["batch_stats"]}
  return {
      "/".join(str(k.key) for k in path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def read_results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def read_arrays(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as arrays:
    return dict(arrays)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The 2-process run's workdir and the directory of the 1 x 4 references
  (made while the 2 processes train, unless another test made them)."""
  multi = str(tmp_path_factory.mktemp("two_processes"))
  env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
      XLA_FLAGS=FLOAT64_XLA_FLAGS,
  )
  log_path = os.path.join(multi, "launch.log")
  start = time.time()
  with (
      open(log_path, "w") as log,
      started(
          launch_two_processes(multi), multi, cwd=REPO, env=env, stdout=log, stderr=log
      ) as proc,
  ):
    references = float64_layouts()
    with contextlib.suppress(subprocess.TimeoutExpired):  # Then killed: its log tells.
      proc.wait(timeout=max(TIMEOUT_S - (time.time() - start), 1))
  with open(log_path) as f:
    output = f.read()
  assert proc.returncode == 0, f"launch.local exited {proc.returncode}:\n{output[-5000:]}"
  return multi, references


def test_two_processes_train_like_one(runs):
  multi, references = runs
  reference = read_arrays(os.path.join(references, "four_devices_trained.npz"))
  before = read_arrays(os.path.join(references, "four_devices_halfway.npz"))
  update = {name: float(np.max(np.abs(reference[name] - before[name]))) for name in reference}
  two_processes = restore(multi, 4)
  ratio, array = worst_ratio(two_processes, reference, update)
  print(f"2 x 2 against 1 x 4: {ratio:.3g} ({array})")
  assert ratio < TOLERANCE, f"{array} is {ratio:.3g} of its update away"
  # The negative control: a lost shard is seen.
  dropped = read_arrays(os.path.join(references, "four_devices_dropped.npz"))
  ratio, array = worst_ratio(dropped, two_processes, update)
  print(f"1 x 4 with a dropped shard: {ratio:.3g} ({array})")
  assert ratio > TOLERANCE, f"a dropped shard went unnoticed (worst: {array}, {ratio:.3g})"


def test_every_checkpoint_written(runs):
  multi, _ = runs
  assert checkpoint_steps(os.path.join(multi, "checkpoints")) == [2, 4]
  assert read_results(multi)["step"] == 4


def test_eval_sees_every_example_once(runs, tmp_path):
  """Evaluating the 2-process run's checkpoint in one process gives the same
  metrics: the two processes' padded eval shards cover the test set exactly."""
  multi, _ = runs
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
  assert evaluated["step"] == 4 and evaluated["num_examples"] == 360
  assert evaluated["top1"] == results["top1"]
  np.testing.assert_allclose(evaluated["loss"], results["loss"], rtol=1e-9)
