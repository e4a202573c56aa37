"""Imports pretrained MobileNetV2 weights from Keras, torchvision, timm and TF-slim.

  python -m mnv2_flax.convert --source=keras --weights=imagenet --out=DIR
  python -m mnv2_flax.convert --source=torchvision --weights=mobilenet_v2-b0353104.pth \
      --weights_version=V1 --out=DIR
  python -m mnv2_flax.convert --source=timm --weights=model.safetensors \
      --width_multiplier=1.4 --out=DIR
  python -m mnv2_flax.convert --source=slim --weights=mobilenet_v2_1.0_224.ckpt --out=DIR
  python -m mnv2_flax.convert --source=keras --weights=fine_tuned.keras \
      --class_names=classes.txt --out=DIR
  python -m mnv2_flax.convert --source=torchvision --weights=lightning.ckpt --head=features \
      --out=DIR

DIR is then a checkpoint with its settings file: `python -m mnv2_flax.main
--mode=eval --config.checkpoint_path=DIR`, fine-tuning, export and predict
need no hand-set flag. In Python, `model, variables = from_keras(keras_model)`
(or `from_torchvision`, `from_timm`, `from_slim`) gives a model whose
`model.apply(variables, x, train=False)` equals the source's logits.

Keras: besides keras.applications.MobileNetV2, any transfer-learning model
holding one (`keras_import`, `keras_file`: .keras or whole-model .h5, read
with h5py); its preprocessing becomes the settings' mean/std. PyTorch:
Lightning's and DataParallel's key prefixes are removed. A source without a
classifier, or `--head=features`, gives a features model (model.head).

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
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np

from mnv2_flax import checkpoint, cli, config_lib, models
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
    *,
    head: str = "classifier",
    eval_resize: str = "crop",
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    dataset: str = "imagenet2012",
) -> dict[str, Any]:
  """The checkpoint settings (config_lib.WEIGHT_KEYS + RECIPE_KEYS) of
  weights from `source`: what the model needs to compute the source's
  function, and the evaluation recipe the weights were published with.
  `weights_version` picks torchvision's crop (V1: resize 256, V2: 232);
  `normalization` (mean, std in [0, 1] units) replaces the source's default
  (a Keras model's own preprocessing layers); `dataset` is what the weights
  were trained on (recorded: export calibrates int8 on it)."""
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
  if normalization is not None:
    config.dataset.mean, config.dataset.std = (tuple(float(v) for v in n) for n in normalization)
  config.dataset.image_size = image_size
  config.dataset.eval_crop_fraction = eval_crop_fraction
  config.dataset.eval_resize = eval_resize
  config.dataset.num_classes = num_classes
  config.dataset.name = dataset
  config.model.head = head
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
          f"{what} lacks {entry.source} (for {entry.ours}): not a MobileNetV2 of this layout"
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
        f"{what} holds {len(unknown)} unknown weights, e.g. {unknown[0]}: not a MobileNetV2 of "
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
    head: str = "classifier",
) -> tuple[models.MobileNetV2, dict[str, Any]]:
  """A features head drops the classifier's entries (and ignores a classifier
  the source may hold)."""
  # The recipe keys (image size, crop) do not change the model.
  model, _ = checkpoint.model_from_settings(
      settings(source, width_multiplier, max(num_classes, 2), head=head), conv_impl
  )
  entries = table(source) if entries is None else entries
  if head == "features":
    classifier = {e.source for e in entries if e.ours.startswith("params/classifier/")}
    entries = [e for e in entries if e.source not in classifier]
    ignore_source = ignore
    ignore = lambda name: ignore_source(name) or name in classifier  # noqa: E731
  return model, convert_arrays(arrays, entries, model, ignore, what)


def _num_classes(arrays: Mapping[str, np.ndarray], name: str, axis: int, what: str) -> int:
  """The classifier's class count; 0 where the source has no classifier (a
  features model)."""
  return int(np.shape(arrays[name])[axis]) if name in arrays else 0


def _head(num_classes: int, head: str | None, classifier: str, what: str) -> str:
  """The head to import: `head`, or "features" when the source has no
  classifier (timm's num_classes=0, Keras' include_top=False)."""
  if head is None:
    return "classifier" if num_classes else "features"
  if head not in models.HEADS:
    raise ConversionError(f"head must be one of {', '.join(models.HEADS)}, got {head!r}")
  if head == "classifier" and not num_classes:
    raise ConversionError(f"{what} lacks {classifier}: no classifier to import (head='features')")
  return head


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


def _keras_weight_key(layer: str, weight: str) -> str:
  """ "layer/variable" of a Keras weight: Keras 3 names ("kernel", or paths
  such as "mobilenetv2_1.00_224/Conv1/kernel") and tf.keras 2's ("kernel:0",
  "depthwise_kernel") alike."""
  parts = weight.split(":")[0].split("/")
  name = "kernel" if parts[-1] == "depthwise_kernel" else parts[-1]
  return f"{parts[-2] if len(parts) > 1 else layer}/{name}"


def keras_arrays(keras_model: Any) -> dict[str, np.ndarray]:
  """ "layer/variable" -> value of every weight of a Keras model, nested
  models' layers included (Keras 3; tf.keras 2 names such as "kernel:0" and
  "depthwise_kernel" are normalised)."""
  arrays = {}
  for layer in keras_model.layers:
    if hasattr(layer, "layers"):  # A nested Functional or Sequential model.
      arrays.update(keras_arrays(layer))
      continue
    for weight in layer.weights:
      arrays[_keras_weight_key(layer.name, weight.name)] = np.asarray(weight.numpy())
  return arrays


def keras_alpha(keras_model: Any) -> float | None:
  """The alpha in a `keras.applications.MobileNetV2`'s default name
  ("mobilenetv2_1.00_224"), or None."""
  return _alpha_of_name(str(getattr(keras_model, "name", "")))


def _alpha_of_name(name: str) -> float | None:
  parts = name.split("_")
  if len(parts) == 3 and parts[0] == "mobilenetv2":
    try:
      return float(parts[1])
    except ValueError:
      return None
  return None


# Layers of keras.applications.MobileNetV2, by name (in a transfer-learning
# model they may sit in the outer model: "flattened").
_KERAS_BACKBONE_NAME = re.compile(
    r"(Conv1|bn_Conv1|Conv1_relu|Conv1_pad|expanded_conv_\w+|block_\d+_\w+|Conv_1|Conv_1_bn|out_relu)"
)
_KERAS_MODEL_CLASSES = ("Functional", "Model", "Sequential")
# Inference no-ops: augmentation (Keras 3 and tf.keras 2 names) and dropout.
_KERAS_AUGMENTATION = ("RandAugment", "AugMix", "MixUp", "CutMix", "Solarization")
_KERAS_DROPOUT = ("Dropout", "AlphaDropout", "GaussianDropout", "GaussianNoise")
# Arithmetic with a constant: Keras 3 operations and tf.keras 2's TFOpLambda functions.
_KERAS_ARITHMETIC = {
    "TrueDivide": "divide",
    "Divide": "divide",
    "Subtract": "subtract",
    "Add": "add",
    "Multiply": "multiply",
    "math.truediv": "divide",
    "math.divide": "divide",
    "math.subtract": "subtract",
    "math.add": "add",
    "math.multiply": "multiply",
    "__operators__.add": "add",
    "__operators__.sub": "subtract",
    "__operators__.truediv": "divide",
    "__operators__.mul": "multiply",
}
_KERAS_HEAD_RULE = (
    "only GlobalAveragePooling2D, Dropout and one Dense(n) (softmax or no activation) may follow "
    "MobileNetV2"
)


@dataclasses.dataclass
class KerasLayer:
  """One layer (or operation) of a Keras model's config, in graph order."""

  name: str
  kind: str  # The class name ("Dense"; a TFOpLambda's function, "math.truediv").
  config: dict[str, Any]
  # The constant operand of an arithmetic operation; None when there is none
  # or when it is not the second operand.
  constant: np.ndarray | None = None
  model: str = ""  # The name of the model holding it.


def _keras_constant(value: Any) -> np.ndarray | None:
  if isinstance(value, bool) or value is None:
    return None
  if isinstance(value, (int, float)):
    return np.asarray(value, np.float64)
  if isinstance(value, list):
    try:
      return np.asarray(value, np.float64)
    except (TypeError, ValueError):
      return None
  tensor = isinstance(value, dict) and value.get("class_name") == "__keras_tensor__"
  if isinstance(value, dict) and "config" in value and not tensor:
    inner = value["config"]
    return _keras_constant(inner.get("value") if isinstance(inner, dict) else None)
  return None


def _keras_operand(entry: dict[str, Any]) -> np.ndarray | None:
  """The constant second operand of an operation, from its inbound node:
  Keras 3 ({"args": [tensor, 127.5]}) or tf.keras 2's TFOpLambda
  ([["input", 0, 0, {"y": 127.5, "name": null}]])."""
  nodes = entry.get("inbound_nodes") or []
  if not nodes:
    return None
  node = nodes[0]
  if isinstance(node, dict):
    args = node.get("args") or []
    first_is_tensor = bool(args) and isinstance(args[0], dict)
    if first_is_tensor and len(args) > 1:
      return _keras_constant(args[1])
    kwargs = node.get("kwargs") or {}
    return _keras_constant(kwargs.get("y")) if first_is_tensor else None
  if isinstance(node, list) and node and isinstance(node[0], list):
    node = node[0]  # Layers: [[[inbound, 0, 0, kwargs]]]; TFOpLambda: [[inbound, 0, 0, kwargs]].
  if isinstance(node, list) and len(node) > 3 and isinstance(node[3], dict):
    return _keras_constant(node[3].get("y"))
  return None


def keras_layers(model_config: Mapping[str, Any], model: str = "") -> list[KerasLayer]:
  """The layers of a Keras model config ({"class_name", "config"}: what
  `.h5` files store, or `{"class_name": ..., "config": model.get_config()}`),
  nested models expanded in place, in the config's (topological) order."""
  config = model_config.get("config", {})
  model = model or str(config.get("name", ""))
  layers = []
  for entry in config.get("layers", []):
    kind = str(entry.get("class_name", ""))
    layer_config = entry.get("config") or {}
    name = str(entry.get("name") or layer_config.get("name", ""))
    if kind in _KERAS_MODEL_CLASSES:
      layers.extend(keras_layers({"class_name": kind, "config": layer_config}, name))
      continue
    if kind == "TFOpLambda":
      kind = str(layer_config.get("function", kind))
    layers.append(KerasLayer(name, kind, layer_config, _keras_operand(entry), model))
  return layers


@dataclasses.dataclass
class KerasImport:
  """What a Keras model holds, for `from_keras` and the settings file."""

  model: models.MobileNetV2
  variables: dict[str, Any]
  width_multiplier: float
  num_classes: int  # 0: a features model.
  image_size: int | None  # The model's input size, when it has a static one.
  normalization: tuple[tuple[float, ...], tuple[float, ...]] | None  # (mean, std), [0, 1] units.
  fine_tuned: bool  # Anything beyond keras.applications.MobileNetV2 itself.
  description: str

  def settings(self, image_size: int = 224) -> dict[str, Any]:
    """The checkpoint settings; a fine-tune's evaluation resizes the whole
    image (image_dataset_from_directory's), ImageNet's crops."""
    return settings(
        "keras",
        self.width_multiplier,
        max(self.num_classes, 2) if self.num_classes else 10,
        self.image_size or image_size,
        eval_crop_fraction=1.0 if self.fine_tuned else None,
        head="classifier" if self.num_classes else "features",
        eval_resize="stretch" if self.fine_tuned else "crop",
        normalization=self.normalization,
        dataset="imagefolder" if self.fine_tuned else "imagenet2012",
    )


@dataclasses.dataclass
class _KerasPlan:
  backbone_model: str = ""  # The model holding Conv1 (its name may carry alpha).
  backbone_layers: set[str] = dataclasses.field(default_factory=set)
  scale: np.ndarray = dataclasses.field(default_factory=lambda: np.ones(1))
  offset: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(1))
  preprocessing: list[str] = dataclasses.field(default_factory=list)
  pooled: bool = False
  dense: KerasLayer | None = None
  input_shape: tuple[Any, ...] | None = None
  extra_layers: int = 0  # Layers outside keras.applications.MobileNetV2's own.


def _refuse(layer: KerasLayer, why: str) -> NoReturn:
  raise ConversionError(f"Keras layer {layer.name!r} ({layer.kind}) {why}")


def _normalization_affine(
    layer: KerasLayer, arrays: Mapping[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
  config = layer.config
  if config.get("invert"):
    _refuse(layer, "inverts its normalisation: not an input preprocessing")
  mean, variance = config.get("mean"), config.get("variance")
  if mean is None or variance is None:
    mean = arrays.get(f"{layer.name}/mean")
    variance = arrays.get(f"{layer.name}/variance")
  if mean is None or variance is None:
    _refuse(layer, "holds no mean and variance (never adapted)")
  mean = np.asarray(mean, np.float64).reshape(-1)
  std = np.maximum(np.sqrt(np.asarray(variance, np.float64).reshape(-1)), 1e-7)
  return 1 / std, -mean / std


def _keras_plan(layers: Sequence[KerasLayer], arrays: Mapping[str, np.ndarray]) -> _KerasPlan:
  """Walks the layers: preprocessing and augmentation, then the MobileNetV2,
  then its head. Anything else is refused with one line naming it."""
  plan = _KerasPlan()
  phase = "before"
  for layer in layers:
    if _KERAS_BACKBONE_NAME.fullmatch(layer.name) or (
        phase == "backbone" and layer.kind == "InputLayer"
    ):
      if phase == "after":
        _refuse(layer, f"follows the classifier head: {_KERAS_HEAD_RULE}")
      if layer.name == "Conv1":
        plan.backbone_model = layer.model
      phase = "backbone"
      plan.backbone_layers.add(layer.name)
      continue
    if phase == "before":
      _preprocessing(layer, plan, arrays)
      continue
    phase = "after"
    plan.extra_layers += 1
    if layer.kind == "GlobalAveragePooling2D" and plan.dense is None and not plan.pooled:
      if layer.config.get("keepdims"):
        _refuse(layer, "keeps the pooled dimensions: Dense needs GlobalAveragePooling2D's vector")
      plan.pooled = True
    elif layer.kind in _KERAS_DROPOUT:
      pass
    elif layer.kind == "Dense" and plan.dense is None:
      if not plan.pooled:
        _refuse(layer, f"has no GlobalAveragePooling2D before it: {_KERAS_HEAD_RULE}")
      activation = layer.config.get("activation", "linear")
      if activation not in ("linear", "softmax", None):
        _refuse(layer, f"has activation {activation!r}: {_KERAS_HEAD_RULE}")
      plan.dense = layer
    elif layer.kind in ("Softmax", "Activation") and plan.dense is not None:
      if layer.kind == "Activation" and layer.config.get("activation") != "softmax":
        _refuse(layer, f"is not a softmax: {_KERAS_HEAD_RULE}")
    else:
      _refuse(layer, _KERAS_HEAD_RULE)
  if phase == "before":
    raise ConversionError("the Keras model holds no MobileNetV2 (no layer named Conv1)")
  # keras.applications.MobileNetV2 with its classifier ("predictions") is no fine-tune.
  if plan.dense is not None and plan.dense.name == "predictions" and plan.extra_layers == 2:
    plan.extra_layers = 0
  if plan.dense is None and plan.extra_layers == int(plan.pooled):  # include_top=False.
    plan.extra_layers = 0
  return plan


def _preprocessing(layer: KerasLayer, plan: _KerasPlan, arrays: Mapping[str, np.ndarray]) -> None:
  """A layer before the MobileNetV2: the input, augmentation (ignored),
  or preprocessing (composed into plan.scale and plan.offset)."""
  kind = layer.kind
  if kind == "InputLayer":
    shape = layer.config.get("batch_shape") or layer.config.get("batch_input_shape")
    if shape and plan.input_shape is None:
      plan.input_shape = tuple(shape)
    return
  if kind.startswith("Random") or kind in _KERAS_AUGMENTATION or kind in _KERAS_DROPOUT:
    return
  plan.extra_layers += 1
  if kind == "Rescaling":
    scale = np.asarray(layer.config.get("scale", 1.0), np.float64).reshape(-1)
    offset = np.asarray(layer.config.get("offset", 0.0), np.float64).reshape(-1)
  elif kind == "Normalization":
    scale, offset = _normalization_affine(layer, arrays)
  elif kind in _KERAS_ARITHMETIC:
    if layer.constant is None:
      _refuse(layer, "has no constant second operand: not a preprocessing step")
    operation, value = _KERAS_ARITHMETIC[kind], layer.constant.reshape(-1)
    one, zero = np.ones(1), np.zeros(1)
    scale, offset = {
        "divide": (1 / value, zero),
        "multiply": (value, zero),
        "add": (one, value),
        "subtract": (one, -value),
    }[operation]
  else:
    _refuse(
        layer,
        "precedes MobileNetV2: only augmentation, Rescaling, Normalization and "
        "preprocess_input's arithmetic may",
    )
  plan.scale, plan.offset = plan.scale * scale, plan.offset * scale + offset
  plan.preprocessing.append(f"{layer.name} ({kind})")


def _keras_normalization(plan: _KerasPlan) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  """The settings' mean and std ([0, 1] units) of the model's own
  preprocessing y = scale * pixel + offset (pixels in [0, 255]), which is
  (pixel / 255 - mean) / std: std = 1 / (255 scale), mean = -offset * std."""
  if not plan.preprocessing:
    return None
  scale, offset = np.broadcast_arrays(plan.scale, plan.offset)
  if np.any(scale <= 0):
    raise ConversionError(
        f"the Keras model's preprocessing ({', '.join(plan.preprocessing)}) scales the pixels by "
        f"{scale.tolist()}: only positive scales are a normalisation"
    )
  std = 1 / (255 * scale)
  mean = -offset * std
  if len(mean) == 1:
    mean, std = np.repeat(mean, 3), np.repeat(std, 3)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _keras_width(
    plan: _KerasPlan, arrays: Mapping[str, np.ndarray], width_multiplier: float | None
) -> float:
  """The given width, else the alpha in the backbone model's name, else the
  one published width whose channels match (block_16_project's, Conv1's)."""
  if width_multiplier is not None:
    return width_multiplier
  alpha = _alpha_of_name(plan.backbone_model)
  if alpha is not None:
    return alpha
  found = {
      name.split("/")[0]: int(np.shape(arrays[name])[-1])
      for name in ("Conv1/kernel", "block_16_project/kernel", "Conv_1/kernel")
      if name in arrays
  }
  matches = [
      alpha
      for alpha in PUBLISHED_WIDTHS
      if all(_channels(alpha, keras=True)[layer] == c for layer, c in found.items())
  ]
  if len(matches) == 1 and len(found) == 3:
    return matches[0]
  raise ConversionError(
      f"cannot tell the width of the Keras model {plan.backbone_model!r} from its name or its "
      f"channels ({found}): pass width_multiplier (--width_multiplier)"
  )


def _binary_kernel(a: np.ndarray) -> np.ndarray:
  """Dense(1) -> two classes with logits [0, z]: softmax gives sigmoid(z)."""
  return np.concatenate([np.zeros_like(a), a], axis=-1)


def keras_import(
    model_config: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    width_multiplier: float | None = None,
    conv_impl: str = "xla",
    description: str = "",
) -> KerasImport:
  """A `KerasImport` of a Keras model's config and weights ("layer/variable"
  -> value): keras.applications.MobileNetV2 with or without its classifier,
  or any Functional or Sequential model holding one (nested or flattened),
  preprocessing and augmentation before it, GlobalAveragePooling2D, Dropout
  and Dense(n) (softmax or none; Dense(1): two classes [0, z]) after it."""
  plan = _keras_plan(keras_layers(model_config), arrays)
  width = _keras_width(plan, arrays, width_multiplier)
  check_keras_width(width)
  entries = [e for e in table("keras") if not e.ours.startswith("params/classifier/")]
  num_classes = 0
  if plan.dense is not None:
    dense = plan.dense.name
    units = int(plan.dense.config.get("units") or np.shape(arrays[f"{dense}/kernel"])[-1])
    binary = units == 1
    num_classes = 2 if binary else units
    if not plan.dense.config.get("use_bias", True):
      raise ConversionError(f"Keras layer {dense!r} (Dense) has no bias: {_KERAS_HEAD_RULE}")
    entries += [
        Entry("params/classifier/kernel", f"{dense}/kernel", _binary_kernel if binary else _same),
        Entry("params/classifier/bias", f"{dense}/bias", _binary_kernel if binary else _same),
    ]
  used_layers = plan.backbone_layers | ({plan.dense.name} if plan.dense else set())
  used = {name: value for name, value in arrays.items() if name.split("/")[0] in used_layers}
  model, variables = _convert(
      "keras",
      used,
      width,
      num_classes,
      entries=entries,
      what="the Keras model",
      conv_impl=conv_impl,
      head="classifier" if num_classes else "features",
  )
  shape = plan.input_shape
  image_size = None
  if shape and len(shape) == 4 and shape[1] is not None:
    if shape[1] != shape[2]:
      raise ConversionError(
          f"the Keras model's input is {shape[1]}x{shape[2]}: only square inputs have an "
          "equivalent here"
      )
    image_size = int(shape[1])
  return KerasImport(
      model=model,
      variables=variables,
      width_multiplier=width,
      num_classes=num_classes,
      image_size=image_size,
      normalization=_keras_normalization(plan),
      fine_tuned=plan.extra_layers > 0,
      description=description or f"Keras model {model_config.get('config', {}).get('name')!r}",
  )


def keras_config(keras_model: Any) -> dict[str, Any]:
  """{"class_name", "config"} of a live Keras model, as an .h5 file stores it."""
  try:
    config = keras_model.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(
        f"the Keras model {getattr(keras_model, 'name', '?')!r} has no config "
        f"({type(e).__name__}): a subclassed model? Wrap its layers in a Functional model"
    ) from e
  return {"class_name": type(keras_model).__name__, "config": config}


def from_keras(
    keras_model: Any,
    width_multiplier: float | None = None,
    conv_impl: str = "xla",
) -> tuple[models.MobileNetV2, dict[str, Any]]:
  """(model, variables) of a Keras model holding a MobileNetV2 (see
  `keras_import`): keras.applications.MobileNetV2 itself (its logits before
  Keras' softmax; include_top=False: a features model) or a fine-tuned
  transfer-learning model. The width is `width_multiplier` if given, else the
  alpha in the MobileNetV2's default name, else found from its channels.
  `keras_import_model` also gives the settings (preprocessing, input size)."""
  imported = keras_import_model(keras_model, width_multiplier, conv_impl)
  return imported.model, imported.variables


def keras_import_model(
    keras_model: Any, width_multiplier: float | None = None, conv_impl: str = "xla"
) -> KerasImport:
  """`keras_import` of a live Keras model."""
  return keras_import(
      keras_config(keras_model),
      keras_arrays(keras_model),
      width_multiplier,
      conv_impl,
      description=f"Keras model {keras_model.name!r}",
  )


def _h5_text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def keras_h5_file(path: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
  """(model config, "layer/variable" -> value) of a whole-model Keras .h5
  file, read with h5py alone: Keras never rebuilds the model, so files it
  cannot reload (Keras 3's TrueDivide operations, tf.keras 2's TFOpLambda)
  are read too. None for a weights-only file."""
  try:
    import h5py  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"reading {path} needs h5py (it comes with tensorflow)") from e
  try:
    with h5py.File(path, "r") as f:
      if "model_config" not in f.attrs or "model_weights" not in f:
        return None
      config = json.loads(_h5_text(f.attrs["model_config"]))
      weights = f["model_weights"]
      arrays = {}
      for layer in weights.attrs.get("layer_names", ()):
        layer = _h5_text(layer)
        group = weights[layer]
        for weight in group.attrs.get("weight_names", ()):
          weight = _h5_text(weight)
          arrays[_keras_weight_key(layer, weight)] = np.asarray(group[weight])
  except OSError as e:
    raise ConversionError(f"--weights {path}: not a readable HDF5 file ({e})") from e
  return config, arrays


def keras_file(
    path: str, width_multiplier: float | None = None, conv_impl: str = "xla"
) -> KerasImport | None:
  """`keras_import` of a saved Keras model: .keras (loaded by Keras) or a
  whole-model .h5 (read by h5py). None for a weights-only file."""
  if not os.path.exists(path):
    raise ConversionError(f"--weights {path} does not exist")
  description = f"Keras model file {os.path.abspath(path)}"
  if path.endswith(".keras"):
    keras = _import_keras()
    try:
      keras_model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # pylint: disable=broad-except
      message = " ".join(str(e).split())[:300]
      raise ConversionError(f"--weights {path}: Keras cannot load it ({message})") from e
    return keras_import(
        keras_config(keras_model),
        keras_arrays(keras_model),
        width_multiplier,
        conv_impl,
        description,
    )
  if path.endswith(".h5") or path.endswith(".hdf5"):
    found = keras_h5_file(path)
    if found is None:
      return None
    return keras_import(found[0], found[1], width_multiplier, conv_impl, description)
  return None


def _import_keras() -> Any:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    with cli.filtered_stderr():
      import keras  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"--source=keras needs keras ({e})") from e
  return keras


def load_keras(weights: str, width_multiplier: float, image_size: int) -> Any:
  """keras.applications.MobileNetV2 with `weights` ("imagenet": Keras
  downloads them; or a Keras weights file), logits out."""
  keras = _import_keras()
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
  """A PyTorch state dict from a .pth/.pt/.ckpt file (torch, cpu, weights only;
  a Lightning checkpoint's state dict) or a .safetensors file (no torch
  needed), as numpy arrays."""
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
  loaded = _torch_load(torch, path)
  for key in ("state_dict", "model"):  # Training checkpoints wrap the state dict.
    if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
      loaded = loaded[key]
  if not isinstance(loaded, Mapping):
    raise ConversionError(f"--weights {path} holds a {type(loaded).__name__}, not a state dict")
  return {name: _to_numpy(value) for name, value in loaded.items() if _is_tensor(value)}


def _is_tensor(value: Any) -> bool:
  return hasattr(value, "detach") or isinstance(value, np.ndarray)


class _PlainData(dict):
  """Stands in for a class that a checkpoint pickles beside its tensors
  (Lightning's hyper-parameters: AttributeDict, argparse.Namespace, a
  config dataclass): takes whatever state it is given and runs none of the
  class's code."""

  def __init__(self, *args: Any, **kwargs: Any) -> None:  # pylint: disable=unused-argument
    super().__init__()

  def __setstate__(self, state: Any) -> None:
    self["__state__"] = state

  def __call__(self, *args: Any, **kwargs: Any) -> _PlainData:  # An enum's or a function's call.
    return _PlainData()


def _torch_load(torch: Any, path: str) -> Any:
  """torch.load with weights_only=True. A checkpoint it refuses for the
  classes of objects beside the weights (a Lightning checkpoint's
  hyper-parameters) is read again with each of those classes allow-listed as
  plain data (`_PlainData`), never unpickled for real; what still fails is
  refused with one line saying how to save the state dict alone."""
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    first_error = " ".join(str(e).split())
  try:
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    stubs = [(_PlainData, name) for name in unsafe]
    with torch.serialization.safe_globals(stubs):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception:  # pylint: disable=broad-except
    pass
  if len(first_error) > 300:
    first_error = first_error[:300] + "..."
  raise ConversionError(
      f"--weights {path} is unreadable with weights_only=True ({first_error}); save the state dict "
      "alone: torch.save(model.state_dict(), 'weights.pth') (Lightning: "
      "torch.save(LitModel.load_from_checkpoint(path).state_dict(), 'weights.pth'))"
  )


def strip_prefix(arrays: Mapping[str, np.ndarray], anchor: str) -> dict[str, np.ndarray]:
  """The state dict without the prefix its keys share (Lightning's attribute
  name, "model."; DataParallel's "module."; both): found as what precedes
  `anchor`, the layout's first weight ("features.0.0.weight"). Where several
  keys end with it (an EMA copy beside the model), the shortest prefix wins;
  keys outside the prefix (the LightningModule's other attributes: a loss's
  class weights, metrics) are left out."""
  prefixes = sorted(
      (name[: -len(anchor)] for name in arrays if name.endswith(anchor)),
      key=lambda p: (len(p), p),
  )
  if not prefixes or not prefixes[0]:
    return dict(arrays)
  prefix = prefixes[0]
  if prefix[-1] != ".":  # "xfeatures.0.0.weight" is another layout, not a prefix.
    return dict(arrays)
  return {name[len(prefix) :]: value for name, value in arrays.items() if name.startswith(prefix)}


def _torch_arrays(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {name: _to_numpy(value) for name, value in state_dict.items()}


def _ignore_torch(name: str) -> bool:
  return name.endswith("num_batches_tracked")


def from_torchvision(
    state_dict: Mapping[str, Any],
    width_multiplier: float = 1.0,
    conv_impl: str = "xla",
    head: str | None = None,
) -> tuple[models.MobileNetV2, dict[str, Any]]:
  """(model, variables) of a torchvision `mobilenet_v2` state dict (tensors or
  numpy arrays; Lightning's and DataParallel's key prefixes are removed).
  head: "classifier", "features" (its classifier left out), or None: a
  features model when the state dict has no classifier."""
  arrays = strip_prefix(_torch_arrays(state_dict), "features.0.0.weight")
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
      head=_head(num_classes, head, "classifier.1.weight", what),
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
    head: str | None = None,
) -> tuple[models.MobileNetV2, dict[str, Any]]:
  """(model, variables) of a timm `mobilenetv2_035/050/075/100/140` state dict
  or its .pth/.safetensors file (key prefixes removed as `from_torchvision`;
  num_classes=0's state dict, without classifier, is a features model)."""
  if isinstance(state_dict_or_path, (str, os.PathLike)):
    arrays = load_state_dict(os.fspath(state_dict_or_path))
  else:
    arrays = _torch_arrays(state_dict_or_path)
  arrays = strip_prefix(arrays, "conv_stem.weight")
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
      head=_head(num_classes, head, "classifier.weight", what),
  )


# --- TF-slim and TF-Hub -------------------------------------------------------------

EMA_SUFFIX = "/ExponentialMovingAverage"
# Optimizer slots and counters a training checkpoint may hold beside the model.
_SLIM_SLOTS = ("RMSProp", "RMSProp_1", "Momentum", "Adam", "Adam_1")


def slim_arrays(path: str) -> dict[str, np.ndarray]:
  """Every variable of a TF checkpoint: a prefix ("model.ckpt-100"), a
  directory holding checkpoints, or a TF-Hub module directory."""
  try:
    tf = cli.import_tensorflow()
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
    head: str | None = None,
) -> tuple[models.MobileNetV2, dict[str, Any]]:
  """(model, variables) of a TF-slim / TF-Hub MobileNetV2 checkpoint (head as
  `from_torchvision`'s). Uses the
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
      head=_head(num_classes, head, logits, what),
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
      help="keras: imagenet (the default; Keras downloads them), a saved model (.keras or "
      "whole-model .h5: any model holding a MobileNetV2, fine-tuned or not) or a weights file; "
      "torchvision, timm: a .pth, .ckpt (Lightning) or .safetensors state dict; slim: a "
      "checkpoint prefix, directory or TF-Hub module directory.",
  )
  parser.add_argument(
      "--width_multiplier",
      type=float,
      default=None,
      help="The weights' width (default: a Keras model's own, else 1.0).",
  )
  parser.add_argument(
      "--image_size",
      type=int,
      default=None,
      help="Evaluation resolution (the settings' recipe; default: a Keras model's input size, "
      "else 224).",
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
  parser.add_argument(
      "--head",
      choices=models.HEADS,
      default=None,
      help="features: import without the classifier (a features model); default: the "
      "source's (features when it has no classifier).",
  )
  parser.add_argument(
      "--class_names",
      default="",
      help="A text file, one class name per line (default: ImageNet's for 1000 classes, else "
      "0..n-1).",
  )
  parser.add_argument(
      "--verbosity", type=int, default=-1, help="Log level (0: INFO; default -1: warnings)."
  )
  args = parser.parse_args(argv)
  if args.source != "keras" and not args.weights:
    parser.error(f"--source={args.source} needs --weights=PATH")
  args.weights = args.weights or "imagenet"
  if args.image_size is not None and args.image_size < 32:
    parser.error(f"--image_size {args.image_size} is smaller than the model's total stride 32")
  return args


def without_classifier(
    model: models.MobileNetV2, variables: Mapping[str, Any]
) -> tuple[models.MobileNetV2, dict[str, Any]]:
  """The features model of a classifier and its variables, less the classifier."""
  params = {k: v for k, v in variables["params"].items() if k != "classifier"}
  return model.clone(head="features"), {"params": params, "batch_stats": variables["batch_stats"]}


def read_class_names(path: str, num_classes: int) -> tuple[str, ...]:
  """One name per non-empty line of PATH; there must be `num_classes`."""
  try:
    with open(path, encoding="utf-8") as f:
      names = tuple(line.strip() for line in f if line.strip())
  except OSError as e:
    raise ConversionError(f"--class_names {path}: {e.strerror or e}") from e
  if len(names) != num_classes:
    raise ConversionError(
        f"--class_names {path} has {len(names)} names, the model has {num_classes} classes"
    )
  return names


def convert(args: argparse.Namespace) -> tuple[models.MobileNetV2, dict[str, Any], dict, str]:
  """(model, variables, settings, source description) of the parsed flags."""
  width = args.width_multiplier
  image_size = args.image_size or 224
  common = {"width_multiplier": 1.0 if width is None else width, "head": args.head}
  if args.source == "keras":
    imported = None
    if args.weights != "imagenet":
      imported = keras_file(args.weights, width)
    if imported is not None:
      if args.head == "features" and imported.num_classes:
        model, variables = without_classifier(imported.model, imported.variables)
        imported = dataclasses.replace(imported, model=model, variables=variables, num_classes=0)
      settings_dict = imported.settings(args.image_size or imported.image_size or 224)
      if args.eval_crop_fraction is not None:
        settings_dict["dataset.eval_crop_fraction"] = args.eval_crop_fraction
      return imported.model, imported.variables, settings_dict, imported.description
    keras_model = load_keras(args.weights, common["width_multiplier"], image_size)
    model, variables = from_keras(keras_model, common["width_multiplier"])
    if args.head == "features":
      model, variables = without_classifier(model, variables)
    description = f"keras.applications.MobileNetV2(alpha={common['width_multiplier']}, "
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
      common["width_multiplier"],
      model.num_classes,
      image_size,
      eval_crop_fraction=args.eval_crop_fraction,
      weights_version=args.weights_version,
      head=model.head,
  )
  return model, variables, settings_dict, description


def main(argv: Sequence[str]) -> str:
  """Converts and saves; returns the checkpoint step's path."""
  from mnv2_flax import checkpoint, data  # pylint: disable=g-import-not-at-top

  args = parse_args(argv)
  cli.quiet_logs(args.verbosity)
  _, variables, settings_dict, description = convert(args)
  features = settings_dict["model.head"] == "features"
  num_classes = 0 if features else settings_dict["dataset.num_classes"]
  if args.class_names:
    class_names = read_class_names(args.class_names, num_classes)
  elif num_classes == 1000:
    class_names = data.imagenet_class_names()
  else:
    class_names = tuple(str(i) for i in range(num_classes))
  path = checkpoint.save_variables(args.out, variables, settings_dict, class_names, description)
  what = "features" if features else f"{num_classes} classes"
  print(f"Wrote {path} ({description}, {what})")
  return path


def run(argv: Sequence[str] | None = None) -> None:
  """`python -m mnv2_flax.convert`: user errors are one line and exit 2."""
  try:
    main(sys.argv[1:] if argv is None else argv)
  except ConfigError as e:
    fail(str(e))


if __name__ == "__main__":
  run()
