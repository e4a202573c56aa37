"""MobileNetV2 (Sandler et al., CVPR 2018) in Flax Linen.

The network mirrors Table 2 of the paper. Blocks get their convolutions and
normalisation as injected factories (as in flax `examples/imagenet`), so a
per-backend kernel (`layers.py`) or another BatchNorm flavour is one argument
and never changes the parameter tree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mnv2_flax import layers

ModuleDef = Any

# Table 2: expansion t, output channels c, repeats n, first stride s.
# A t of 6 is the paper's expansion ratio, which `MobileNetV2.expansion` sweeps.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
PAPER_STAGE_STRIDES = tuple(s for _, _, _, s in INVERTED_RESIDUAL_SETTING)
BOTTLENECKS = ("linear", "relu6")
# Where the shortcut goes (the paper's Figure 6b): between bottlenecks (the
# paper's), between expansion layers, or nowhere.
RESIDUALS = ("bottleneck", "expansion", "none")
# What the model returns: the classifier's logits, or the pooled features the
# classifier would take (a features model has no classifier parameters).
HEADS = ("classifier", "features")


def stage_repeats(repeats: int, depth_multiplier: float) -> int:
  """Blocks in a stage of Table 2's n `repeats` at `depth_multiplier`:
  ceil(n * multiplier), at least 1 (EfficientNet's depth scaling)."""
  # Rounded first: 1.1 * 10 is 11.000000000000002 in floats.
  return max(1, math.ceil(round(repeats * depth_multiplier, 6)))


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds channels to a multiple of `divisor`, never below 90% of `value`.

  The rule of the reference TF-slim, Keras and torchvision implementations.
  """
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def relu6(x: jax.Array) -> jax.Array:
  return jnp.minimum(jnp.maximum(x, 0), 6)


def conv_norm(
    conv: ModuleDef, norm: ModuleDef, x: jax.Array, features: int, name: str, **conv_kwargs: Any
) -> jax.Array:
  """Conv `name` then norm `name + "_bn"`. A `layers.BatchNorm` also gets the
  conv as a matmul (input patches and kernel), so that it may fuse the two;
  the parameters are those of the separate layers either way."""
  convolution = conv(features, name=name, **conv_kwargs)
  y = convolution(x)
  normalize = norm(name=f"{name}_bn")
  if not isinstance(normalize, layers.BatchNorm):
    return normalize(y)
  return normalize(
      y,
      matmul_input=convolution.matmul_input(x),
      matmul_kernel=convolution.variables["params"]["kernel"],
  )


class InvertedResidual(nn.Module):
  """Expand (1x1) -> depthwise (3x3) -> project (1x1), linear bottleneck.

  `residual` places the shortcut of a block whose stride is 1 and whose input
  and output widths match (the paper's Figure 6b): "bottleneck" adds the
  block's input to its projection (the paper's); "expansion" instead hands the
  block's expanded activation to the next block, which adds it to its own
  (an identity around depthwise -> project -> expand, the shortcut between
  the wide layers of a classic residual block); "none" drops it. Call with
  the previous block's hand-over; returns (output, hand-over or None).
  `zero_init_residual` starts the BatchNorm that ends each residual branch
  with scale 0, so every residual branch begins as the identity.
  """

  out_channels: int
  stride: int
  expansion: int
  conv: ModuleDef
  depthwise_conv: ModuleDef
  norm: ModuleDef
  bottleneck: str = "linear"
  residual: str = "bottleneck"
  zero_init_residual: bool = False

  @nn.compact
  def __call__(
      self, x: jax.Array, shortcut: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array | None]:
    in_channels = x.shape[-1]
    has_shortcut = self.stride == 1 and in_channels == self.out_channels
    branch_end_norm = (
        functools.partial(self.norm, scale_init=nn.initializers.zeros)
        if self.zero_init_residual
        else self.norm
    )
    y = x
    if self.expansion != 1:
      norm = self.norm if shortcut is None else branch_end_norm
      y = relu6(conv_norm(self.conv, norm, y, in_channels * self.expansion, "expand"))
    if shortcut is not None:
      y = y + shortcut
    expanded = y
    y = self.depthwise_conv(strides=self.stride, name="depthwise")(y)
    y = relu6(self.norm(name="depthwise_bn")(y))
    bottleneck_shortcut = has_shortcut and self.residual == "bottleneck"
    y = conv_norm(
        self.conv,
        branch_end_norm if bottleneck_shortcut else self.norm,
        y,
        self.out_channels,
        "project",
    )
    if self.bottleneck == "relu6":  # The paper's non-linear-bottleneck ablation.
      y = relu6(y)
    if bottleneck_shortcut:
      y = x + y
    hand_over = expanded if has_shortcut and self.residual == "expansion" else None
    return y, hand_over


class MobileNetV2(nn.Module):
  """MobileNetV2 over NHWC images: the classifier's logits, or with
  head="features" the pooled features (timm's num_classes=0; the same
  parameter tree, less "classifier"). `features` gives the feature maps.

  Attributes mirror `config.model`, documented in `mnv2_flax/config_lib.py`.
  """

  num_classes: int = 1000
  width_multiplier: float = 1.0
  # Blocks per stage: ceil(n * depth_multiplier) of Table 2's n (1: the paper's 17).
  depth_multiplier: float = 1.0
  expansion: int = 6
  bottleneck: str = "linear"
  residual: str = "bottleneck"
  zero_init_residual: bool = False
  stem_stride: int = 2
  stage_strides: Sequence[int] = PAPER_STAGE_STRIDES
  dropout_rate: float = 0.2
  padding: str = "symmetric"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  # Compute dtype: float32, bfloat16 (parameters and BatchNorm stay float32)
  # or float64 (everything; XLA's convolutions; needs jax_enable_x64).
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  remat: bool = False
  # Training normalises with the running statistics and leaves them as they
  # are (fine-tuning with frozen BatchNorm).
  freeze_batch_stats: bool = False
  # Test-only (config.testing.fault): BatchNorm statistics per slice of the
  # batch, a bug the device-layout tests must catch.
  statistics_groups: int = 1
  head: str = "classifier"

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits (N, num_classes), or with head="features" the pooled features
    (N, the head conv's channels: 1280 at width <= 1)."""
    return self._forward(x, train, feature_maps=False)

  def features(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """{name: feature map} after each stride change, as `feature_info`
    lists them (timm's features_only): at the paper's strides block0,
    block2, block5, block12 and block16, strides 2 to 32. Use with
    `model.apply(variables, x, method=model.features)`; either head's
    variables serve."""
    return self._forward(x, train, feature_maps=True)

  def feature_info(self) -> list[dict[str, Any]]:
    """[{"name", "stride", "channels"}] of the maps `features` returns: the
    output of the last block at each total stride (timm's `feature_info`:
    module, reduction, num_chs)."""
    info, stride, index = [], self.stem_stride, 0
    blocks = []
    for (_, c, n, _), stage_stride in zip(INVERTED_RESIDUAL_SETTING, self.stage_strides):
      for i in range(stage_repeats(n, self.depth_multiplier)):
        stride *= stage_stride if i == 0 else 1
        blocks.append((f"block{index}", stride, make_divisible(c * self.width_multiplier)))
        index += 1
    for (name, stride, channels), following in zip(blocks, blocks[1:] + [None]):
      if following is None or following[1] != stride:
        info.append({"name": name, "stride": stride, "channels": channels})
    return info

  @nn.compact
  def _forward(self, x: jax.Array, train: bool, feature_maps: bool) -> Any:
    if self.head not in HEADS:
      raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
    param_dtype = jnp.promote_types(self.dtype, jnp.float32)
    conv = functools.partial(
        layers.Conv,
        padding=self.padding,
        impl=self.conv_impl,
        dtype=self.dtype,
        param_dtype=param_dtype,
    )
    depthwise_conv = functools.partial(
        layers.DepthwiseConv,
        padding=self.padding,
        impl=self.conv_impl,
        dtype=self.dtype,
        param_dtype=param_dtype,
    )
    # BatchNorm statistics are reduced over the whole (global) batch: under
    # jit over a sharded batch XLA inserts the cross-device reduction.
    norm = functools.partial(
        layers.BatchNorm,
        use_running_average=not train or self.freeze_batch_stats,
        momentum=self.bn_momentum,
        epsilon=self.bn_epsilon,
        impl=self.conv_impl,
        dtype=self.dtype,
        param_dtype=param_dtype,
        statistics_groups=self.statistics_groups,
    )
    block = nn.remat(InvertedResidual) if self.remat else InvertedResidual

    x = relu6(
        conv_norm(
            conv,
            norm,
            x,
            make_divisible(32 * self.width_multiplier),
            "stem",
            kernel_size=3,
            strides=self.stem_stride,
        )
    )
    wanted = {entry["name"] for entry in self.feature_info()} if feature_maps else set()
    maps = {}
    index, shortcut = 0, None
    for (t, c, n, _), stride in zip(INVERTED_RESIDUAL_SETTING, self.stage_strides, strict=True):
      for i in range(stage_repeats(n, self.depth_multiplier)):
        x, shortcut = block(
            out_channels=make_divisible(c * self.width_multiplier),
            stride=stride if i == 0 else 1,
            expansion=1 if t == 1 else self.expansion,
            conv=conv,
            depthwise_conv=depthwise_conv,
            norm=norm,
            bottleneck=self.bottleneck,
            residual=self.residual,
            zero_init_residual=self.zero_init_residual,
            name=f"block{index}",
        )(x, shortcut)
        if f"block{index}" in wanted:
          maps[f"block{index}"] = x.astype(param_dtype)
        index += 1
    if feature_maps:
      return maps
    last_channels = make_divisible(1280 * max(1.0, self.width_multiplier))
    x = relu6(conv_norm(conv, norm, x, last_channels, "head"))
    x = jnp.mean(x, axis=(1, 2))
    if self.head == "features":
      return x.astype(param_dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=param_dtype, name="classifier")(x)
    return x.astype(param_dtype)


def downsampling_factor(stem_stride: int, stage_strides: Sequence[int]) -> int:
  factor = stem_stride
  for s in stage_strides:
    factor *= s
  return factor


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def create_model(
    model_config: Any,
    num_classes: int,
    freeze_batch_stats: bool = False,
    statistics_groups: int = 1,
) -> MobileNetV2:
  """Builds the model from `config.model` (an ml_collections ConfigDict)."""
  return MobileNetV2(
      freeze_batch_stats=freeze_batch_stats,
      statistics_groups=statistics_groups,
      num_classes=num_classes,
      width_multiplier=model_config.width_multiplier,
      depth_multiplier=model_config.get("depth_multiplier", 1.0),
      expansion=model_config.expansion,
      bottleneck=model_config.bottleneck,
      residual=model_config.residual,
      zero_init_residual=model_config.zero_init_residual,
      stem_stride=model_config.stem_stride,
      stage_strides=tuple(model_config.stage_strides),
      dropout_rate=model_config.dropout_rate,
      padding=model_config.padding,
      bn_momentum=model_config.bn_momentum,
      bn_epsilon=model_config.bn_epsilon,
      dtype=DTYPES[model_config.dtype],
      conv_impl=model_config.conv_impl,
      remat=model_config.remat,
      head=model_config.get("head", "classifier"),
  )


def random_weights_key(seed: int) -> jax.Array:
  """A key for random weights whose values do not matter (speed and latency
  measurements, test fixtures), not for the trainer's initialisation: "rbg"
  keys, drawn by XLA's own bit generator, compile an initialisation about
  twice as fast on a CPU as threefry's, whose rounds are compiled out for
  every parameter (measured 2026-12-03: 9.0 and 20.6 CPU-s for the 17-block
  width-0.35 model)."""
  return jax.random.key(seed, impl="rbg")


def count_macs(model: nn.Module, variables: Any, image_shape: Sequence[int]) -> int:
  """Multiply-adds of one forward pass on one image (convs and dense layers).

  Intercepts every conv/dense call while tracing the model abstractly, so the
  count always matches the configured architecture.
  """
  total = 0

  def interceptor(next_fun, args, kwargs, context):
    nonlocal total
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(
        module, (layers.Conv, layers.DepthwiseConv, nn.Dense)
    ):
      out_elems = 1
      for d in out.shape[1:]:
        out_elems *= d
      if isinstance(module, layers.Conv):
        total += out_elems * module.kernel_size**2 * args[0].shape[-1]
      elif isinstance(module, layers.DepthwiseConv):
        total += out_elems * module.kernel_size**2
      elif isinstance(module, nn.Dense):
        total += out_elems * args[0].shape[-1]
    return out

  with nn.intercept_methods(interceptor):
    jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False),
        variables,
        jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
    )
  return total


def size(model: nn.Module, image_shape: Sequence[int]) -> dict[str, int]:
  """Parameters, BatchNorm statistics and multiply-adds of one image, counted
  on abstract values (nothing is computed)."""
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)), train=False)
  )
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  return {
      "params": count(variables["params"]),
      "batch_stats": count(variables["batch_stats"]),
      "macs": count_macs(model, variables, image_shape),
  }
