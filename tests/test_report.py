"""launch.report on hand-made sweep workdirs: statistics, CSV, plots, curves."""

import csv
import math
import os
import statistics
import subprocess
import sys

import pytest

from launch import report, sweep_lib

from conftest import REPO

# Student t quantiles t(0.975, dof), from a table: the hand computation.
T_975 = {1: 12.706204736174707, 2: 4.302652729911275}
TOP1 = {  # (point, seed): test top-1; absent: the run did not finish.
    ("t=2,bottleneck=linear", 0): 0.85,
    ("t=2,bottleneck=linear", 1): 0.88,
    ("t=2,bottleneck=linear", 2): 0.86,
    ("t=2,bottleneck=relu6", 0): 0.80,
    ("t=2,bottleneck=relu6", 1): 0.83,
    ("t=6,bottleneck=linear", 0): 0.90,
    ("t=6,bottleneck=linear", 1): 0.92,
    ("t=6,bottleneck=linear", 2): 0.94,
    ("t=6,bottleneck=relu6", 0): 0.89,
    ("t=6,bottleneck=relu6", 2): 0.93,
}


def write_sweep(workdir, points, seeds, top1):
  """A sweep's manifest and the results.json of its finished runs."""
  sweep_lib.write_json(
      os.path.join(workdir, sweep_lib.MANIFEST_FILE),
      {
          "sweep_file": "fixture.py",
          "config": None,
          "base": {},
          "extra_flags": [],
          "seeds": seeds,
          "git_commit": None,
          "points": [{"name": name, "overrides": overrides} for name, overrides in points],
      },
  )
  for (name, seed), value in top1.items():
    directory = sweep_lib.run_dir(workdir, name, seed)
    os.makedirs(directory)
    sweep_lib.write_json(
        os.path.join(directory, sweep_lib.RESULTS_FILE),
        {
            "top1": value,
            "top5": 1.0,
            "loss": 1 - value,
            "num_examples": 360,
            "step": 100,
            "wall_clock_s": 9.5,
            "num_params": 700_000 + 1000 * len(name),
            "macs": 7_500_000,
        },
    )


@pytest.fixture
def expansion_sweep(tmp_path):
  points = [
      (f"t={t},bottleneck={b}", {"model.expansion": t, "model.bottleneck": b})
      for t in (2, 6)
      for b in ("linear", "relu6")
  ]
  write_sweep(str(tmp_path), points, [0, 1, 2], TOP1)
  failed = tmp_path / "t=2,bottleneck=relu6" / "seed=2"
  failed.mkdir()
  sweep_lib.write_json(
      str(failed / sweep_lib.FAILED_FILE),
      {"exit_code": 1, "attempts": 2, "log_tail": ["Traceback ...", "MemoryError"]},
  )
  half_written = tmp_path / "t=6,bottleneck=relu6" / "seed=1"
  half_written.mkdir()
  (half_written / "results.json.tmp").write_text('{"top1": 0.9')
  return tmp_path


def hand_ci(values):
  """Mean and 95 % CI half-width, in percent, from the table's quantile."""
  values = [100 * v for v in values]
  n = len(values)
  return statistics.mean(values), T_975[n - 1] * statistics.stdev(values) / math.sqrt(n)


def test_statistics_match_a_hand_computation(expansion_sweep):
  manifest, runs = report.load_runs(str(expansion_sweep))
  reference = report.default_reference(manifest["points"])
  assert reference == "t=6,bottleneck=linear"  # The paper's block.
  table = report.point_stats(runs, reference).set_index("point")
  for name in table.index:
    seeds = [s for s in range(3) if (name, s) in TOP1]
    row = table.loc[name]
    mean, half = hand_ci([TOP1[name, s] for s in seeds])
    assert row.n == len(seeds) and row.runs == 3
    assert row["mean"] == pytest.approx(mean) and row.ci == pytest.approx(half)
    assert row["min"] == pytest.approx(100 * min(TOP1[name, s] for s in seeds))
    diffs = [TOP1[name, s] - TOP1[reference, s] for s in seeds]
    if name != reference:
      diff, diff_half = hand_ci(diffs)
      assert row["diff"] == pytest.approx(diff) and row.pairs == len(seeds)
      assert row.diff_ci == pytest.approx(diff_half, abs=1e-9)
  # t=2 linear - reference, per seed: -5, -4, -8 points.
  assert table.loc["t=2,bottleneck=linear", "diff"] == pytest.approx(-17 / 3)
  assert table.loc["t=2,bottleneck=linear", "diff_ci"] == pytest.approx(
      4.302652729911275 * math.sqrt(13 / 3) / math.sqrt(3)
  )


def test_report_files(expansion_sweep):
  text = report.write_report(str(expansion_sweep))
  assert (expansion_sweep / "report.md").read_text() == text
  mean, half = hand_ci([0.90, 0.92, 0.94])
  assert (
      f"| t=6,bottleneck=linear | 3/3 | {mean:.2f} ± {half:.2f} | 90.00 | 94.00 | reference |"
  ) in text
  assert (
      "| t=6,bottleneck=relu6 | 2/3 | 91.00 ± 25.41 | 89.00 | 93.00 | -1.00 ± 0.00 (2) |"
  ) in text
  # Unfinished runs are listed, the half-written results.json.tmp among them.
  missing = text.split("## Runs not finished")[1]
  assert "- t=2,bottleneck=relu6 seed 2: failed (exit 1 after 2 attempt(s): MemoryError)" in missing
  assert "- t=6,bottleneck=relu6 seed 1: pending" in missing
  assert missing.count("\n- ") == 2

  with open(expansion_sweep / "results.csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == [
      "point",
      "seed",
      "model.expansion",
      "model.bottleneck",
      "status",
      "top1",
      "top5",
      "loss",
      "step",
      "wall_clock_s",
      "num_params",
      "macs",
  ]
  assert len(rows) == 1 + 12
  assert rows[2] == [
      "t=2,bottleneck=linear",
      "1",
      "2",
      "linear",
      "done",
      "0.88",
      "1.0",
      "0.12",
      "100",
      "9.5",
      "721000",
      "7500000",
  ]
  assert rows[6][:6] == ["t=2,bottleneck=relu6", "2", "2", "relu6", "failed", ""]
  assert rows[6][-2:] == ["720000", "7500000"]  # A point's size, from its other seeds.

  png = (expansion_sweep / "top1_vs_expansion.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 10_000
  assert not (expansion_sweep / "learning_curves.png").exists()  # No event files.


def test_sweep_without_expansion_and_reference_flag(tmp_path):
  points = [(f"residual={r}", {"model.residual": r}) for r in ("none", "bottleneck")]
  write_sweep(str(tmp_path), points, [0, 1], {("residual=none", 0): 0.5, ("residual=none", 1): 0.6})
  text = report.write_report(str(tmp_path))
  assert "`residual=bottleneck`" in text  # Default reference, though unfinished.
  assert "| residual=bottleneck | 0/2 | – | – | – | reference |" in text
  assert "| residual=none | 2/2 | 55.00 ± 63.53 | 50.00 | 60.00 | – (0) |" in text
  assert (tmp_path / "top1_by_point.png").read_bytes().startswith(b"\x89PNG")
  text = report.write_report(str(tmp_path), reference="residual=none")
  assert "`residual=none`" in text
  with pytest.raises(sweep_lib.UsageError, match="--reference=nope: not a point"):
    report.write_report(str(tmp_path), reference="nope")


def test_default_reference_without_paper_keys():
  points = [
      {"name": "lr=0.1", "overrides": {"optimizer.learning_rate": 0.1}},
      {"name": "lr=0.2", "overrides": {"optimizer.learning_rate": 0.2}},
  ]
  assert report.default_reference(points) == "lr=0.1"


def write_events(directory, tag_values, *, as_tensors=True):
  """An event file as clu writes one (scalars as tensors), without TensorFlow."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2, summary_pb2
  from tensorboard.plugins.scalar import summary_v2
  from tensorboard.summary.writer.event_file_writer import EventFileWriter
  # pylint: enable=g-import-not-at-top
  writer = EventFileWriter(str(directory))
  for tag, values in tag_values.items():
    for step, value in values.items():
      summary = (
          summary_v2.scalar_pb(tag, value)
          if as_tensors
          else summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
      )
      writer.add_event(event_pb2.Event(wall_time=1.0, step=step, summary=summary))
  writer.close()


def test_learning_curves_from_event_files(tmp_path):
  points = [("t=2", {"model.expansion": 2}), ("t=6", {"model.expansion": 6})]
  write_sweep(str(tmp_path), points, [0, 1], {("t=2", 0): 0.5, ("t=2", 1): 0.7})
  write_events(tmp_path / "t=2" / "seed=0", {"loss": {10: 2.0, 20: 1.0}, "eval_top1": {20: 0.5}})
  write_events(tmp_path / "t=2" / "seed=1", {"loss": {10: 3.0, 20: 2.0}, "eval_top1": {20: 0.7}})
  # A run still training, logged as plain scalars: it adds the steps it reached.
  (tmp_path / "t=6" / "seed=0").mkdir(parents=True)
  write_events(tmp_path / "t=6" / "seed=0", {"loss": {10: 1.5}}, as_tensors=False)

  _, runs = report.load_runs(str(tmp_path))
  curves = report.learning_curves(runs)
  loss = curves["loss"]["t=2"]
  assert loss.mean(axis=1).to_dict() == {10: 2.5, 20: 1.5}
  assert curves["eval_top1"]["t=2"].loc[20].tolist() == pytest.approx([0.5, 0.7])
  assert curves["loss"]["t=6"][0].to_dict() == {10: 1.5}
  assert "t=6" not in curves["eval_top1"]
  report.write_report(str(tmp_path))
  png = (tmp_path / "learning_curves.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 10_000

  # Where TensorFlow is missing (the GPU images), the curves read the same.
  code = (
      "import sys; sys.modules['tensorflow'] = None; from launch import report; "
      f"assert report.read_scalars({str(tmp_path / 't=2' / 'seed=0')!r}, ['loss'])"
      " == {'loss': {10: 2.0, 20: 1.0}}"
  )
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_cli_usage_errors_are_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.report", str(tmp_path)],
      cwd=REPO,
      capture_output=True,
      text=True,
  )
  assert proc.returncode == 2
  assert proc.stderr == f"error: {tmp_path}: no sweep.json; is it a sweep's --workdir?\n"
