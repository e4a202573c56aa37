"""Training and inference speed of MobileNetV2, against Keras and PyTorch.

  python -m mnv2_flax.benchmark                          # this project only
  python -m mnv2_flax.benchmark --compare=keras --json=cpu.json
  python -m mnv2_flax.benchmark --pipeline --skip_model  # input pipeline only

The JAX numbers come from the trainer's own jitted step (`train.setup` with the
"synthetic" dataset): one batch placed on device once, so no input cost. Keras
3 (TensorFlow backend) and torchvision run in the same process on the same
numpy batch. `--pipeline` times the training input pipeline on generated
ImageNet-sized JPEGs, images/s per worker: this project's (the uint8
batches of `images.train_image` in Grain worker processes, which the train
step normalises on the device) against the tf.data pipeline it replaced
(kept here as a reference, normalisation included), with as many tf.data
threads as Grain workers.

The JAX part and this project's pipeline never import TensorFlow (GPU images
need not have it); Keras, TensorFlow (the tf.data reference) and PyTorch are
imported only by the parts that use them. Columns
and recorded numbers: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import io
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cv2
import jax
import ml_collections
import numpy as np
from PIL import Image

from mnv2_flax import allocator, config_lib, data, images, layers, models, train

Result = dict[str, Any]
# Also the order they run in: torchvision's import segfaults once TensorFlow is
# loaded (seen with torch 2.14.1 and tensorflow 2.21.0); the reverse order works.
FRAMEWORKS = ("torch", "keras")
# Generated JPEGs: ImageNet's typical size and JPEG quality.
JPEG_HEIGHT, JPEG_WIDTH, JPEG_QUALITY = 375, 500, 90


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m mnv2_flax.benchmark", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--width", type=float, default=1.0, help="Width multiplier.")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument(
      "--batch_size", type=int, default=32, help="Training, batched-inference and pipeline batch."
  )
  parser.add_argument(
      "--dtype",
      choices=("float32", "bfloat16"),
      default="float32",
      help="Compute dtype (bfloat16: params and BN stay float32).",
  )
  parser.add_argument("--conv_impl", choices=layers.CONV_IMPLS, default="auto")
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument(
      "--remat", action="store_true", help="Rematerialise each block (less memory, more compute)."
  )
  parser.add_argument("--steps", type=int, default=20, help="Timed iterations of each measurement.")
  parser.add_argument(
      "--warmup", type=int, default=3, help="Untimed iterations before each measurement."
  )
  parser.add_argument(
      "--compare",
      default="",
      help="Comma list from keras,torch: also run these on the same batch.",
  )
  parser.add_argument(
      "--keras_jit_compile",
      choices=("auto", "true", "false"),
      default="auto",
      help="Keras' XLA switch; auto is Keras' default (off on CPU).",
  )
  parser.add_argument(
      "--pipeline",
      action="store_true",
      help="Also time the training input pipeline against the tf.data reference.",
  )
  parser.add_argument("--pipeline_images", type=int, default=200, help="Number of generated JPEGs.")
  parser.add_argument(
      "--pipeline_batches",
      type=int,
      default=50,
      help="Timed batches per pipeline, worker count and repeat.",
  )
  parser.add_argument(
      "--pipeline_workers",
      default="",
      help="Comma list of worker (tf.data: thread) counts; default 1 and the core count.",
  )
  parser.add_argument(
      "--pipeline_repeats", type=int, default=3, help="Measurements of each pipeline and count."
  )
  parser.add_argument(
      "--skip_model", action="store_true", help="Skip the model benchmarks (with --pipeline)."
  )
  parser.add_argument(
      "--json", dest="json_path", default="", help="Write all results to this file."
  )
  args = parser.parse_args(argv)
  requested = {name for name in args.compare.split(",") if name}
  unknown = requested - set(FRAMEWORKS)
  if unknown:
    parser.error(f"--compare: unknown {sorted(unknown)}; choose from {FRAMEWORKS}")
  args.compare = [name for name in FRAMEWORKS if name in requested]
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be >= 1 and --warmup >= 0")
  if args.skip_model and not args.pipeline:
    parser.error("--skip_model without --pipeline leaves nothing to measure")
  try:
    workers = [int(n) for n in args.pipeline_workers.split(",") if n]
  except ValueError:
    workers = [0]
  if any(n < 1 for n in workers) or args.pipeline_repeats < 1:
    parser.error("--pipeline_workers must be positive integers and --pipeline_repeats >= 1")
  args.pipeline_workers = sorted(set(workers or {1, num_cores()}))
  return args


# --- measuring ---------------------------------------------------------------------


def time_calls(fn: Callable[[], Any], warmup: int, steps: int) -> list[float]:
  """Seconds of each of `steps` calls of `fn` (which must block) after `warmup`."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def measure_train(train_step: Callable[[], Any], args: argparse.Namespace) -> Result:
  """The first step (compilation included), then the timed steps. Medians
  resist the odd slow iteration; min/max show how noisy the machine was."""
  compile_s = time_calls(train_step, 0, 1)[0]
  step_s = time_calls(train_step, args.warmup, args.steps)
  median_step = statistics.median(step_s)
  return {
      "compile_s": compile_s,
      "train_images_per_s": args.batch_size / median_step,
      "train_step_ms": 1e3 * median_step,
      "train_step_ms_min": 1e3 * min(step_s),
      "train_step_ms_max": 1e3 * max(step_s),
  }


def measure_infer(
    infer: Callable[[Any], Any], image_b1: Any, images: Any, args: argparse.Namespace
) -> Result:
  """Batch-1 latency and batch-B throughput of `infer` (which must block)."""
  # warmup + 1: the first call of each input shape traces and compiles.
  b1_s = time_calls(lambda: infer(image_b1), args.warmup + 1, args.steps)
  batch_s = time_calls(lambda: infer(images), args.warmup + 1, args.steps)
  return {
      "infer_latency_ms_b1": 1e3 * statistics.median(b1_s),
      "infer_images_per_s": args.batch_size / statistics.median(batch_s),
  }


def reset_peak_rss() -> None:
  """Lowers the kernel's peak-RSS mark to the current RSS (Linux >= 4.0), so
  each framework's peak excludes the ones that ran before it."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass  # Elsewhere the peak is the process's since its start.


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.


def current_rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def host_memory(start_mb: float) -> Result:
  return {
      "peak_mb": peak_rss_mb(),
      "start_rss_mb": start_mb,
      "peak_memory": "host max RSS (process, incl. libraries)",
  }


def num_cores() -> int:
  return len(os.sched_getaffinity(0))


def describe_device() -> str:
  device = jax.devices()[0]
  if device.platform != "cpu":
    return f"{device.platform}: {device.device_kind} x{jax.device_count()}"
  return f"cpu: {describe_cpu()}"


def describe_cpu() -> str:
  model = "unknown CPU"
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  return f"{model}, {num_cores()} cores"


# --- JAX (this project) ------------------------------------------------------------


def make_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.dataset.name = "synthetic"
  config.dataset.image_size = args.image_size
  config.dataset.num_classes = args.num_classes
  config.model.width_multiplier = args.width
  config.model.stem_stride = 2  # The paper's strides (base_config's is 1).
  config.model.dtype = args.dtype
  config.model.conv_impl = args.conv_impl
  config.model.remat = args.remat
  config.global_batch_size = args.batch_size
  config.eval_batch_size = args.batch_size  # SyntheticDataset pads eval to it.
  config.num_train_steps = args.warmup + args.steps + 1
  return config


def benchmark_jax(args: argparse.Namespace) -> tuple[Result, dict[str, np.ndarray]]:
  """This project's trainer; returns its results and the numpy batch it used."""
  reset_peak_rss()
  start_mb = current_rss_mb()
  s = train.setup(make_config(args))
  host_batch = next(s.dataset.train_batches())
  batch = s.shard(host_batch)
  state = s.init(models.random_weights_key(0))  # Speed does not depend on the values.

  def train_step() -> None:
    nonlocal state  # The step donates its input state.
    state, metrics = s.train_step(state, batch)
    jax.block_until_ready((state, metrics))

  result = measure_train(train_step, args)
  device = jax.devices()[0]
  # The trained (eval) weights, on one device: inference is single-device.
  variables = jax.device_put(state.eval_variables(), device)
  apply = jax.jit(lambda v, x: s.model.apply(v, x, train=False))
  images = host_batch["image"]
  result.update(
      measure_infer(
          lambda x: jax.block_until_ready(apply(variables, x)),
          jax.device_put(images[:1], device),
          jax.device_put(images, device),
          args,
      )
  )
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    result.update(
        peak_mb=stats["peak_bytes_in_use"] / 2**20, peak_memory="device peak_bytes_in_use"
    )
  else:
    result.update(host_memory(start_mb))
  result.update(
      params=sum(x.size for x in jax.tree.leaves(variables["params"])),
      macs=models.count_macs(s.model, variables, images.shape[1:]),
      conv_impl=layers.resolve_conv_impl(args.conv_impl),
      version=f"jax {jax.__version__}",
  )
  return result, host_batch


# --- Keras 3 and PyTorch ---------------------------------------------------------


def quiet_tensorflow() -> None:
  """Keeps TensorFlow's C++ INFO and WARNING lines from burying the results."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def benchmark_keras(args: argparse.Namespace, batch: dict[str, np.ndarray]) -> Result:
  """keras.applications.MobileNetV2 trained with `train_on_batch` (the standard
  compiled Keras step: one tf.function, XLA per --keras_jit_compile)."""
  os.environ["KERAS_BACKEND"] = "tensorflow"  # Read once, at the first import.
  quiet_tensorflow()
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if keras.backend.backend() != "tensorflow":
    return {"skipped": f"keras already imported with the {keras.backend.backend()} backend"}
  reset_peak_rss()
  start_mb = current_rss_mb()
  size = args.image_size
  policy = keras.config.dtype_policy()
  keras.config.set_dtype_policy("mixed_bfloat16" if args.dtype == "bfloat16" else "float32")
  try:
    model = keras.applications.MobileNetV2(
        input_shape=(size, size, 3),
        alpha=args.width,
        weights=None,
        classes=args.num_classes,
        classifier_activation=None,
    )
  finally:
    keras.config.set_dtype_policy(policy)
  jit_compile = {"auto": "auto", "true": True, "false": False}[args.keras_jit_compile]
  # The project's default optimizer (SGD, Nesterov momentum 0.9); loss on logits.
  model.compile(
      optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9, nesterov=True),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      jit_compile=jit_compile,
  )
  images, labels = tf.constant(batch["image"]), tf.constant(batch["label"])
  forward = tf.function(lambda x: model(x, training=False), jit_compile=model.jit_compile)
  result = measure_train(lambda: model.train_on_batch(images, labels), args)
  result.update(measure_infer(lambda x: forward(x).numpy(), images[:1], images, args))
  result.update(host_memory(start_mb))
  result.update(
      params=sum(int(np.prod(w.shape)) for w in model.trainable_weights),
      jit_compile=bool(model.jit_compile),
      version=f"keras {keras.__version__}, tensorflow {tf.__version__}",
  )
  return result


def benchmark_torch(args: argparse.Namespace, batch: dict[str, np.ndarray]) -> Result:
  """torchvision's mobilenet_v2, eager (channels-last, autocast for bfloat16)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {"skipped": str(e)}
  reset_peak_rss()
  start_mb = current_rss_mb()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = torchvision.models.mobilenet_v2(width_mult=args.width, num_classes=args.num_classes).to(
      device, memory_format=torch.channels_last
  )
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
  images = (
      torch.from_numpy(batch["image"])
      .permute(0, 3, 1, 2)
      .to(device, memory_format=torch.channels_last)
  )
  labels = torch.from_numpy(batch["label"]).long().to(device)

  def autocast() -> Any:
    return torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

  def train_step() -> None:
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    loss.item()  # Waits for the device.

  def infer(x: Any) -> None:
    with torch.inference_mode(), autocast():
      model(x).float().cpu()

  result = measure_train(train_step, args)
  model.eval()
  result.update(measure_infer(infer, images[:1], images, args))
  if device == "cuda":
    result.update(
        peak_mb=torch.cuda.max_memory_allocated() / 2**20,
        peak_memory="torch.cuda.max_memory_allocated",
    )
  else:
    result.update(host_memory(start_mb))
  result.update(
      params=sum(p.numel() for p in model.parameters()),
      version=f"torch {torch.__version__}, torchvision {torchvision.__version__}",
  )
  return result


# --- input pipeline ----------------------------------------------------------------


def generate_jpegs(count: int, seed: int = 0) -> list[bytes]:
  """ImageNet-like JPEGs (500x375, quality 90, ~75 KB): smooth random colour
  fields at four scales, whose fine texture sets the compressed size."""
  rng = np.random.default_rng(seed)
  octaves = (((6, 8), 90.0), ((24, 32), 45.0), ((94, 125), 25.0), ((JPEG_HEIGHT, JPEG_WIDTH), 8.0))
  encoded = []
  for _ in range(count):
    image = np.full((JPEG_HEIGHT, JPEG_WIDTH, 3), 128.0, np.float32)
    for shape, amplitude in octaves:
      noise = rng.normal(0.0, amplitude, (*shape, 3)).astype(np.float32)
      image += cv2.resize(noise, (JPEG_WIDTH, JPEG_HEIGHT), interpolation=cv2.INTER_CUBIC)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=JPEG_QUALITY
    )
    encoded.append(buffer.getvalue())
  return encoded


class GeneratedImages:
  """The generated JPEGs as an `input_pipeline.ImageSource` (label: index mod 10)."""

  key = "benchmark"
  location = "generated JPEGs"

  def __init__(self, encoded: Sequence[bytes]):
    self._encoded = list(encoded)

  def __len__(self) -> int:
    return len(self._encoded)

  def read(self, index: int) -> tuple[bytes, int]:
    return self._encoded[index], index % 10

  def name(self, index: int) -> str:
    return f"generated[{index}]"


def _dataset_images_per_s(
    encoded: Sequence[bytes], workers: int, config: ml_collections.ConfigDict, args: Any
) -> float:
  """The training loop's input: `input_pipeline.ImageDataset` on the JPEGs
  (images.train_image in `workers` Grain worker processes, uint8 batches
  through shared memory; the train step normalises them on the device)."""
  from mnv2_flax import input_pipeline  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.dataset.workers = workers
  dataset = input_pipeline.ImageDataset(
      config,
      train=GeneratedImages(encoded),
      evaluation=None,
      class_names=tuple(str(i) for i in range(10)),
      process_index=0,
      process_count=1,
  )
  return _images_per_s(dataset.train_batches(0), 2 * workers + 2, args)


def _grain_threads_images_per_s(
    encoded: Sequence[bytes], workers: int, config: ml_collections.ConfigDict, args: Any
) -> float:
  """images.train_image in `workers` Grain threads of this process, uint8
  batches (for comparison: the GIL against worker processes)."""
  import grain  # pylint: disable=g-import-not-at-top

  train_image = functools.partial(
      images.train_image,
      image_size=args.image_size,
      area_min=config.dataset.crop_area_min,
      channels=3,
  )
  batches = (
      grain.MapDataset.source(list(encoded))
      .repeat()
      .seed(config.seed)
      .random_map(train_image)  # train_image(bytes, rng): its own rng per position.
      .batch(args.batch_size, drop_remainder=True)
  )
  stream = batches.to_iter_dataset(
      grain.ReadOptions(num_threads=workers, prefetch_buffer_size=2 * workers)
  )
  return _images_per_s(iter(stream), 2 * workers + 2, args)


def _tf_data_images_per_s(
    encoded: Sequence[bytes], threads: int, config: ml_collections.ConfigDict, args: Any
) -> float:
  """The tf.data training pipeline this project had until 2026-12 (a reference
  kept here): the random-resized crop decoded straight from the JPEG
  (decode_and_crop_jpeg, accurate integer DCT: Pillow's pixels), bilinear
  resize, normalisation, flip; one tf.data map on `threads` threads."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  size = args.image_size
  mean, std = data.pixel_stats((config.dataset.mean, config.dataset.std))
  # Full-size constants: TF's broadcast of a 3-vector over an image costs
  # about as much as decoding the JPEG (measured 0.8 vs 1 ms at 224x224).
  ones = np.ones((size, size, 3), np.float32)

  def preprocess(image_bytes: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.io.extract_jpeg_shape(image_bytes),
        tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=crop_seed,
        min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(config.dataset.crop_area_min, 1.0),
        max_attempts=10,
    )
    window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
    image = tf.io.decode_and_crop_jpeg(
        image_bytes, window, channels=3, dct_method="INTEGER_ACCURATE"
    )
    image = tf.image.resize(image, (size, size), "bilinear")
    image = (image - mean * ones) * (ones / std)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)

  key = tf.constant([config.seed, 0], tf.int64)
  ds = (
      tf.data.Dataset.from_tensor_slices(list(encoded))
      .repeat()
      .enumerate()
      .map(
          lambda i, image_bytes: preprocess(
              image_bytes, tf.random.experimental.stateless_fold_in(key, i)
          ),
          num_parallel_calls=tf.data.AUTOTUNE,
      )
  )
  ds = ds.batch(args.batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
      tf.data.AUTOTUNE
  )
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  batches = ds.with_options(options).as_numpy_iterator()
  return _images_per_s(batches, 2, args)


def _images_per_s(batches: Iterator[Any], buffered: int, args: Any) -> float:
  """Images/s of `args.pipeline_batches` batches after `args.warmup` and the
  `buffered` batches the workers or threads hold ready; then closes `batches`
  where it can be closed (Grain's iterators end their workers)."""
  try:
    times = time_calls(lambda: next(batches), args.warmup + buffered, args.pipeline_batches)
  finally:
    if hasattr(batches, "close"):
      batches.close()
  return args.batch_size * len(times) / sum(times)


PIPELINES = ("tf_data", "images_processes", "images_threads")


def benchmark_pipeline(args: argparse.Namespace) -> Result:
  """Training images/s of the input pipeline, without the model, on the same
  generated JPEGs: this project's (images.train_image in Grain worker
  processes, as the training loop takes its uint8 batches; in Grain threads
  for comparison) and the tf.data reference (normalisation included),
  each with 1 and all cores' worth of workers (tf.data: threads). Repeats
  alternate the pipelines, so that all see the same drift of a shared machine."""
  config = make_config(args)
  encoded = generate_jpegs(args.pipeline_images)
  runners: dict[str, Callable[..., float]] = {
      "images_processes": _dataset_images_per_s,
      "images_threads": _grain_threads_images_per_s,
  }
  result: Result = {}
  try:
    quiet_tensorflow()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    runners = {"tf_data": _tf_data_images_per_s, **runners}
    result["tensorflow"] = tf.__version__
  except ImportError as e:
    result["tf_data"] = {"skipped": f"TensorFlow is not installed ({e})"}
  runs: dict[str, dict[int, list[float]]] = {name: {} for name in runners}
  for _ in range(args.pipeline_repeats):
    for workers in args.pipeline_workers:
      for name, runner in runners.items():
        runs[name].setdefault(workers, []).append(runner(encoded, workers, config, args))
  for name, by_workers in runs.items():
    result[name] = {
        f"workers_{n}": {
            "images_per_s": statistics.median(rates),
            "per_worker": statistics.median(rates) / n,
            "min": min(rates),
            "max": max(rates),
            "runs": rates,
        }
        for n, rates in by_workers.items()
    }
  if "tf_data" in runs:
    result["over_tf_data"] = {
        name: {
            key: result[name][key]["images_per_s"] / result["tf_data"][key]["images_per_s"]
            for key in result[name]
        }
        for name in runs
        if name != "tf_data"
    }
  result.update(
      num_images=len(encoded),
      mean_jpeg_kb=sum(map(len, encoded)) / len(encoded) / 1024,
      cpu=describe_cpu(),
  )
  return result


# --- report ------------------------------------------------------------------------

COLUMNS = (
    ("train img/s", "train_images_per_s", "{:.1f}"),
    ("infer ms (b1)", "infer_latency_ms_b1", "{:.2f}"),
    ("infer img/s", "infer_images_per_s", "{:.1f}"),
    ("compile s", "compile_s", "{:.1f}"),
    ("peak MB", "peak_mb", "{:.0f}"),
)


def ratios(results: Result) -> dict[str, float]:
  """JAX's speed relative to each other framework: > 1 means JAX is faster."""
  out = {}
  for name in FRAMEWORKS:
    other = results.get(name, {})
    if "train_images_per_s" in other:
      jax_result = results["jax"]
      out[f"jax/{name} train img/s"] = (
          jax_result["train_images_per_s"] / other["train_images_per_s"]
      )
      out[f"{name}/jax latency b1"] = (
          other["infer_latency_ms_b1"] / jax_result["infer_latency_ms_b1"]
      )
  return out


def markdown_tables(results: Result) -> str:
  """The results as markdown tables, pasteable into docs/benchmarks.md."""
  lines = []
  models_run = [name for name in ("jax", *FRAMEWORKS) if name in results]
  if models_run:
    lines += [
        "| framework | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for name in models_run:
      r = results[name]
      cells = (
          [f"skipped: {r['skipped']}"] + [""] * (len(COLUMNS) - 1)
          if "skipped" in r
          else [fmt.format(r[key]) for _, key, fmt in COLUMNS]
      )
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [""] + [f"{k}: {v:.2f}x" for k, v in results.get("ratios", {}).items()]
  if "pipeline" in results:
    lines += [""] if lines else []
    lines += pipeline_table(results["pipeline"])
  return "\n".join(lines)


def pipeline_table(p: Result) -> list[str]:
  """Per pipeline and worker count: images/s per worker (median of the
  repeats, and the range), in all, and relative to tf.data."""
  lines = [
      "| pipeline | workers | img/s per worker: median (min-max) | img/s in all | / tf_data |",
      "|---|---|---|---|---|",
  ]
  for name in PIPELINES:
    if "skipped" in p.get(name, {}):
      lines.append(f"| {name} | skipped: {p[name]['skipped']} | | | |")
      continue
    for key, r in p.get(name, {}).items():
      n = int(key.split("_")[1])
      ratio = p.get("over_tf_data", {}).get(name, {}).get(key)
      lines.append(
          f"| {name} | {n} | {r['per_worker']:.0f} ({r['min'] / n:.0f}-{r['max'] / n:.0f}) "
          f"| {r['images_per_s']:.0f} | {'' if ratio is None else f'{ratio:.2f}x'} |"
      )
  return lines


def main(argv: Sequence[str]) -> Result:
  """Runs the benchmarks that `argv` asks for; prints and returns the results."""
  args = parse_args(argv)
  config = {k: v for k, v in vars(args).items() if k != "json_path"}
  config.update(
      backend=jax.default_backend(),
      device_count=jax.device_count(),
      compilation_cache_dir=jax.config.jax_compilation_cache_dir,
  )
  if config["compilation_cache_dir"] and not args.skip_model:
    print(
        "note: JAX's persistent compilation cache is on, so compile_s may be a cache hit",
        file=sys.stderr,
    )
  results: Result = {
      "config": config,
      "device": describe_device(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if not args.skip_model:
    results["jax"], batch = benchmark_jax(args)
    runners = {"keras": benchmark_keras, "torch": benchmark_torch}
    for name in args.compare:
      results[name] = runners[name](args, batch)
    results["ratios"] = ratios(results)
  if args.pipeline:
    results["pipeline"] = benchmark_pipeline(args)
  print(markdown_tables(results))
  if args.json_path:
    with open(args.json_path, "w") as f:
      json.dump(results, f, indent=2)
  return results


def run() -> None:
  """Console entry point (`mnv2-benchmark`): the same allocator as `main`."""
  allocator.use_huge_page_malloc()
  main(sys.argv[1:])


if __name__ == "__main__":
  run()
