"""1 device against 4, and a checkpoint restored onto another device count,
trained by the trainer's own set-up and step (tests/layout_worker.py).

A layout may change only the order of floating-point sums, so it is judged
by how far each array lands from the 1-device run relative to the size of
the array's own update (conftest.worst_ratio: the largest such ratio over
all params and batch statistics).

* float64 (XLA's convolutions), 4 steps, seeds 0-2: the equivalence claim
  itself (the run is shared with test_multiprocess.py: conftest.float64_layouts).
  Rounding moves results by ~1e-16 relative, which the model's sensitivity
  amplifies to at most 1.0e-11 of an update on 4 devices and 1.7e-13 after a
  restore onto 4 (the 7-block test model at 2 images per device, measured
  2026-12-02 and 2026-12-03 on two AMD EPYC machines with AVX-512, the same
  figures on both); a wrong shard or per-device statistics move them by 2 and
  more. The tolerance, 1e-9, sits orders of magnitude from both.
* float32 with the CPU kernels ("taps"), 2 steps (step 1's learning rate is 0
  in the warmup, so step 2's update is the gradient at the initial weights),
  seeds 0-2: measured at most 4.1e-4 here (2026-12-03, AMD EPYC with AVX-512),
  and 1.4 % on an AVX2-only EPYC for the 17-block model at 8 images per device
  (the same model amplifies float32 rounding ~1e9-fold more); the tolerance,
  0.15, leaves 10x over the latter, and the faults give 2 and more.

Each comparison runs beside its negative controls (config.testing.fault):
BatchNorm statistics per device, and one device's shard arriving as zeros.
Each must fail the comparison that the clean run passes, on every run, so
the test is seen to be able to fail.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, float64_layouts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # Minutes on busy cores.

WORKER = os.path.join(REPO, "tests", "layout_worker.py")
SEEDS = "0,1,2"
CLEAN = ("4 devices", "restored on 4 devices")
FAULTS = ("4 devices, batch_stats_per_device", "4 devices, drop_shard")
F64_TOLERANCE = 1e-9
F32_TOLERANCE = 0.15


def run_worker(tmp_path, dtype: str, steps: int, *flags: str) -> dict:
  out = tmp_path / f"{dtype}.json"
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, WORKER, f"--dtype={dtype}", f"--steps={steps}", f"--seeds={SEEDS}"]
      + [*flags, f"--out={out}"],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=800,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text())


def check(results: dict, tolerance: float, clean_runs: tuple[str, ...]) -> None:
  print(
      "\n".join(
          f"{seed} {run}: {r:.3g} ({a})"
          for seed, runs in results.items()
          for run, (r, a) in runs.items()
      )
  )
  for seed, runs in results.items():
    assert set(runs) == set(clean_runs) | set(FAULTS), runs.keys()
    for run in clean_runs:
      ratio, array = runs[run]
      assert ratio < tolerance, f"{seed} {run}: {array} is {ratio:.3g} of its update away"
    for run in FAULTS:  # The negative controls.
      ratio, array = runs[run]
      assert ratio > tolerance, f"{seed} {run} went unnoticed: worst {ratio:.3g} ({array})"


def test_float64_layouts_train_alike_and_faults_are_caught():
  with open(os.path.join(float64_layouts(), "results.json")) as f:
    check(json.load(f), F64_TOLERANCE, CLEAN)


def test_float32_cpu_kernels_layouts_train_alike_within_rounding(tmp_path):
  check(run_worker(tmp_path, "float32", 2), F32_TOLERANCE, CLEAN[:1])
