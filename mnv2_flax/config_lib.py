"""Every knob of a run, declared once with its default and its valid values.

`KEYS` is the table: each entry names a key, its default and the check its
value must pass. `base_config()` is built from it, and `validate` checks every
key against it before training, so no key exists without its check.

The files in `configs/` start from `base_config()` and change what their
recipe needs. Any key is overridable on the command line, e.g.
`--config.optimizer.learning_rate=0.1`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections

from mnv2_flax import data, layers, models
from mnv2_flax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Check:
  """The values a key accepts: `accepts` tests one, `describe` says which."""

  describe: str  # Completes "must be ...", e.g. "a float in [0, 1)".
  accepts: Callable[[Any], bool]


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key: its dotted name, its default and the check of its value."""

  name: str
  default: Any
  check: Check


def _alternatives(items: Sequence[Any]) -> str:
  """Joins items as "x", "x or y", "x, y or z"."""
  words = [str(item) for item in items]
  return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _choice(choices: Sequence[Any]) -> Check:
  # The type must match too: True == 1, but a bool is not a stride.
  return Check(
      _alternatives([repr(c) for c in choices]),
      lambda v: any(type(v) is type(c) and v == c for c in choices),
  )


def _either(first: Check, second: Check) -> Check:
  return Check(
      f"{first.describe} or {second.describe}", lambda v: first.accepts(v) or second.accepts(v)
  )


def _int(low: int | None = None) -> Check:
  def accepts(value: Any) -> bool:
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return is_int and (low is None or value >= low)

  return Check("an int" if low is None else f"an int >= {low}", accepts)


def _float(
    low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Check:
  """A finite number (ints too: a config file may write `= 5`) from `low`,
  excluded if `low_open`, to `high` if given, excluded if `high_open`."""
  if high is None:
    bounds = f"{'>' if low_open else '>='} {low}"
  else:
    bounds = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

  def accepts(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    above = value > low if low_open else value >= low
    below = high is None or (value < high if high_open else value <= high)
    return math.isfinite(value) and above and below

  return Check(f"a float {bounds}", accepts)


def _tuple(item: Check, lengths: Sequence[int]) -> Check:
  return Check(
      f"a tuple of {_alternatives(lengths)} entries, each {item.describe}",
      lambda v: (
          isinstance(v, (tuple, list)) and len(v) in lengths and all(item.accepts(x) for x in v)
      ),
  )


_BOOL = Check("a bool", lambda v: isinstance(v, bool))
_TEXT = Check("a string", lambda v: isinstance(v, str))
_POSITIVE = _float(0, low_open=True)
_FRACTION = _float(0, 1, high_open=True)  # Momenta, decays, dropout, smoothing.
_STRIDE = _choice((1, 2))

KEYS: tuple[Key, ...] = (
    Key("seed", 0, _int(low=0)),
    Key("dataset.name", "digits", _choice(data.DATASETS)),
    Key("dataset.image_size", 32, _int(low=1)),  # Model input resolution (square).
    # > 0: train on the first that many training examples only (digits, MNIST,
    # CIFAR-10; a harder task for ablations). 0: all of them.
    Key("dataset.train_examples", 0, _int(low=0)),
    # Read by "synthetic" and --mode=summary; training on real data uses the
    # dataset's own class count.
    Key("dataset.num_classes", 10, _int(low=2)),
    Key("dataset.data_dir", "", _TEXT),  # TFDS data_dir ("" = TFDS default).
    Key("dataset.manual_dir", "", _TEXT),  # imagenet2012: where the ILSVRC tars are.
    # imagefolder: a directory with train/ and/or test/ (or val/).
    Key("dataset.root", "", _TEXT),
    # Normalisation, in [0, 1] units; one entry per image channel.
    Key("dataset.mean", (0.485, 0.456, 0.406), _tuple(_float(0, 1), (1, 3))),
    Key("dataset.std", (0.229, 0.224, 0.225), _tuple(_POSITIVE, (1, 3))),
    # imagefolder, imagenet2012: Grain worker processes decoding images; -1:
    # one per CPU core, 0: decode in the training process (no prefetch).
    Key("dataset.workers", -1, _int(low=-1)),
    # Random-resized-crop minimum area.
    Key("dataset.crop_area_min", 0.08, _float(0, 1, low_open=True)),
    # Center crop, then resize.
    Key("dataset.eval_crop_fraction", 0.875, _float(0, 1, low_open=True)),
    # Evaluation geometry: "crop" (the centre square of eval_crop_fraction,
    # resized) or "stretch" (the whole image resized, aspect ratio not kept:
    # what Keras' image_dataset_from_directory feeds a fine-tuned model).
    Key("dataset.eval_resize", "crop", _choice(("crop", "stretch"))),
    Key("model.width_multiplier", 0.5, _POSITIVE),
    # Blocks per stage: ceil(n * depth_multiplier) of the paper's n, at least
    # one (1: the paper's 17 blocks; 0.25: one per stage, 7 blocks).
    Key("model.depth_multiplier", 1.0, _POSITIVE),
    # t of every block with t > 1 (the paper's 6).
    Key("model.expansion", 6, _int(low=1)),
    # "linear" (paper) or "relu6" (ablation).
    Key("model.bottleneck", "linear", _choice(models.BOTTLENECKS)),
    # Where the shortcut goes (Figure 6b): "bottleneck" (paper) | "expansion" | "none".
    Key("model.residual", "bottleneck", _choice(models.RESIDUALS)),
    # Each residual branch's last BatchNorm starts with scale 0 (an identity):
    # tames BatchNorm's gradient explosion at initialisation (docs/ablations.md).
    Key("model.zero_init_residual", True, _BOOL),
    Key("model.stem_stride", 1, _STRIDE),
    Key(
        "model.stage_strides",
        models.PAPER_STAGE_STRIDES,
        _tuple(_STRIDE, (len(models.INVERTED_RESIDUAL_SETTING),)),
    ),
    Key("model.dropout_rate", 0.2, _FRACTION),
    # "symmetric" (torchvision) | "tf_same".
    Key("model.padding", "symmetric", _choice(layers.PADDINGS)),
    # Running average decay (flax convention).
    Key("model.bn_momentum", 0.9, _FRACTION),
    Key("model.bn_epsilon", 1e-5, _POSITIVE),
    # Compute dtype: "float32", "bfloat16" (params and BatchNorm stay
    # float32) or "float64" (XLA's convolutions; for exact comparisons, e.g.
    # of device layouts: summation order then moves results by ~1e-12).
    Key("model.dtype", "float32", _choice(tuple(models.DTYPES))),
    # "auto" | "xla" | "taps"; see layers.py.
    Key("model.conv_impl", "auto", _choice(layers.CONV_IMPLS)),
    Key("model.remat", False, _BOOL),  # Rematerialise each block to save memory.
    # What the model outputs: "classifier" (logits of dataset.num_classes) or
    # "features" (the pooled features before the classifier, which it lacks:
    # timm's num_classes=0; dataset.num_classes is then unused).
    Key("model.head", "classifier", _choice(models.HEADS)),
    # "sgd" (momentum) | "rmsprop".
    Key("optimizer.name", "sgd", _choice(("sgd", "rmsprop"))),
    Key("optimizer.learning_rate", 0.1, _POSITIVE),  # Peak lr at global_batch_size.
    Key("optimizer.momentum", 0.9, _FRACTION),
    Key("optimizer.nesterov", True, _BOOL),
    Key("optimizer.rmsprop_decay", 0.9, _FRACTION),
    # Inside the sqrt, as TensorFlow's.
    Key("optimizer.rmsprop_eps", 1e-3, _POSITIVE),
    # "cosine" | "exponential" | "constant".
    Key("optimizer.schedule", "cosine", _choice(("cosine", "exponential", "constant"))),
    Key("optimizer.warmup_epochs", 0.5, _float(0)),
    # exponential: lr *= decay_rate ...
    Key("optimizer.decay_rate", 0.98, _float(0, 1, low_open=True)),
    Key("optimizer.decay_epochs", 1.0, _POSITIVE),  # ... every decay_epochs.
    Key("optimizer.weight_decay", 5e-4, _float(0)),  # L2, added to the gradient.
    # Which parameters get weight decay: "kernels" (conv + dense kernels),
    # "kernels_except_depthwise" (TF-slim's MobileNet default), "all".
    Key(
        "optimizer.weight_decay_mask",
        "kernels",
        _choice(("kernels", "kernels_except_depthwise", "all")),
    ),
    Key("optimizer.label_smoothing", 0.0, _FRACTION),
    # > 0 keeps an EMA of weights for eval.
    Key("optimizer.ema_decay", 0.0, _FRACTION),
    Key("global_batch_size", 64, _int(low=1)),
    # Global; the last batch is padded, not dropped.
    Key("eval_batch_size", 256, _int(low=1)),
    Key("num_epochs", 20.0, _float(0)),
    # > 0 overrides num_epochs.
    Key("num_train_steps", -1, _either(_choice((-1,)), _int(low=1))),
    Key("log_every_steps", 100, _int(low=1)),
    # <= 0: evaluate only at the end.
    Key("eval_every_steps", -1, _int()),
    Key("checkpoint_every_steps", 1000, _int(low=1)),
    # The last k; the best by `best_metric` is kept too.
    Key("keep_checkpoints", 3, _int(low=1)),
    # "" disables the best-checkpoint copy.
    Key("best_metric", "top1", _choice(("", "top1", "top5", "loss"))),
    # A checkpoints directory. --mode=eval evaluates it instead of WORKDIR's;
    # training starts from its weights when WORKDIR has no checkpoint yet
    # (fine-tuning: layers whose shape differs, e.g. the classifier, keep their
    # fresh init; the optimizer starts fresh).
    Key("checkpoint_path", "", _TEXT),
    # Fine-tuning (with checkpoint_path). "backbone": train the classifier
    # only (every other weight and the BatchNorm statistics stay as loaded);
    # "none": train everything.
    Key("finetune.freeze", "none", _choice(("none", "backbone"))),
    # Learning rate of every non-classifier weight, as a multiple of the
    # classifier's (e.g. 0.1: the pretrained features move slowly).
    Key("finetune.backbone_lr_multiplier", 1.0, _float(0)),
    # BatchNorm normalises with the loaded running statistics and never
    # updates them (small batches, or a target set unlike the source's).
    Key("finetune.freeze_batch_stats", False, _BOOL),
    Key("skip_nonfinite_updates", False, _BOOL),
    Key("compilation_cache_dir", os.path.join("~", ".cache", "mnv2_flax", "jax"), _TEXT),
    # > 0: trace this many steps after the first.
    Key("profile_steps", 0, _int(low=0)),
    # Test-only: a known bug that the device-layout tests must catch, so that
    # they are seen to fail. "batch_stats_per_device": BatchNorm statistics
    # of each device's share of the batch instead of the global batch's;
    # "drop_shard": the batch shard of each process's last device arrives
    # as zeros (with one device per process: nothing changes).
    Key("testing.fault", "", _choice(("", "batch_stats_per_device", "drop_shard"))),
)


# What a checkpoint's settings file records (checkpoint.write_settings).
# The keys weights were trained with and need to compute the same function:
# applied whenever weights are loaded, fine-tuning included.
WEIGHT_KEYS = (
    "model.width_multiplier",
    "model.depth_multiplier",
    "model.expansion",
    "model.bottleneck",
    "model.residual",
    "model.padding",
    "model.bn_epsilon",
    "dataset.mean",
    "dataset.std",
)
# The recipe they were evaluated with: applied to evaluate, export and predict,
# not to fine-tune (which may pick its own resolution, strides, classes and head).
RECIPE_KEYS = (
    "model.stem_stride",
    "model.stage_strides",
    "dataset.image_size",
    "dataset.eval_crop_fraction",
    "dataset.eval_resize",
    "dataset.num_classes",
    "model.head",
)


def settings_of(
    config: ml_collections.ConfigDict,
    num_classes: int,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
) -> dict[str, Any]:
  """The WEIGHT_KEYS and RECIPE_KEYS values of `config` (JSON-ready), with
  the class count and normalisation the data really had, and dataset.name
  (recorded, never applied: it tells export which data calibrates int8 and
  whether evaluation crops)."""
  values = dict(_leaves(config))
  values["dataset.num_classes"] = num_classes
  if normalization is not None:
    values["dataset.mean"], values["dataset.std"] = normalization
  return {
      key: list(values[key]) if isinstance(values[key], (tuple, list)) else values[key]
      for key in WEIGHT_KEYS + RECIPE_KEYS + ("dataset.name",)
  }


def apply_settings(
    config: ml_collections.ConfigDict, settings: dict[str, Any], keys: Sequence[str]
) -> tuple[ml_collections.ConfigDict, list[str]]:
  """A copy of `config` with `keys` set from a checkpoint's `settings`; also
  returns "key: old -> new" for each value that changed."""
  config = config.copy_and_resolve_references()
  defaults = {key.name: key.default for key in KEYS}
  changed = []
  for key in keys:
    if key not in settings:
      continue
    value = settings[key]
    if isinstance(defaults[key], tuple):
      value = tuple(value)
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    if node[leaf] != value:
      changed.append(f"{key}: {node[leaf]!r} -> {value!r}")
      node[leaf] = value
  return config, changed


def base_config() -> ml_collections.ConfigDict:
  """The embedded default: MobileNetV2 (width 0.5) on scikit-learn's digits."""
  config = ml_collections.ConfigDict()
  for key in KEYS:
    *parents, leaf = key.name.split(".")
    node = config
    for parent in parents:
      if parent not in node:
        node[parent] = ml_collections.ConfigDict()
      node = node[parent]
    node[leaf] = key.default
  return config


def get_config() -> ml_collections.ConfigDict:
  """Makes this module a config file: the CLI's default `--config`."""
  return base_config()


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted name, value) of every non-dict value in `config`."""
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{name}.")
    else:
      yield f"{prefix}{name}", value


def _require(condition: bool, key: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"config.{key}: {message}")


def validate(config: ml_collections.ConfigDict, device_count: int) -> None:
  """Fails early, naming the key, on any value that cannot work."""
  values = dict(_leaves(config))
  declared = {key.name for key in KEYS}
  for name in values:
    _require(
        name in declared,
        name,
        f"unknown key (set to {values[name]!r}); mnv2_flax/config_lib.py declares every key",
    )
  for key in KEYS:
    _require(key.name in values, key.name, "is missing")
    value = values[key.name]
    _require(key.check.accepts(value), key.name, f"must be {key.check.describe}, got {value!r}")

  # What one key cannot decide alone.
  m, d = config.model, config.dataset
  factor = models.downsampling_factor(m.stem_stride, m.stage_strides)
  _require(
      d.image_size >= factor,
      "dataset.image_size",
      f"{d.image_size} is smaller than the model's total stride {factor}",
  )
  _require(
      len(d.std) == len(d.mean),
      "dataset.std",
      f"has {len(d.std)} entries but dataset.mean has {len(d.mean)}",
  )
  for key in ("global_batch_size", "eval_batch_size"):
    _require(
        config[key] % device_count == 0,
        key,
        f"{config[key]} is not divisible by the {device_count} devices",
    )
  _require(
      m.dtype != "float64" or m.conv_impl != "taps",
      "model.conv_impl",
      "'taps' computes in float32; model.dtype='float64' needs 'xla' or 'auto'",
  )
  _require(
      config.finetune.freeze == "none" or bool(config.checkpoint_path),
      "finetune.freeze",
      f"{config.finetune.freeze!r} would freeze random weights: set checkpoint_path",
  )
  _require(
      config.num_train_steps > 0 or config.num_epochs > 0,
      "num_epochs",
      f"must be > 0 when num_train_steps is not set, got {config.num_epochs}",
  )
