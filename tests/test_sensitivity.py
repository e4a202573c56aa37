"""The sensitivity probe: what zero-initialised residual scales do at initialisation."""

import json
import subprocess
import sys

import pytest

from mnv2_flax import sensitivity

from conftest import REPO, SMOKE_CONFIG, tiny_config

# One worker: the command line reuses the fixture's compiled functions.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sensitivity")]


@pytest.fixture(scope="module")
def measured():
  """The paper's initialisation and the default (zero-initialised residual
  scales), measured in this process: one compilation of the gradient for
  both, since the initialisation changes the weights, not the gradient's
  program (each initialisation is a program of its own)."""
  return {
      zero: sensitivity.measure(tiny_config(**{"model.zero_init_residual": zero}), top=100)
      for zero in (False, True)
  }


def test_zero_initialised_residual_scales_damp_the_gradient_response(measured):
  paper, zero = measured[False], measured[True]
  # Rounding-sized parameter changes move the paper init's gradient far more
  # than the default's (280x measured on this config, 2026-12-03; 2.5-20x on
  # the digits default, docs/ablations.md); its gradient is larger too (5x).
  assert zero["gradient_change"] * 3 < paper["gradient_change"]
  assert zero["gradient_norm"] * 2 < paper["gradient_norm"]
  for result in measured.values():
    assert set(result) == {"gradient_change", "gradient_norm", "logits_change", "most_moved"}
    assert 0 < result["gradient_change"] < 1
    assert 0 < result["logits_change"] < 1e-3
    # Which layers lead is rounding's choice; that they are distinct
    # parameters, ranked, without the project_bn biases, is not.
    names, changes = zip(*result["most_moved"])
    assert len(set(names)) == 100
    assert all(name.rsplit("/", 1)[-1] in ("kernel", "scale", "bias") for name in names)
    assert not any(name.endswith("project_bn/bias") for name in names)
    assert list(changes) == sorted(changes, reverse=True) and changes[-1] >= 0


def test_command_line_prints_the_measurement_as_json(measured):
  # The default config, as measured above: its compiled functions come from
  # the compilation cache, and its numbers are the same.
  command = [sys.executable, "-m", "mnv2_flax.sensitivity", f"--config={SMOKE_CONFIG}"]
  proc = subprocess.run([*command, "--top=100"], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  printed = json.loads(proc.stdout)
  assert printed == json.loads(json.dumps(measured[True]))


def test_command_line_names_bad_keys():
  args = [sys.executable, "-m", "mnv2_flax.sensitivity", f"--config={SMOKE_CONFIG}"]
  proc = subprocess.run(
      [*args, "--config.model.bn_momentum=1.5"], cwd=REPO, capture_output=True, text=True
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config.model.bn_momentum:")
