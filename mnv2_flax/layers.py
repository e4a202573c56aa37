"""Conv and BatchNorm layers: interchangeable kernels, one parameter tree.

The modules take an `impl` name and dispatch to a compute function, while
always creating the same parameters (`kernel` of shape (k, k, 1, C) for
depthwise and (k, k, C_in, C_out) for regular convs, exactly like
`flax.linen.Conv`), so a checkpoint trained with one implementation restores
into any other.

Implementations:
  "xla":  `lax.conv_general_dilated` everywhere, BatchNorm by autodiff (best
          on GPU/TPU).
  "taps": the CPU kernels of `cpu_kernels` (depthwise as shifted
          multiply-adds, convs as matmuls, BatchNorm with hand-written VJPs,
          the widening convs fused with their BatchNorm); that module says
          why and how they were measured.
  "auto": "taps" on CPU, "xla" on every other backend.

`BatchNorm` likewise creates exactly `flax.linen.BatchNorm`'s variables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from mnv2_flax import cpu_kernels

Array = jax.Array
Padding = cpu_kernels.Padding

CONV_IMPLS = ("auto", "xla", "taps")
PADDINGS = ("symmetric", "tf_same")


def resolve_conv_impl(impl: str, backend: str | None = None, dtype: Any = jnp.float32) -> str:
  """Maps "auto" to the fastest measured implementation for `backend` and
  `dtype` (the CPU kernels compute in float32: float64 takes XLA's)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
  float64 = jnp.dtype(dtype) == jnp.float64
  if impl == "taps" and float64:
    raise ValueError("model.conv_impl 'taps' computes in float32; float64 needs 'xla' or 'auto'")
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  return "taps" if backend == "cpu" and not float64 else "xla"


def conv_padding(padding: str, in_size: int, kernel_size: int, stride: int) -> tuple[int, int]:
  """(low, high) zero padding of one spatial dimension.

  "symmetric" pads k//2 on both sides (torchvision). "tf_same" is TensorFlow's
  SAME: the output has ceil(in/stride) positions and the odd pixel of padding
  goes at the end, which is what Keras' `correct_pad` + "valid" produces.
  """
  if padding == "symmetric":
    return kernel_size // 2, kernel_size // 2
  if padding == "tf_same":
    out_size = -(-in_size // stride)
    total = max((out_size - 1) * stride + kernel_size - in_size, 0)
    return total // 2, total - total // 2
  raise ValueError(f"model.padding must be one of {PADDINGS}, got {padding!r}")


def spatial_padding(padding: str, shape: Sequence[int], kernel_size: int, stride: int) -> Padding:
  """Padding of an NHWC input's H and W for `lax` conv calls."""
  return [conv_padding(padding, s, kernel_size, stride) for s in shape[1:3]]


# --- "xla" implementations -----------------------------------------------------

_NHWC = ("NHWC", "HWIO", "NHWC")


def xla_conv(x: Array, kernel: Array, stride: int, pads: Padding) -> Array:
  return lax.conv_general_dilated(x, kernel, (stride, stride), pads, dimension_numbers=_NHWC)


def xla_depthwise_conv(x: Array, kernel: Array, stride: int, pads: Padding) -> Array:
  return lax.conv_general_dilated(
      x,
      kernel,
      (stride, stride),
      pads,
      dimension_numbers=_NHWC,
      feature_group_count=x.shape[-1],
  )


# Registries: impl name -> compute function(x, kernel, stride, pads).
CONV_FNS: dict[str, Callable[..., Array]] = {
    "xla": xla_conv,
    "taps": cpu_kernels.dot_conv,
}
DEPTHWISE_FNS: dict[str, Callable[..., Array]] = {
    "xla": xla_depthwise_conv,
    "taps": cpu_kernels.taps_depthwise_conv,
}
# impl name -> function(x, scale, bias, epsilon) -> (y, mean, var).
BATCH_NORM_FNS: dict[str, Callable[..., tuple[Array, Array, Array]]] = {
    "xla": cpu_kernels.batch_norm,
    "taps": cpu_kernels.fused_batch_norm,
}


# --- modules -------------------------------------------------------------------


# He (fan-out) init, as torchvision's MobileNetV2.
KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def convolve(
    module: nn.Module,
    x: Array,
    kernel_shape: tuple[int, ...],
    registry: dict[str, Callable[..., Array]],
) -> Array:
  """Creates `module`'s kernel and applies the implementation it names."""
  kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
  x, kernel = x.astype(module.dtype), kernel.astype(module.dtype)
  pads = spatial_padding(module.padding, x.shape, module.kernel_size, module.strides)
  return registry[resolve_conv_impl(module.impl, dtype=module.dtype)](
      x, kernel, module.strides, pads
  )


class Conv(nn.Module):
  """Bias-free kxk convolution; parameters identical to `nn.Conv(use_bias=False)`."""

  features: int
  kernel_size: int = 1
  strides: int = 1
  padding: str = "symmetric"
  impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., Array] = KERNEL_INIT

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    return convolve(self, x, (k, k, x.shape[-1], self.features), CONV_FNS)

  def matmul_input(self, x: Array) -> Array:
    """The patches P with `self(x) == P @ kernel.reshape(-1, features)`."""
    x = x.astype(self.dtype)
    k = self.kernel_size
    pads = spatial_padding(self.padding, x.shape, k, self.strides)
    return cpu_kernels.im2col(x, (k, k), self.strides, pads)


class DepthwiseConv(nn.Module):
  """Bias-free depthwise kxk convolution; parameters identical to
  `nn.Conv(C, (k, k), feature_group_count=C, use_bias=False)`."""

  kernel_size: int = 3
  strides: int = 1
  padding: str = "symmetric"
  impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., Array] = KERNEL_INIT

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    return convolve(self, x, (k, k, 1, x.shape[-1]), DEPTHWISE_FNS)


class BatchNorm(nn.Module):
  """BatchNorm over NHWC inputs with `flax.linen.BatchNorm`'s variables.

  params `scale`, `bias` and batch_stats `mean`, `var` (float32; float64 in a
  float64 model), updated as flax does: `ra = momentum * ra + (1 - momentum)
  * batch_value`, not while initialising. Under jit over a batch-sharded input
  the statistics are those of the global batch (XLA inserts the cross-device
  reductions).
  """

  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # E.g. zeros for the last BatchNorm of a residual block, so that the block
  # starts as the identity.
  scale_init: Callable[..., Array] = nn.initializers.ones
  # A known bug the device-layout tests must catch (config.testing.fault):
  # > 1 takes the statistics of each of this many equal slices of the batch
  # (one per device) instead of the whole batch's.
  statistics_groups: int = 1

  @nn.compact
  def __call__(
      self, x: Array, matmul_input: Array | None = None, matmul_kernel: Array | None = None
  ) -> Array:
    """Normalises x. When x is a convolution written as a matmul, x =
    `matmul_input @ matmul_kernel.reshape(-1, C)` (NHWC patches, HWIO
    kernel; see `Conv.matmul_input`), pass those too: the "taps" impl then
    fuses the two (`cpu_kernels.conv_batch_norm`) where that measured faster
    (K <= C: the stem and the expansion convs), and x itself is dead code
    under jit."""
    features = (x.shape[-1],)
    stats_dtype = cpu_kernels.statistics_dtype(self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, stats_dtype)
    ra_var = self.variable("batch_stats", "var", jnp.ones, features, stats_dtype)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
    compute_dtype = cpu_kernels.statistics_dtype(self.dtype)
    scale, bias = scale.astype(compute_dtype), bias.astype(compute_dtype)
    x = x.astype(self.dtype)
    if self.use_running_average:
      return cpu_kernels.normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon)
    impl = resolve_conv_impl(self.impl, dtype=self.dtype)
    if self.statistics_groups > 1 and not self.is_initializing():
      groups = x.reshape(self.statistics_groups, -1, *x.shape[1:])
      y, mean, var = jax.vmap(BATCH_NORM_FNS[impl], in_axes=(0, None, None, None))(
          groups, scale, bias, self.epsilon
      )
      y, mean, var = y.reshape(x.shape), mean.mean(0), var.mean(0)
    elif (
        impl == "taps"
        and matmul_input is not None
        and self.dtype == jnp.float32
        and matmul_input.shape[-1] <= x.shape[-1]
    ):
      y, mean, var = cpu_kernels.conv_batch_norm(
          matmul_input.astype(jnp.float32).reshape(-1, matmul_input.shape[-1]),
          matmul_kernel.astype(jnp.float32).reshape(-1, x.shape[-1]),
          scale,
          bias,
          self.epsilon,
      )
      y = y.reshape(x.shape)
    else:
      y, mean, var = BATCH_NORM_FNS[impl](x, scale, bias, self.epsilon)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var)
    return y
