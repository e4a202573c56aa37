"""Every knob of a run, with its default, and the checks run before training.

The files in `configs/` start from `base_config()` and change what their
recipe needs. Any key is overridable on the command line, e.g.
`--config.optimizer.learning_rate=0.1`.
"""

from __future__ import annotations

import os
import ml_collections

from mnv2_flax import data, layers, models
from mnv2_flax.errors import ConfigError  # pylint: disable=unused-import


def base_config() -> ml_collections.ConfigDict:
  """The embedded default: MobileNetV2 (width 0.5) on scikit-learn's digits."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "digits"  # One of data.DATASETS.
  config.dataset.image_size = 32  # Model input resolution (square).
  # Read by "synthetic" and --mode=summary; training on real data uses the
  # dataset's own class count.
  config.dataset.num_classes = 10
  config.dataset.data_dir = ""  # TFDS data_dir ("" = TFDS default).
  config.dataset.manual_dir = ""  # imagenet2012: where the ILSVRC tars are.
  config.dataset.root = ""  # imagefolder: a directory with train/ and test/.
  config.dataset.mean = (0.485, 0.456, 0.406)  # Normalisation, in [0, 1] units.
  config.dataset.std = (0.229, 0.224, 0.225)
  config.dataset.shuffle_buffer = 16_384
  config.dataset.crop_area_min = 0.08  # Random-resized-crop minimum area.
  config.dataset.eval_crop_fraction = 0.875  # Center crop, then resize.

  config.model = ml_collections.ConfigDict()
  config.model.width_multiplier = 0.5
  config.model.expansion = 6  # t of every block with t > 1 (the paper's 6).
  config.model.bottleneck = "linear"  # "linear" (paper) or "relu6" (ablation).
  config.model.stem_stride = 1
  config.model.stage_strides = models.PAPER_STAGE_STRIDES
  config.model.dropout_rate = 0.2
  config.model.padding = "symmetric"  # "symmetric" (torchvision) | "tf_same".
  config.model.bn_momentum = 0.9  # Running average decay (flax convention).
  config.model.bn_epsilon = 1e-5
  config.model.half_precision = False  # bf16 compute; params and BN stay f32.
  config.model.conv_impl = "auto"  # "auto" | "xla" | "taps"; see layers.py.
  config.model.remat = False  # Rematerialise each block to save memory.

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # "sgd" (momentum) | "rmsprop".
  config.optimizer.learning_rate = 0.1  # Peak lr at global_batch_size.
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.rmsprop_decay = 0.9
  config.optimizer.rmsprop_eps = 1e-3  # Inside the sqrt, as TensorFlow's.
  config.optimizer.schedule = "cosine"  # "cosine" | "exponential" | "constant".
  config.optimizer.warmup_epochs = 0.5
  config.optimizer.decay_rate = 0.98  # exponential: lr *= decay_rate ...
  config.optimizer.decay_epochs = 1.0  # ... every decay_epochs.
  config.optimizer.weight_decay = 5e-4  # L2, added to the gradient.
  # Which parameters get weight decay: "kernels" (conv + dense kernels),
  # "kernels_except_depthwise" (TF-slim's MobileNet default), "all".
  config.optimizer.weight_decay_mask = "kernels"
  config.optimizer.label_smoothing = 0.0
  config.optimizer.ema_decay = 0.0  # > 0 keeps an EMA of weights for eval.

  config.global_batch_size = 64
  config.eval_batch_size = 256  # Global; the last batch is padded, not dropped.
  config.num_epochs = 20.0
  config.num_train_steps = -1  # > 0 overrides num_epochs.
  config.log_every_steps = 100
  config.eval_every_steps = -1  # <= 0: evaluate only at the end.
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3  # The last k; the best by `best_metric` is kept too.
  config.best_metric = "top1"  # "" disables the best-checkpoint copy.
  # A checkpoints directory. --mode=eval evaluates it instead of WORKDIR's;
  # training starts from its weights when WORKDIR has no checkpoint yet
  # (fine-tuning: layers whose shape differs, e.g. the classifier, keep their
  # fresh init; the optimizer starts fresh).
  config.checkpoint_path = ""
  config.skip_nonfinite_updates = False
  config.compilation_cache_dir = os.path.join("~", ".cache", "mnv2_flax", "jax")
  config.profile_steps = 0  # > 0: trace this many steps after the first.
  return config


def get_config() -> ml_collections.ConfigDict:
  """Makes this module a config file: the CLI's default `--config`."""
  return base_config()


def _require(condition: bool, key: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"config.{key}: {message}")


def validate(config: ml_collections.ConfigDict, device_count: int) -> None:
  """Fails early, naming the key, on any value that cannot work."""
  m, o, d = config.model, config.optimizer, config.dataset
  _require(d.name in data.DATASETS, "dataset.name",
           f"unknown dataset {d.name!r}; choose one of {data.DATASETS}")
  _require(m.width_multiplier > 0, "model.width_multiplier",
           f"must be > 0, got {m.width_multiplier}")
  _require(m.expansion >= 1, "model.expansion", f"must be >= 1, got {m.expansion}")
  _require(m.bottleneck in models.BOTTLENECKS, "model.bottleneck",
           f"must be one of {models.BOTTLENECKS}, got {m.bottleneck!r}")
  _require(m.padding in layers.PADDINGS, "model.padding",
           f"must be one of {layers.PADDINGS}, got {m.padding!r}")
  _require(m.conv_impl in layers.CONV_IMPLS, "model.conv_impl",
           f"must be one of {layers.CONV_IMPLS}, got {m.conv_impl!r}")
  _require(len(m.stage_strides) == len(models.INVERTED_RESIDUAL_SETTING),
           "model.stage_strides",
           f"needs {len(models.INVERTED_RESIDUAL_SETTING)} strides, got "
           f"{len(m.stage_strides)}")
  _require(all(s in (1, 2) for s in (m.stem_stride, *m.stage_strides)),
           "model.stage_strides", "strides must be 1 or 2")
  _require(0 <= m.dropout_rate < 1, "model.dropout_rate",
           f"must be in [0, 1), got {m.dropout_rate}")
  factor = models.downsampling_factor(m.stem_stride, m.stage_strides)
  _require(d.image_size >= factor, "dataset.image_size",
           f"{d.image_size} is smaller than the model's total stride {factor}")
  _require(o.name in ("sgd", "rmsprop"), "optimizer.name",
           f"must be 'sgd' or 'rmsprop', got {o.name!r}")
  _require(o.learning_rate > 0, "optimizer.learning_rate",
           f"must be > 0, got {o.learning_rate}")
  _require(o.schedule in ("cosine", "exponential", "constant"),
           "optimizer.schedule", f"unknown schedule {o.schedule!r}")
  _require(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
  _require(o.weight_decay_mask in ("kernels", "kernels_except_depthwise", "all"),
           "optimizer.weight_decay_mask", f"unknown mask {o.weight_decay_mask!r}")
  _require(0 <= o.ema_decay < 1, "optimizer.ema_decay", "must be in [0, 1)")
  _require(0 <= o.label_smoothing < 1, "optimizer.label_smoothing",
           "must be in [0, 1)")
  for key in ("global_batch_size", "eval_batch_size"):
    _require(config[key] > 0, key, f"must be > 0, got {config[key]}")
    _require(config[key] % device_count == 0, key,
             f"{config[key]} is not divisible by the {device_count} devices")
  _require(config.num_train_steps > 0 or config.num_epochs > 0, "num_epochs",
           "must be > 0 when num_train_steps is not set")
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _require(config[key] > 0, key, f"must be > 0, got {config[key]}")
  _require(config.best_metric in ("", "top1", "top5", "loss"), "best_metric",
           f"must be one of '', 'top1', 'top5', 'loss', got {config.best_metric!r}")
