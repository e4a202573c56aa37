"""The published MobileNetV2 ImageNet checkpoints: size, accuracy and speed here.

  python -m mnv2_flax.zoo --out=docs/zoo        # every width x resolution
  python -m mnv2_flax.zoo --out=/tmp/zoo --only=1.0_224,0.35_96 --steps=20

For every checkpoint of the TF-slim table (the weights Keras ships, converted
from them), this builds the model with the weights' settings, counts its
parameters and multiply-adds (as `--mode=summary`), exports it to TFLite
float32 and int8 (`mnv2_flax.export`), and times batch-1 inference of the
TFLite models (ai-edge-litert, all cores) and of the jitted JAX model on this
machine. Latency does not depend on the weights' values, so the models are
randomly initialised (the int8 one calibrated on random images): nothing is
downloaded. Writes zoo.json, zoo.md (the README's table) and zoo.png: top-1
against latency, the paper's Figure 5 for the machine at hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnv2_flax import benchmark, checkpoint, cli, convert, data, models


@dataclasses.dataclass(frozen=True)
class Published:
  """One checkpoint of the TF-slim MobileNetV2 table (ImageNet val, 1001
  classes, inputs in [-1, 1]); Keras ships the same weights as
  `keras.applications.MobileNetV2(alpha=width, input_shape=(r, r, 3))`."""

  width: float
  resolution: int
  top1: float
  top5: float
  macs_m: int  # Multiply-adds, millions, as published.

  @property
  def name(self) -> str:
    return f"{self.width}_{self.resolution}"  # As TF-slim names them: 1.0_224.


# tensorflow/models research/slim/nets/mobilenet/README.md.
PUBLISHED = (
    Published(1.4, 224, 75.0, 92.5, 582),
    Published(1.3, 224, 74.4, 92.1, 509),
    Published(1.0, 224, 71.8, 91.0, 300),
    Published(1.0, 192, 70.7, 90.1, 221),
    Published(1.0, 160, 68.8, 89.0, 154),
    Published(1.0, 128, 65.3, 86.9, 99),
    Published(1.0, 96, 60.3, 83.2, 56),
    Published(0.75, 224, 69.8, 89.6, 209),
    Published(0.75, 192, 68.7, 88.9, 153),
    Published(0.75, 160, 66.4, 87.3, 107),
    Published(0.75, 128, 63.2, 85.3, 69),
    Published(0.75, 96, 58.8, 81.6, 39),
    Published(0.5, 224, 65.4, 86.4, 97),
    Published(0.5, 192, 63.9, 85.4, 71),
    Published(0.5, 160, 61.0, 83.2, 50),
    Published(0.5, 128, 57.7, 80.8, 32),
    Published(0.5, 96, 51.2, 75.8, 18),
    Published(0.35, 224, 60.3, 82.9, 59),
    Published(0.35, 192, 58.2, 81.2, 43),
    Published(0.35, 160, 55.7, 79.1, 30),
    Published(0.35, 128, 50.8, 75.0, 20),
    Published(0.35, 96, 45.5, 70.4, 11),
)


def keras_settings(entry: Published) -> dict[str, Any]:
  """The settings the converted Keras weights carry (settings.json)."""
  return convert.settings("keras", entry.width, 1000, image_size=entry.resolution)


def commands(entry: Published) -> tuple[str, str]:
  """The two commands that convert the published weights and evaluate them."""
  weights = f"weights/mnv2_{entry.name}"
  convert = (
      f"python -m mnv2_flax.convert --source=keras --weights=imagenet "
      f"--width_multiplier={entry.width:g} --image_size={entry.resolution} --out={weights}"
  )
  evaluate = (
      f"python -m mnv2_flax.main --config=configs/imagenet.py --mode=eval "
      f"--workdir=/tmp/eval_{entry.name} --config.checkpoint_path={weights}"
  )
  return convert, evaluate


def jax_latency_ms(
    model: models.MobileNetV2, variables: Any, shape: Sequence[int], steps: int, warmup: int
) -> float:
  """Median batch-1 latency of the jitted model on images of `shape` (H, W, C)."""
  image = jnp.zeros((1, *shape))
  infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
  times = benchmark.time_calls(
      lambda: infer(variables, image).block_until_ready(), warmup + 1, steps
  )
  return 1e3 * statistics.median(times)


def tflite_latency_ms(path: str, steps: int, warmup: int) -> float:
  """Median batch-1 latency of a .tflite model with ai-edge-litert's
  interpreter on every core of this process."""
  from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top

  runner = litert.Interpreter(model_path=path, num_threads=benchmark.num_cores())
  runner.allocate_tensors()
  detail = runner.get_input_details()[0]
  image = np.zeros(detail["shape"], detail["dtype"])

  def call() -> None:
    runner.set_tensor(detail["index"], image)
    runner.invoke()

  return 1e3 * statistics.median(benchmark.time_calls(call, warmup, steps))


def measure(entry: Published, workdir: str, steps: int, warmup: int) -> dict[str, Any]:
  """One row of the zoo table."""
  from mnv2_flax import export  # pylint: disable=g-import-not-at-top

  settings = keras_settings(entry)
  # The CPU kernels (conv_impl "auto") for JAX's latency; export uses XLA's.
  model, _ = checkpoint.model_from_settings(settings, conv_impl="auto")
  shape = (entry.resolution, entry.resolution, 3)
  size = models.size(model, shape)
  # Random weights: latency does not depend on their values.
  variables = jax.jit(
      lambda: model.init(models.random_weights_key(0), jnp.zeros((1, *shape)), train=False)
  )()
  weights = os.path.join(workdir, entry.name)
  checkpoint.save_variables(
      weights, variables, settings, data.imagenet_class_names(), source="random (zoo latency)"
  )
  out = os.path.join(workdir, f"{entry.name}_export")
  rng = np.random.default_rng(0)
  calibration = rng.integers(0, 256, (32, entry.resolution, entry.resolution, 3)).astype(np.uint8)
  info = export.export(weights, out, ("tflite", "tflite_int8"), calibration=calibration)
  convert, evaluate = commands(entry)
  return {
      "name": entry.name,
      "width": entry.width,
      "resolution": entry.resolution,
      "published_top1": entry.top1,
      "published_top5": entry.top5,
      "published_macs_m": entry.macs_m,
      "params": size["params"],
      "macs": size["macs"],
      "tflite_bytes": info["files"]["tflite"]["bytes"],
      "tflite_int8_bytes": info["files"]["tflite_int8"]["bytes"],
      "jax_ms": jax_latency_ms(model, variables, shape, steps, warmup),
      "tflite_ms": tflite_latency_ms(os.path.join(out, export.FILES["tflite"]), steps, warmup),
      "tflite_int8_ms": tflite_latency_ms(
          os.path.join(out, export.FILES["tflite_int8"]), steps, warmup
      ),
      "convert_command": convert,
      "eval_command": evaluate,
  }


def markdown(rows: Sequence[dict[str, Any]], machine: str, date: str) -> str:
  """The README's zoo table."""
  lines = [
      f"Batch-1 latency on {machine}, {date} (median ms; `python -m mnv2_flax.zoo`).",
      "",
      "| width | res. | params | MACs (published) | top-1 / top-5 (published) | JAX ms"
      " | TFLite fp32 ms | TFLite int8 ms | int8 size |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['width']} | {r['resolution']} | {r['params'] / 1e6:.2f} M | "
        f"{r['macs'] / 1e6:.0f} M ({r['published_macs_m']} M) | "
        f"{r['published_top1']:.1f} / {r['published_top5']:.1f} | "
        f"{r['jax_ms']:.2f} | {r['tflite_ms']:.2f} | {r['tflite_int8_ms']:.2f} | "
        f"{r['tflite_int8_bytes'] / 1e6:.1f} MB |"
    )
  return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: str, machine: str) -> None:
  """Top-1 against latency, one line per width and runtime (Figure 5)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(8, 5.5))
  runtimes = (("tflite_int8_ms", "TFLite int8", "o-"), ("tflite_ms", "TFLite fp32", "s--"))
  runtimes += (("jax_ms", "JAX", "^:"),)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  widths = sorted({r["width"] for r in rows})
  for color, width in zip(colors, widths):
    line = sorted((r for r in rows if r["width"] == width), key=lambda r: r["resolution"])
    for key, label, style in runtimes:
      ax.plot(
          [r[key] for r in line],
          [r["published_top1"] for r in line],
          style,
          color=color,
          label=f"{width} {label}",
          markersize=4,
      )
  ax.set_xscale("log")
  ax.set_xlabel(f"batch-1 latency, ms (log), {machine}")
  ax.set_ylabel("ImageNet top-1, % (published)")
  ax.set_title("MobileNetV2 widths x resolutions 96-224: accuracy against latency")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(
      prog="python -m mnv2_flax.zoo", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--out", required=True, help="Directory for zoo.json, zoo.md, zoo.png.")
  parser.add_argument(
      "--only",
      default="",
      help="Comma list of WIDTH_RESOLUTION names (e.g. 1.0_224); all if empty.",
  )
  parser.add_argument("--steps", type=int, default=50, help="Timed calls per latency.")
  parser.add_argument("--warmup", type=int, default=5, help="Untimed calls before timing.")
  parser.add_argument(
      "--verbosity", type=int, default=-1, help="Log level (0: INFO; default -1: warnings)."
  )
  args = parser.parse_args(argv)
  cli.quiet_logs(args.verbosity)
  names = {entry.name: entry for entry in PUBLISHED}
  chosen = [name for name in args.only.split(",") if name] or list(names)
  unknown = [name for name in chosen if name not in names]
  if unknown:
    parser.exit(2, f"error: --only: unknown {', '.join(unknown)}; known: {', '.join(names)}\n")
  os.makedirs(args.out, exist_ok=True)
  machine = benchmark.describe_device()
  date = datetime.date.today().isoformat()
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    for name in chosen:
      rows.append(measure(names[name], workdir, args.steps, args.warmup))
      print(json.dumps(rows[-1]), flush=True)
  checkpoint.write_json(
      os.path.join(args.out, "zoo.json"), {"machine": machine, "date": date, "rows": rows}
  )
  with open(os.path.join(args.out, "zoo.md"), "w") as f:
    f.write(markdown(rows, machine, date))
  plot(rows, os.path.join(args.out, "zoo.png"), machine)
  return rows


if __name__ == "__main__":
  main()
