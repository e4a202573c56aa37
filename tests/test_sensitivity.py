"""The sensitivity probe: what zero-initialised residual scales do at initialisation."""

import json
import subprocess
import sys

import pytest

from mnv2_flax import sensitivity

from conftest import REPO, SMOKE_CONFIG, tiny_config

pytestmark = pytest.mark.slow  # Two models' gradients, compiled.


@pytest.fixture(scope="module")
def measured():
  """The paper's initialisation measured in this process, the default's
  through the command line (its end-to-end run)."""
  command = [sys.executable, "-m", "mnv2_flax.sensitivity", f"--config={SMOKE_CONFIG}"]
  proc = subprocess.run([*command, "--top=100"], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return {
      False: sensitivity.measure(tiny_config(**{"model.zero_init_residual": False}), top=100),
      True: json.loads(proc.stdout),
  }


def test_zero_initialised_residual_scales_damp_the_gradient_response(measured):
  paper, zero = measured[False], measured[True]
  # Rounding-sized parameter changes move the paper init's gradient several
  # times more than the default's; its gradient is larger too.
  assert zero["gradient_change"] * 3 < paper["gradient_change"]
  assert zero["gradient_norm"] * 2 < paper["gradient_norm"]
  for result in measured.values():
    assert set(result) == {"gradient_change", "gradient_norm", "logits_change", "most_moved"}
    assert 0 < result["gradient_change"] < 1
    assert 0 < result["logits_change"] < 1e-3
    names = [name for name, _ in result["most_moved"]]
    assert len(names) == 100 and "stem/kernel" in names
    assert not any(name.endswith("project_bn/bias") for name in names)


def test_command_line_names_bad_keys():
  args = [sys.executable, "-m", "mnv2_flax.sensitivity", f"--config={SMOKE_CONFIG}"]
  proc = subprocess.run(
      [*args, "--config.model.bn_momentum=1.5"], cwd=REPO, capture_output=True, text=True
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config.model.bn_momentum:")
