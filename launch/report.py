"""Statistics, tables and plots of a sweep (see launch/sweep.py), finished or not.

  python -m launch.report WORKDIR
  python -m launch.report WORKDIR --reference='t=6,bottleneck=relu6'

Writes into WORKDIR:
  results.csv    a row per run: point, seed, every override key, status, top1,
                 top5, loss, step, wall_clock_s, num_params, macs.
  report.md      a row per point over its finished seeds: n, mean top-1 with
                 its 95 % CI (Student t: mean +- t(0.975, n-1) sd / sqrt(n)),
                 min, max, the difference to the reference point paired by
                 seed with its 95 % CI, params and multiply-adds; then every
                 run not finished (failed, running, pending), never dropped.
  top1_vs_expansion.png  (when model.expansion varies: a line per value of the
                 other varied keys, CI bars, a dot per seed) or top1_by_point.png.
  learning_curves.png    eval top-1 and train loss against step, the mean over
                 seeds and their min-max band, a line per point; read from the
                 runs' TensorBoard event files without TensorFlow.
The reference is --reference, else the point with the paper's block
(expansion 6, linear bottleneck, shortcut between bottlenecks) in the keys the
sweep varies, else the first point.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from absl import flags
from scipy import stats

from launch import sweep_lib
from launch.sweep_lib import DONE, UsageError

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "reference",
    None,
    "The point the paired differences compare "
    "to (default: the paper's block, else the first point).",
)

PAPER_BLOCK = {"model.expansion": 6, "model.bottleneck": "linear", "model.residual": "bottleneck"}
METRICS = ("top1", "top5", "loss", "step", "wall_clock_s", "num_params", "macs")
CURVES = {"eval_top1": "eval top-1 (%)", "loss": "train loss"}  # Event tag: axis.


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
  """The mean and the half-width of its 95 % CI (nan below two values)."""
  values = np.asarray(values, dtype=float)
  if len(values) < 2:
    return (float(values.mean()) if len(values) else float("nan")), float("nan")
  half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
  return float(values.mean()), float(half)


def load_runs(workdir: str) -> tuple[dict[str, Any], pd.DataFrame]:
  """The manifest, and a row per run: overrides, status, results."""
  manifest = sweep_lib.read_manifest(workdir)
  if manifest is None:
    raise UsageError(f"{workdir}: no {sweep_lib.MANIFEST_FILE}; is it a sweep's --workdir?")
  keys = list(dict.fromkeys(k for p in manifest["points"] for k in p["overrides"]))
  rows = []
  for point, seed, directory in sweep_lib.manifest_runs(manifest, workdir):
    state = sweep_lib.run_state(directory)
    results = (
        sweep_lib.read_json(os.path.join(directory, sweep_lib.RESULTS_FILE))
        if state == DONE
        else None
    ) or {}
    rows.append(
        {
            "point": point["name"],
            "seed": seed,
            **{k: point["overrides"].get(k) for k in keys},
            "status": state,
            **{m: results.get(m, np.nan) for m in METRICS},
            "directory": directory,
        }
    )
  runs = pd.DataFrame(rows)
  # Sizes are the point's, whatever the seed: fill them in from any finished run.
  for size in ("num_params", "macs"):
    runs[size] = runs.groupby("point")[size].transform("max")
  return manifest, runs.astype({c: "Int64" for c in ("step", "num_params", "macs")})


def default_reference(points: Sequence[dict[str, Any]]) -> str:
  values = {}
  for point in points:
    for key, value in point["overrides"].items():
      values.setdefault(key, set()).add(str(value))
  varied = [key for key in PAPER_BLOCK if len(values.get(key, ())) > 1]
  for point in points:
    if varied and all(str(point["overrides"].get(k)) == str(PAPER_BLOCK[k]) for k in varied):
      return point["name"]
  return points[0]["name"]


def point_stats(runs: pd.DataFrame, reference: str) -> pd.DataFrame:
  """A row per point: top-1 (%) statistics over seeds, paired with the reference."""
  done = runs[runs.status == DONE]
  ref = done[done.point == reference].set_index("seed").top1
  rows = []
  for name, group in runs.groupby("point", sort=False):
    finished = done[done.point == name]
    mean, half = mean_ci(100 * finished.top1)
    pairs = finished.set_index("seed").top1.sub(ref).dropna()
    diff, diff_half = mean_ci(100 * pairs)
    rows.append(
        {
            "point": name,
            "n": len(finished),
            "runs": len(group),
            "mean": mean,
            "ci": half,
            "min": 100 * finished.top1.min(),
            "max": 100 * finished.top1.max(),
            "diff": diff,
            "diff_ci": diff_half,
            "pairs": len(pairs),
            "num_params": group.num_params.iloc[0],
            "macs": group.macs.iloc[0],
        }
    )
  return pd.DataFrame(rows)


def _number(value: float, digits: int = 2, sign: bool = False) -> str:
  return "–" if pd.isna(value) else f"{value:{'+' if sign else ''}.{digits}f}"


def _with_ci(value: float, half: float, sign: bool = False) -> str:
  if pd.isna(value):
    return "–"
  return _number(value, sign=sign) + ("" if pd.isna(half) else f" ± {_number(half)}")


def _millions(value: float) -> str:
  return "–" if pd.isna(value) else f"{value / 1e6:.2f} M"


def markdown(
    manifest: dict[str, Any],
    runs: pd.DataFrame,
    table: pd.DataFrame,
    reference: str,
    plots: Sequence[str],
) -> str:
  counts = runs.status.value_counts()
  lines = [
      f"# Sweep {manifest['sweep_file']}",
      "",
      f"Base config: {manifest['config'] or 'the embedded default'}"
      + (f", BASE {manifest['base']}" if manifest["base"] else "")
      + (f", flags `{' '.join(manifest['extra_flags'])}`" if manifest["extra_flags"] else "")
      + f"; seeds {', '.join(map(str, manifest['seeds']))}; git commit "
      f"{manifest.get('git_commit') or 'unknown'}.",
      "",
      f"{len(runs)} runs: "
      + ", ".join(f"{counts[s]} {s}" for s in sweep_lib.STATES if s in counts)
      + ".",
      "",
      "Test top-1 (%) over the finished seeds of each point: mean ± the half-width "
      "of its 95 % confidence interval (Student t, n - 1 degrees of freedom; none "
      f"for n < 2). Δ: the difference to `{reference}`, paired by seed (the seeds "
      "both finished), ± its 95 % CI.",
      "",
      "| point | n | top-1 (%) | min | max | Δ (pairs) | params | MACs |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for row in table.itertuples():
    delta = (
        "reference"
        if row.point == reference
        else f"{_with_ci(row.diff, row.diff_ci, sign=True)} ({row.pairs})"
    )
    lines.append(
        f"| {row.point} | {row.n}/{row.runs} | {_with_ci(row.mean, row.ci)} | "
        f"{_number(row.min)} | {_number(row.max)} | {delta} | "
        f"{_millions(row.num_params)} | {_millions(row.macs)} |"
    )
  missing = runs[runs.status != DONE]
  lines += ["", "## Runs not finished", ""]
  if missing.empty:
    lines.append("None: every run finished.")
  for row in missing.itertuples():
    detail = sweep_lib.state_detail(row.directory, row.status)
    lines.append(
        f"- {row.point} seed {row.seed}: {row.status}" + (f" ({detail})" if detail else "")
    )
  if plots:
    lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
  return "\n".join(lines) + "\n"


def _pyplot() -> Any:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def varied_keys(runs: pd.DataFrame, keys: Sequence[str]) -> list[str]:
  return [k for k in keys if runs[k].astype(str).nunique() > 1]


def plot_top1(runs: pd.DataFrame, keys: Sequence[str], path: str) -> None:
  """Top-1 against expansion, a line per other varied setting; else per point."""
  plt = _pyplot()
  done = runs[runs.status == DONE].assign(top1=lambda r: 100 * r.top1)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  if "model.expansion" in varied_keys(runs, keys):
    others = [k for k in varied_keys(runs, keys) if k != "model.expansion"]
    with_t = done.dropna(subset=["model.expansion"])
    groups = with_t.groupby(others, sort=False, dropna=False) if others else [((), with_t)]
    for i, (values, group) in enumerate(groups):
      label = (
          ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, np.atleast_1d(values)))
          or "top-1"
      )
      summary = [(t, *mean_ci(g.top1)) for t, g in group.groupby("model.expansion")]
      t, mean, half = np.array(summary, dtype=float).T
      offset = 0.08 * i  # Dodges the groups' bars and dots.
      line = ax.errorbar(
          t + offset, mean, yerr=np.nan_to_num(half), marker="o", capsize=3, label=label
      )
      ax.scatter(
          group["model.expansion"].astype(float) + offset,
          group.top1,
          s=12,
          alpha=0.4,
          color=line[0].get_color(),
      )
    ax.set_xticks(sorted(set(runs["model.expansion"].dropna().astype(float))))
    ax.set_xlabel("expansion ratio t")
    ax.legend()
  else:
    names = list(dict.fromkeys(runs.point))
    summary = [mean_ci(done[done.point == name].top1) for name in names]
    mean, half = np.array(summary, dtype=float).T
    ax.errorbar(range(len(names)), mean, yerr=np.nan_to_num(half), fmt="o", capsize=4)
    ax.scatter([names.index(p) for p in done.point], done.top1, s=12, alpha=0.4)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax.set_ylabel("test top-1 (%): mean, 95 % CI, seeds")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def read_scalars(directory: str, tags: Sequence[str]) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} from a run's event files (scalars written as tensors, as tf.summary does).

  tensorboard reads them with the installed TensorFlow, or with its own stub
  where there is none (as on the GPU images).
  """
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tb_logging, tensor_util
  # pylint: enable=g-import-not-at-top

  tb_logging.get_logger().setLevel(logging.WARNING)  # Not a line per event file.

  accumulator = event_accumulator.EventAccumulator(
      directory, size_guidance={"tensors": 0, "scalars": 0}
  )
  accumulator.Reload()
  available = accumulator.Tags()
  series = {}
  for tag in tags:
    if tag in available["tensors"]:
      series[tag] = {
          e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors(tag)
      }
    elif tag in available["scalars"]:
      series[tag] = {e.step: e.value for e in accumulator.Scalars(tag)}
  return series


def learning_curves(runs: pd.DataFrame) -> dict[str, dict[str, pd.DataFrame]]:
  """{tag: {point: DataFrame (index step, a column per seed)}} of every run
  with event files, finished or not (those contribute the steps they reached)."""
  curves: dict[str, dict[str, pd.DataFrame]] = {tag: {} for tag in CURVES}
  for row in runs.itertuples():
    if not os.path.isdir(row.directory):
      continue
    for tag, values in read_scalars(row.directory, list(CURVES)).items():
      column = pd.Series(values, name=row.seed, dtype=float)
      table = curves[tag].get(row.point)
      curves[tag][row.point] = (
          column.to_frame() if table is None else table.join(column, how="outer")
      )
  return curves


def plot_curves(curves: dict[str, dict[str, pd.DataFrame]], path: str) -> None:
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(CURVES), figsize=(12, 4.5))
  names = list(dict.fromkeys(n for by_point in curves.values() for n in by_point))
  colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(names), 2)))
  for ax, (tag, axis_label) in zip(axes, CURVES.items()):
    scale = 100 if tag == "eval_top1" else 1
    for name, table in curves[tag].items():
      table = table.sort_index() * scale
      color = colors[names.index(name)]
      ax.plot(
          table.index,
          table.mean(axis=1),
          marker="o" if len(table) < 20 else None,
          color=color,
          label=name,
      )
      ax.fill_between(table.index, table.min(axis=1), table.max(axis=1), color=color, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{axis_label}: mean, min-max over seeds")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(workdir: str, reference: str | None = None) -> str:
  """Writes results.csv, report.md and the plots into WORKDIR; returns report.md."""
  manifest, runs = load_runs(workdir)
  names = [p["name"] for p in manifest["points"]]
  reference = reference or default_reference(manifest["points"])
  if reference not in names:
    raise UsageError(f"--reference={reference}: not a point of the sweep ({', '.join(names)})")
  keys = list(runs.columns[2 : runs.columns.get_loc("status")])
  runs.drop(columns="directory").to_csv(os.path.join(workdir, "results.csv"), index=False)
  plots = []
  if (runs.status == DONE).any():
    plots.append(
        "top1_vs_expansion.png"
        if "model.expansion" in varied_keys(runs, keys)
        else "top1_by_point.png"
    )
    plot_top1(runs, keys, os.path.join(workdir, plots[-1]))
  curves = learning_curves(runs)
  if any(curves.values()):
    plots.append("learning_curves.png")
    plot_curves(curves, os.path.join(workdir, plots[-1]))
  text = markdown(manifest, runs, point_stats(runs, reference), reference, plots)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(text)
  return text


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise UsageError("usage: python -m launch.report WORKDIR [--reference=POINT]")
  print(write_report(os.path.abspath(argv[1]), FLAGS.reference), end="")


if __name__ == "__main__":
  sweep_lib.run_cli(main)
