"""Imports pretrained MobileNetV2 weights from Keras, torchvision, timm and TF-slim.

  python -m mnv2_flax.convert --source=keras --weights=imagenet --out=DIR
  python -m mnv2_flax.convert --source=torchvision --weights=mobilenet_v2-b0353104.pth \
      --weights_version=V1 --out=DIR
  python -m mnv2_flax.convert --source=timm --weights=model.safetensors \
      --width_multiplier=1.4 --out=DIR
  python -m mnv2_flax.convert --source=slim --weights=mobilenet_v2_1.0_224.ckpt --out=DIR

DIR is then a checkpoint with its settings file: `python -m mnv2_flax.main
--mode=eval --config.checkpoint_path=DIR`, fine-tuning, export and predict
need no hand-set flag. In Python, `model, variables = from_keras(keras_model)`
(or `from_torchvision`, `from_timm`, `from_slim`) gives a model whose
`model.apply(variables, x, train=False)` equals the source's logits.

Every source is one table of (our variable, source name, layout transform)
over plain numpy dicts, so this module imports without TensorFlow, torch or
timm; those are imported only by the functions that read their formats. A
source weight that is missing, of the wrong shape or unknown (left over) is
refused with one line naming it: a wrong width or a different architecture
never becomes a silently wrong model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mnv2_flax import checkpoint, config_lib, models
from mnv2_flax.cli import fail
from mnv2_flax.errors import ConfigError

SOURCES = ("keras", "torchvision", "timm", "slim")
# Blocks per stage (Table 2's n) and in all.
STAGE_DEPTHS = tuple(n for _, _, n, _ in models.INVERTED_RESIDUAL_SETTING)
NUM_BLOCKS = sum(STAGE_DEPTHS)
# The widths of the published ImageNet weights (Keras, TF-slim, timm).
PUBLISHED_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Inputs scaled to [-1, 1] (Keras' and TF-slim's preprocessing), in [0, 1] units.
TF_MEAN = TF_STD = (0.5, 0.5, 0.5)
# torchvision's two ImageNet weight sets resize to 256 (V1) or 232 (V2)
# before their 224 center crop.
TORCHVISION_CROP_FRACTIONS = {"V1": 224 / 256, "V2": 224 / 232}

Transform = Callable[[np.ndarray], np.ndarray]


class ConversionError(ConfigError):
  """Weights that do not fit the MobileNetV2 they are imported into."""


# --- layout transforms: source layout -> ours (HWIO kernels, (k, k, 1, C) depthwise) ---


def _same(a: np.ndarray) -> np.ndarray:
  return a


def _oihw(a: np.ndarray) -> np.ndarray:
  """PyTorch conv weights (O, I, H, W), depthwise (C, 1, H, W) too."""
  return a.transpose(2, 3, 1, 0)


def _hwc1(a: np.ndarray) -> np.ndarray:
  """TensorFlow depthwise kernels (H, W, C, 1)."""
  return a.transpose(0, 1, 3, 2)


def _transpose(a: np.ndarray) -> np.ndarray:
  """PyTorch Linear weights (out, in)."""
  return a.T


def _slim_logits(a: np.ndarray) -> np.ndarray:
  """TF-slim's 1x1 conv classifier, less class 0 (background)."""
  return a.reshape(a.shape[-2:])[:, 1:]


def _slim_logits_all(a: np.ndarray) -> np.ndarray:
  return a.reshape(a.shape[-2:])


def _drop_first(a: np.ndarray) -> np.ndarray:
  return a[1:]


# --- the tables -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
  """One variable: ours ("params/block1/expand/kernel"), the source's name and
  the transform from the source's layout to ours."""

  ours: str
  source: str
  transform: Transform = _same


def our_layers() -> Iterator[tuple[str, str]]:
  """(layer path, kind) of every layer with weights, kind one of conv,
  depthwise, bn, dense; block 0 (t=1) has no expansion."""
  yield "stem", "conv"
  yield "stem_bn", "bn"
  for i in range(NUM_BLOCKS):
    for part in ("depthwise", "project") if i == 0 else ("expand", "depthwise", "project"):
      yield f"block{i}/{part}", "depthwise" if part == "depthwise" else "conv"
      yield f"block{i}/{part}_bn", "bn"
  yield "head", "conv"
  yield "head_bn", "bn"
  yield "classifier", "dense"


def stage_and_index(block: int) -> tuple[int, int]:
  """(stage, index in stage) of block `block` (timm's `blocks.S.J`)."""
  for stage, depth in enumerate(STAGE_DEPTHS):
    if block < depth:
      return stage, block
    block -= depth
  raise ValueError(f"no block {block}")


_OUR_BN = (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var"))
_TF_BN = ("gamma", "beta", "moving_mean", "moving_variance")
_TORCH_BN = ("weight", "bias", "running_mean", "running_var")


def _table(
    layer_name: Callable[[str], str],
    variables: Mapping[str, Sequence[tuple[str, str, Transform]]],
    sep: str,
) -> tuple[Entry, ...]:
  """Entries of every layer: `layer_name` maps our layer path to the
  source's; `variables[kind]` lists (our "collection/name", the source's
  variable name, transform)."""
  return tuple(
      Entry(f"{ours.split('/')[0]}/{layer}/{ours.split('/')[1]}", layer_name(layer) + sep + name, t)
      for layer, kind in our_layers()
      for ours, name, t in variables[kind]
  )


def _bn(names: Sequence[str]) -> tuple[tuple[str, str, Transform], ...]:
  return tuple((f"{c}/{v}", name, _same) for (c, v), name in zip(_OUR_BN, names))


def _split(layer: str) -> tuple[int, str]:
  """ "block3/expand_bn" -> (3, "expand_bn")."""
  block, part = layer.split("/")
  return int(block.removeprefix("block")), part


def _keras_layer(layer: str) -> str:
  fixed = {"stem": "Conv1", "stem_bn": "bn_Conv1", "head": "Conv_1", "head_bn": "Conv_1_bn"}
  if layer in fixed:
    return fixed[layer]
  if layer == "classifier":
    return "predictions"
  i, part = _split(layer)
  part = part.replace("_bn", "_BN")
  return f"expanded_conv_{part}" if i == 0 else f"block_{i}_{part}"


def _torchvision_layer(layer: str) -> str:
  fixed = {
      "stem": "features.0.0",
      "stem_bn": "features.0.1",
      "head": f"features.{NUM_BLOCKS + 1}.0",
      "head_bn": f"features.{NUM_BLOCKS + 1}.1",
      "classifier": "classifier.1",
  }
  if layer in fixed:
    return fixed[layer]
  i, part = _split(layer)
  parts = (
      {"depthwise": "0.0", "depthwise_bn": "0.1", "project": "1", "project_bn": "2"}
      if i == 0
      else {
          "expand": "0.0",
          "expand_bn": "0.1",
          "depthwise": "1.0",
          "depthwise_bn": "1.1",
          "project": "2",
          "project_bn": "3",
      }
  )
  return f"features.{i + 1}.conv.{parts[part]}"


def _timm_layer(layer: str) -> str:
  fixed = {
      "stem": "conv_stem",
      "stem_bn": "bn1",
      "head": "conv_head",
      "head_bn": "bn2",
      "classifier": "classifier",
  }
  if layer in fixed:
    return fixed[layer]
  i, part = _split(layer)
  stage, j = stage_and_index(i)
  parts = (  # Block 0 is timm's DepthwiseSeparableConv.
      {"depthwise": "conv_dw", "depthwise_bn": "bn1", "project": "conv_pw", "project_bn": "bn2"}
      if i == 0
      else {
          "expand": "conv_pw",
          "expand_bn": "bn1",
          "depthwise": "conv_dw",
          "depthwise_bn": "bn2",
          "project": "conv_pwl",
          "project_bn": "bn3",
      }
  )
  return f"blocks.{stage}.{j}.{parts[part]}"


def _slim_layer(layer: str) -> str:
  fixed = {
      "stem": "Conv",
      "stem_bn": "Conv/BatchNorm",
      "head": "Conv_1",
      "head_bn": "Conv_1/BatchNorm",
      "classifier": "Logits/Conv2d_1c_1x1",
  }
  if layer in fixed:
    return "MobilenetV2/" + fixed[layer]
  i, part = _split(layer)
  scope = "expanded_conv" if i == 0 else f"expanded_conv_{i}"
  return f"MobilenetV2/{scope}/{part.replace('_bn', '/BatchNorm')}"


_TORCH_VARIABLES = {
    "conv": (("params/kernel", "weight", _oihw),),
    "depthwise": (("params/kernel", "weight", _oihw),),
    "bn": _bn(_TORCH_BN),
    "dense": (("params/kernel", "weight", _transpose), ("params/bias", "bias", _same)),
}


def table(source: str, background: bool = True) -> tuple[Entry, ...]:
  """The mapping of `source` (one of SOURCES). `background`: a TF-slim
  classifier's 1001 classes start with "background", dropped here."""
  if source == "keras":
    variables = {
        "conv": (("params/kernel", "kernel", _same),),
        "depthwise": (("params/kernel", "kernel", _hwc1),),
        "bn": _bn(_TF_BN),
        "dense": (("params/kernel", "kernel", _same), ("params/bias", "bias", _same)),
    }
    return _table(_keras_layer, variables, "/")
  if source == "torchvision":
    return _table(_torchvision_layer, _TORCH_VARIABLES, ".")
  if source == "timm":
    return _table(_timm_layer, _TORCH_VARIABLES, ".")
  if source == "slim":
    logits = (_slim_logits, _drop_first) if background else (_slim_logits_all, _same)
    variables = {
        "conv": (("params/kernel", "weights", _same),),
        "depthwise": (("params/kernel", "depthwise_weights", _hwc1),),
        "bn": _bn(_TF_BN),
        "dense": (
            ("params/kernel", "weights", logits[0]),
            ("params/bias", "biases", logits[1]),
        ),
    }
    return _table(_slim_layer, variables, "/")
  raise ConversionError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")


# --- settings and the model ---------------------------------------------------------


def settings(
    source: str,
    width_multiplier: float,
    num_classes: int,
    image_size: int = 224,
    eval_crop_fraction: float | None = None,
    weights_version: str = "V1",
) -> dict[str, Any]:
  """The checkpoint settings (config_lib.WEIGHT_KEYS + RECIPE_KEYS) of
  weights from `source`: what the model needs to compute the source's
  function, and the evaluation recipe the weights were published with.
  `weights_version` picks torchvision's crop (V1: resize 256, V2: 232)."""
  if source not in SOURCES:
    raise ConversionError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
  tf_like = source in ("keras", "slim")
  if eval_crop_fraction is None:
    if source == "torchvision":
      if weights_version not in TORCHVISION_CROP_FRACTIONS:
        raise ConversionError(
            f"--weights_version must be one of {', '.join(TORCHVISION_CROP_FRACTIONS)}, "
            f"got {weights_version!r}"
        )
      eval_crop_fraction = TORCHVISION_CROP_FRACTIONS[weights_version]
    else:
      eval_crop_fraction = 0.875
  config = config_lib.base_config()
  config.model.width_multiplier = width_multiplier
  config.model.expansion = 6
  config.model.bottleneck = "linear"
  config.model.residual = "bottleneck"
  config.model.padding = "tf_same" if tf_like else "symmetric"
  config.model.bn_epsilon = 1e-3 if tf_like else 1e-5
  config.model.stem_stride = 2
  config.model.stage_strides = models.PAPER_STAGE_STRIDES
  config.dataset.mean = TF_MEAN if tf_like else IMAGENET_MEAN
  config.dataset.std = TF_STD if tf_like else IMAGENET_STD
  config.dataset.image_size = image_size
  config.dataset.eval_crop_fraction = eval_crop_fraction
  config.dataset.num_classes = num_classes
  config.dataset.name = "imagenet2012"  # What the published weights were trained on.
  config_lib.validate(config, device_count=1)
  return config_lib.settings_of(config, num_classes)


def expected_shapes(model: models.MobileNetV2) -> dict[str, tuple[int, ...]]:
  """ "params/stem/kernel" -> shape of every variable of `model` (RGB input)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )
  return {
      "/".join(str(k.key) for k in path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]
  }


def convert_arrays(
    arrays: Mapping[str, np.ndarray],
    entries: Sequence[Entry],
    model: models.MobileNetV2,
    ignore: Callable[[str], bool] = lambda name: False,
    what: str = "",
) -> dict[str, Any]:
  """{"params", "batch_stats"} of `model` from the source's `arrays` through
  `entries`. Every entry's name must be in `arrays` with the shape the model
  needs, and every name of `arrays` must be consumed or `ignore`d."""
  what = what or "the weights"
  shapes = expected_shapes(model)
  uncovered = sorted(shapes.keys() - {e.ours for e in entries})
  if uncovered:  # A table that does not describe the model: a bug here.
    raise ConversionError(f"no source variable maps to {uncovered[0]} ({len(uncovered)} in all)")
  variables: dict[str, Any] = {}
  for entry in entries:
    if entry.source not in arrays:
      raise ConversionError(
          f"{what} lack {entry.source} (for {entry.ours}): not a MobileNetV2 of this layout"
      )
    value = np.asarray(arrays[entry.source])
    converted = np.ascontiguousarray(entry.transform(value), dtype=np.float32)
    expected = shapes[entry.ours]
    if converted.shape != expected:
      raise ConversionError(
          f"{entry.source} has shape {value.shape}, but width "
          f"{model.width_multiplier}'s {entry.ours} needs {expected} after the layout change "
          f"(got {converted.shape}); is the width multiplier right?"
      )
    node = variables
    *parents, leaf = entry.ours.split("/")
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = converted
  consumed = {e.source for e in entries}
  unknown = sorted(name for name in arrays if name not in consumed and not ignore(name))
  if unknown:
    raise ConversionError(
        f"{what} hold {len(unknown)} unknown weights, e.g. {unknown[0]}: not a MobileNetV2 of "
        "this layout"
    )
  return variables


def _convert(
    source: str,
    arrays: Mapping[str, np.ndarray],
    width_multiplier: float,
    num_classes: int,
    *,
    entries: Sequence[Entry] | None = None,
    ignore: Callable[[str], bool] = lambda name: False,
    what: str = "",
    conv_impl: str = "xla",
) -> tuple[models.MobileNetV2, dict[str, Any]]:
  # The recipe keys (image size, crop) do not change the model.
  model, _ = checkpoint.model_from_settings(
      settings(source, width_multiplier, num_classes), conv_impl
  )
  entries = table(source) if entries is None else entries
  return model, convert_arrays(arrays, entries, model, ignore, what)


def _num_classes(arrays: Mapping[str, np.ndarray], name: str, axis: int, what: str) -> int:
  if name not in arrays:
    raise ConversionError(f"{what} lack {name}: a MobileNetV2 with its classifier is needed")
  return int(np.shape(arrays[name])[axis])


def _to_numpy(value: Any) -> np.ndarray:
  """A numpy array of a numpy array or torch tensor (without importing torch)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


# --- Keras ------------------------------------------------------------------------


def _channels(alpha: float, keras: bool) -> dict[str, int]:
  """Output channels of each layer `alpha` scales, by Keras' rounding or ours."""
  block_width = (lambda c: int(c * alpha)) if keras else (lambda c: c * alpha)
  channels = {"Conv1": models.make_divisible(32 * alpha)}
  block = 0
  for _, c, n, _ in models.INVERTED_RESIDUAL_SETTING:
    for _ in range(n):
      name = "expanded_conv_project" if block == 0 else f"block_{block}_project"
      channels[name] = models.make_divisible(block_width(c))
      block += 1
  channels["Conv_1"] = models.make_divisible(1280 * max(1.0, alpha))
  return channels


def check_keras_width(alpha: float) -> None:
  """Refuses a Keras alpha whose channels differ from ours: Keras rounds block
  outputs as `_make_divisible(int(filters * alpha), 8)`, truncating first
  (TF-slim, torchvision and this model do not). Every published alpha
  agrees; e.g. 0.28, 0.56 and 1.12 do not, and no width here builds those."""
  ours = _channels(alpha, keras=False)
  for name, channels in _channels(alpha, keras=True).items():
    if channels != ours[name]:
      raise ConversionError(
          f"Keras' alpha={alpha} gives {name} {channels} channels (it truncates "
          f"int(filters * alpha) before rounding), width_multiplier={alpha} here gives "
          f"{ours[name]}: this alpha has no equivalent"
      )


def keras_arrays(keras_model: Any) -> dict[str, np.ndarray]:
  """ "layer/variable" -> value of every weight of a Keras model (Keras 3; tf.keras
  2 names such as "kernel:0" and "depthwise_kernel" are normalised)."""
  arrays = {}
  for layer in keras_model.layers:
    for weight in layer.weights:
      name = weight.name.split("/")[-1].split(":")[0]
      if name == "depthwise_kernel":
        name = "kernel"
      arrays[f"{layer.name}/{name}"] = np.asarray(weight.numpy())
  return arrays


def keras_alpha(keras_model: Any) -> float | None:
  """The alpha in a `keras.applications.MobileNetV2`'s default name
  ("mobilenetv2_1.00_224"), or None."""
  parts = str(getattr(keras_model, "name", "")).split("_")
  if len(parts) == 3 and parts[0] == "mobilenetv2":
    try:
      return float(parts[1])
    except ValueError:
      return None
  return None


def from_keras(
    keras_model: Any,
    width_multiplier: float | None = None,
    conv_impl: str = "xla",
) -> tuple[models.MobileNetV2, dict[str, Any]]:
  """(model, variables) of a `keras.applications.MobileNetV2` (include_top=True;
  the model returns the logits before Keras' softmax). The width is the
  model's alpha, read from its default name unless given."""
  if width_multiplier is None:
    width_multiplier = keras_alpha(keras_model)
    if width_multiplier is None:
      raise ConversionError(
          f"cannot read alpha from the Keras model's name {keras_model.name!r}: pass "
          "width_multiplier"
      )
  check_keras_width(width_multiplier)
  arrays = keras_arrays(keras_model)
  num_classes = _num_classes(arrays, "predictions/kernel", 1, "the Keras model")
  return _convert(
      "keras",
      arrays,
      width_multiplier,
      num_classes,
      what="the Keras model",
      conv_impl=conv_impl,
  )


def load_keras(weights: str, width_multiplier: float, image_size: int) -> Any:
  """keras.applications.MobileNetV2 with `weights` ("imagenet": Keras
  downloads them; or a Keras weights file), logits out."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import keras  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"--source=keras needs keras ({e})") from e
  check_keras_width(width_multiplier)
  try:
    return keras.applications.MobileNetV2(
        alpha=width_multiplier,
        input_shape=(image_size, image_size, 3),
        weights=weights,
        include_top=True,
        classifier_activation=None,
    )
  except Exception as e:  # pylint: disable=broad-except
    message = " ".join(str(e).split())
    if weights == "imagenet":
      message = f"could not get Keras' ImageNet weights (alpha={width_multiplier}): {message}"
    raise ConversionError(message) from e


# --- torchvision and timm ---------------------------------------------------------------


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict from a .pth/.pt file (torch, cpu, weights only) or a
  .safetensors file (no torch needed), as numpy arrays."""
  if not os.path.exists(path):
    raise ConversionError(f"--weights {path} does not exist")
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConversionError(f"reading {path} needs safetensors: pip install safetensors") from e
    return dict(load_file(path))
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"reading {path} needs torch (or give a .safetensors file)") from e
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"--weights {path} is unreadable: {' '.join(str(e).split())}") from e
  for key in ("state_dict", "model"):  # Training checkpoints wrap the state dict.
    if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
      loaded = loaded[key]
  if not isinstance(loaded, Mapping):
    raise ConversionError(f"--weights {path} holds a {type(loaded).__name__}, not a state dict")
  return {name.removeprefix("module."): _to_numpy(value) for name, value in loaded.items()}


def _torch_arrays(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {name: _to_numpy(value) for name, value in state_dict.items()}


def _ignore_torch(name: str) -> bool:
  return name.endswith("num_batches_tracked")


def from_torchvision(
    state_dict: Mapping[str, Any],
    width_multiplier: float = 1.0,
    conv_impl: str = "xla",
) -> tuple[models.MobileNetV2, dict[str, Any]]:
  """(model, variables) of a torchvision `mobilenet_v2` state dict (tensors or
  numpy arrays)."""
  arrays = _torch_arrays(state_dict)
  what = "the torchvision state dict"
  num_classes = _num_classes(arrays, "classifier.1.weight", 0, what)
  return _convert(
      "torchvision",
      arrays,
      width_multiplier,
      num_classes,
      ignore=_ignore_torch,
      what=what,
      conv_impl=conv_impl,
  )


def check_timm_depths(arrays: Mapping[str, np.ndarray]) -> None:
  """Refuses timm's depth-multiplied variants (mobilenetv2_110d/120d): their
  stages have more blocks than Table 2's."""
  depths: dict[int, int] = {}
  for name in arrays:
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2].isdigit():
      stage, index = int(parts[1]), int(parts[2])
      depths[stage] = max(depths.get(stage, 0), index + 1)
  found = tuple(depths.get(s, 0) for s in range(max(len(STAGE_DEPTHS), len(depths))))
  if found != STAGE_DEPTHS:
    stage = next(s for s, (a, b) in enumerate(zip(found, STAGE_DEPTHS + (0,) * 8)) if a != b)
    raise ConversionError(
        f"the timm weights' blocks.{stage} has {found[stage]} blocks where MobileNetV2 has "
        f"{(STAGE_DEPTHS + (0,) * 8)[stage]}: a depth-multiplied variant (mobilenetv2_110d, "
        "mobilenetv2_120d) has no equivalent here"
    )


def from_timm(
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
    width_multiplier: float = 1.0,
    conv_impl: str = "xla",
) -> tuple[models.MobileNetV2, dict[str, Any]]:
  """(model, variables) of a timm `mobilenetv2_035/050/075/100/140` state dict
  or its .pth/.safetensors file."""
  if isinstance(state_dict_or_path, (str, os.PathLike)):
    arrays = load_state_dict(os.fspath(state_dict_or_path))
  else:
    arrays = _torch_arrays(state_dict_or_path)
  check_timm_depths(arrays)
  what = "the timm state dict"
  num_classes = _num_classes(arrays, "classifier.weight", 0, what)
  return _convert(
      "timm",
      arrays,
      width_multiplier,
      num_classes,
      ignore=_ignore_torch,
      what=what,
      conv_impl=conv_impl,
  )


# --- TF-slim and TF-Hub -------------------------------------------------------------

EMA_SUFFIX = "/ExponentialMovingAverage"
# Optimizer slots and counters a training checkpoint may hold beside the model.
_SLIM_SLOTS = ("RMSProp", "RMSProp_1", "Momentum", "Adam", "Adam_1")


def slim_arrays(path: str) -> dict[str, np.ndarray]:
  """Every variable of a TF checkpoint: a prefix ("model.ckpt-100"), a
  directory holding checkpoints, or a TF-Hub module directory."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError("--source=slim needs tensorflow") from e
  if os.path.isdir(path):
    hub = os.path.join(path, "variables", "variables")
    path = hub if os.path.exists(hub + ".index") else (tf.train.latest_checkpoint(path) or path)
  try:
    reader = tf.train.load_checkpoint(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(
        f"--weights {path}: no readable TF checkpoint ({type(e).__name__})"
    ) from e
  return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _ignore_slim(name: str) -> bool:
  return not name.startswith("MobilenetV2/") or name.split("/")[-1] in _SLIM_SLOTS


def from_slim(
    path_or_arrays: str | os.PathLike | Mapping[str, np.ndarray],
    width_multiplier: float = 1.0,
    conv_impl: str = "xla",
) -> tuple[models.MobileNetV2, dict[str, Any]]:
  """(model, variables) of a TF-slim / TF-Hub MobileNetV2 checkpoint. Uses the
  ExponentialMovingAverage copy of each variable when there is one (the
  weights the published accuracies are of); a 1001-class classifier loses
  class 0 (background), leaving ImageNet's 1000 in the usual order."""
  if isinstance(path_or_arrays, Mapping):
    arrays = {name: np.asarray(value) for name, value in path_or_arrays.items()}
  else:
    arrays = slim_arrays(os.fspath(path_or_arrays))
  what = "the TF-slim checkpoint"
  logits = "MobilenetV2/Logits/Conv2d_1c_1x1/weights"
  num_classes = _num_classes(arrays, logits, -1, what)
  background = num_classes == 1001
  entries = tuple(
      dataclasses.replace(e, source=e.source + EMA_SUFFIX) if e.source + EMA_SUFFIX in arrays else e
      for e in table("slim", background=background)
  )
  # Both copies of a variable are accounted for, whichever is used.
  used = {e.source for e in entries}
  pairs = {name.removesuffix(EMA_SUFFIX) for name in used} | {name + EMA_SUFFIX for name in used}
  return _convert(
      "slim",
      arrays,
      width_multiplier,
      num_classes - 1 if background else num_classes,
      entries=entries,
      ignore=lambda name: _ignore_slim(name) or name in pairs,
      what=what,
      conv_impl=conv_impl,
  )


# --- command line -------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):

  def error(self, message: str) -> None:  # One line and exit 2, as main.py.
    fail(message)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = _Parser(prog="python -m mnv2_flax.convert", description=__doc__.split("\n")[0])
  parser.add_argument("--source", required=True, choices=SOURCES)
  parser.add_argument("--out", required=True, help="New checkpoint directory.")
  parser.add_argument(
      "--weights",
      default="",
      help="keras: imagenet (the default; Keras downloads them) or a Keras weights file; "
      "torchvision, timm: a .pth or .safetensors state dict; slim: a checkpoint prefix, "
      "directory or TF-Hub module directory.",
  )
  parser.add_argument("--width_multiplier", type=float, default=1.0, help="The weights' width.")
  parser.add_argument(
      "--image_size", type=int, default=224, help="Evaluation resolution (the settings' recipe)."
  )
  parser.add_argument(
      "--weights_version",
      choices=tuple(TORCHVISION_CROP_FRACTIONS),
      default="V1",
      help="torchvision: which ImageNet weights (V1 resizes to 256, V2 to 232 before 224).",
  )
  parser.add_argument(
      "--eval_crop_fraction",
      type=float,
      default=None,
      help="Override the source's evaluation crop fraction.",
  )
  args = parser.parse_args(argv)
  if args.source != "keras" and not args.weights:
    parser.error(f"--source={args.source} needs --weights=PATH")
  args.weights = args.weights or "imagenet"
  if args.image_size < 32:
    parser.error(f"--image_size {args.image_size} is smaller than the model's total stride 32")
  return args


def convert(args: argparse.Namespace) -> tuple[models.MobileNetV2, dict[str, Any], dict, str]:
  """(model, variables, settings, source description) of the parsed flags."""
  common = {"width_multiplier": args.width_multiplier}
  if args.source == "keras":
    keras_model = load_keras(args.weights, args.width_multiplier, args.image_size)
    model, variables = from_keras(keras_model, **common)
    description = f"keras.applications.MobileNetV2(alpha={args.width_multiplier}, "
    description += f"weights={args.weights!r})"
  elif args.source == "slim":
    model, variables = from_slim(args.weights, **common)
    description = f"TF-slim checkpoint {os.path.abspath(args.weights)}"
  else:
    state_dict = load_state_dict(args.weights)
    if args.source == "torchvision":
      model, variables = from_torchvision(state_dict, **common)
      description = f"torchvision mobilenet_v2 ({args.weights_version} recipe) "
    else:
      model, variables = from_timm(state_dict, **common)
      description = "timm mobilenetv2 "
    description += os.path.abspath(args.weights)
  settings_dict = settings(
      args.source,
      args.width_multiplier,
      model.num_classes,
      args.image_size,
      eval_crop_fraction=args.eval_crop_fraction,
      weights_version=args.weights_version,
  )
  return model, variables, settings_dict, description


def main(argv: Sequence[str]) -> str:
  """Converts and saves; returns the checkpoint step's path."""
  from mnv2_flax import checkpoint, data  # pylint: disable=g-import-not-at-top

  args = parse_args(argv)
  _, variables, settings_dict, description = convert(args)
  num_classes = settings_dict["dataset.num_classes"]
  class_names = (
      data.imagenet_class_names()
      if num_classes == 1000
      else tuple(str(i) for i in range(num_classes))
  )
  path = checkpoint.save_variables(args.out, variables, settings_dict, class_names, description)
  print(f"Wrote {path} ({description}, {num_classes} classes)")
  return path


def run(argv: Sequence[str] | None = None) -> None:
  """`python -m mnv2_flax.convert`: user errors are one line and exit 2."""
  try:
    main(sys.argv[1:] if argv is None else argv)
  except ConfigError as e:
    fail(str(e))


if __name__ == "__main__":
  run()
