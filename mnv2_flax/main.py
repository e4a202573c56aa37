"""Command line: train, evaluate or summarise MobileNetV2.

  python -m mnv2_flax.main --workdir=/tmp/digits                # embedded default
  python -m mnv2_flax.main --config=configs/imagenet.py --workdir=DIR
  python -m mnv2_flax.main --config=configs/imagenet.py --workdir=DIR --mode=eval
  python -m mnv2_flax.main --config=configs/cifar10.py --mode=summary

Re-running a train command with the same --workdir resumes from its newest
checkpoint. User errors (bad config values, missing data, unusable workdir or
checkpoint) print one line naming the key or path and exit with status 2.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

# Light imports only: console_main re-executes the process (allocator), so
# JAX, the model and the data pipeline are imported after it, where used.
from mnv2_flax import allocator, cli, errors
from mnv2_flax.cli import fail

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "config_lib.py"),
    "A config file (configs/*.py); by default the embedded digits config "
    "(config_lib.get_config). Override keys with --config.KEY=VALUE.",
    # An unknown --config.KEY then reaches config_lib.validate, which names it
    # in one line; ml_collections itself would raise a traceback.
    lock_config=False,
    accept_new_attributes=True,
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, results.json.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "summary"],
    "train (resumes if WORKDIR has checkpoints), eval (the newest "
    "checkpoint), summary (params and multiply-adds, no data).",
)
flags.DEFINE_string(
    "coordinator_address", None, "Multi-process: host:port of process 0 (see launch/)."
)
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_bool(
    "jax_distributed_auto",
    False,
    "Call jax.distributed.initialize() with cluster auto-detection "
    "(SLURM, TPU pods, Kubernetes).",
)


def quiet_library_info_logs(record: pylogging.LogRecord) -> bool:
  """Drops orbax's per-save INFO lines (dozens a checkpoint); keeps warnings."""
  return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def initialize_jax(config) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  if config.model.get("dtype") == "float64":  # Process-wide, before JAX computes anything.
    jax.config.update("jax_enable_x64", True)
  if FLAGS.coordinator_address:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      fail("--coordinator_address needs --num_processes and --process_id")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.jax_distributed_auto:
    jax.distributed.initialize()
  if jax.process_count() > 1 and jax.default_backend() == "cpu":
    # On CPU only process 0 hits the cache (per-process keys, process-0
    # writes), so it would reach the first collective a whole compile ahead,
    # past gloo's fixed 30 s rendezvous timeout.
    jax.config.update("jax_enable_compilation_cache", False)
  elif config.compilation_cache_dir:
    cache = os.path.expanduser(config.compilation_cache_dir)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def summary(config) -> dict[str, int]:
  from mnv2_flax import config_lib, models  # pylint: disable=g-import-not-at-top

  config_lib.validate(config, device_count=1)
  size = config.dataset.image_size
  channels = 1 if config.dataset.name in ("digits", "mnist") else 3
  model = models.create_model(config.model, config.dataset.num_classes)
  shape = (size, size, channels)
  return {
      **models.size(model, shape),
      "input_shape": list(shape),
      "num_classes": config.dataset.num_classes,
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  try:
    config.get("seed")  # config_flags loads the file on first access.
  except OSError as e:
    fail(" ".join(str(e).split()))
  if FLAGS.mode == "summary":
    info = summary(config)
    print(json.dumps(info))
    print(
        f"{info['params']:,} parameters, {info['batch_stats']:,} BatchNorm "
        f"statistics, {info['macs'] / 1e6:.1f} M multiply-adds per "
        f"{'x'.join(map(str, info['input_shape']))} image"
    )
    return
  logging.get_absl_handler().addFilter(quiet_library_info_logs)
  if not FLAGS.workdir:
    fail("--workdir is required for --mode=train and --mode=eval")
  initialize_jax(config)
  from mnv2_flax import train  # pylint: disable=g-import-not-at-top

  if FLAGS.mode == "eval":
    results = train.evaluate(config, FLAGS.workdir)
  else:
    results = train.train_and_evaluate(config, FLAGS.workdir)
    if "preempted_at_step" not in results:
      # Sweep reports compare model sizes: results.json carries them too.
      size = summary(config)
      results.update(num_params=size["params"], macs=size["macs"])
      train.write_results(FLAGS.workdir, results)
  logging.info("Results: %s", results)
  print(json.dumps(results))


def console_main() -> None:
  """Entry point of `python -m mnv2_flax.main` and `mnv2-train`."""
  allocator.use_huge_page_malloc()
  run()


def run() -> None:
  """Parses flags and runs; user errors become one line and exit status 2."""
  try:
    cli.run(main)
  except errors.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  console_main()
