"""CPU compute functions behind the "taps" implementation of `layers`.

MobileNetV2's cost is its depthwise 3x3 and 1x1 convolutions. XLA compiles
both well on GPU/TPU, but on CPU `lax.conv` with `feature_group_count=C` is
~30x slower than TensorFlow's depthwise kernel. The functions here are the
faster CPU formulations, written with plain `lax`/`jnp` ops (XLA still
compiles them) and hand-written VJPs where autodiff's backward pass was the
slow part:
  * depthwise conv as k*k shifted multiply-adds (`taps_depthwise_conv`), its
    input gradient computed polyphase and its kernel gradient as row-block
    sums (`_depthwise_kernel_grad`);
  * 1x1 convs as one 2-D matmul, kxk convs as im2col + matmul (`dot_conv`);
  * BatchNorm with a hand-written VJP (`fused_batch_norm`), and a conv that
    widens its input fused with the BatchNorm after it (`conv_batch_norm`):
    best on CPU for training, where every pass over a wide activation costs
    (the step is bound by memory traffic).
`batch_norm` (differentiated by autodiff, it is also the "xla" BatchNorm)
and `normalize` (eval mode, every implementation) live here too.

`layers` owns the parameters and picks these functions by implementation
name; nothing here creates variables, so every implementation keeps one
parameter tree. Convolutions take NHWC inputs, HWIO kernels and explicit
(low, high) padding per spatial dimension (`layers.spatial_padding`).

The measurements behind each kernel, and what was tried and dropped:
docs/cpu_kernels.md.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Padding = Sequence[tuple[int, int]]


# --- helpers shared by the convs -----------------------------------------------


def _out_hw(x: Array, kernel_hw: Sequence[int], stride: int, pads: Padding) -> tuple[int, int]:
  h, w = (
      (size + lo + hi - k) // stride + 1 for size, (lo, hi), k in zip(x.shape[1:3], pads, kernel_hw)
  )
  return h, w


def _pad_hw(x: Array, pads: Padding) -> Array:
  # `lax.pad`, unlike `jnp.pad`, takes negative padding (a crop), which the
  # polyphase input gradient needs.
  (top, bottom), (left, right) = pads
  config = [(0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)]
  return lax.pad(x, jnp.zeros((), x.dtype), config)


def _tap(
    xp: Array,
    i: int,
    j: int,
    stride: int,
    out_hw: Sequence[int],
    row_step: int = 1,
) -> Array:
  """`xp[:, i + stride*row_step*h, j + stride*w, :]` at every output position
  (h, w): tap (i, j) of the kernel; with `row_step` every row_step-th row."""
  n, _, _, c = xp.shape
  h_end = i + stride * row_step * (out_hw[0] - 1) + 1
  w_end = j + stride * (out_hw[1] - 1) + 1
  return lax.slice(xp, (0, i, j, 0), (n, h_end, w_end, c), (1, stride * row_step, stride, 1))


# --- depthwise conv ------------------------------------------------------------


def _tap_sum(x: Array, kernel: Array, stride: int, pads: Padding) -> Array:
  """Depthwise cross-correlation as k_h*k_w shifted multiply-adds.

  `kernel` is (k_h, k_w, 1, C) and may be empty or non-square (the polyphase
  sub-kernels). Accumulates in float32, so bfloat16 inputs round only once.
  """
  k_h, k_w = kernel.shape[:2]
  out_hw = _out_hw(x, kernel.shape[:2], stride, pads)
  xp = _pad_hw(x, pads).astype(jnp.float32)
  kernel = kernel.astype(jnp.float32)
  acc = jnp.zeros((x.shape[0], *out_hw, x.shape[3]), jnp.float32)
  for i in range(k_h):
    for j in range(k_w):
      acc = acc + _tap(xp, i, j, stride, out_hw) * kernel[i, j, 0]
  return acc


def _depthwise_input_grad(
    g: Array, kernel: Array, stride: int, pads: Padding, in_hw: Sequence[int]
) -> Array:
  """Transpose of `_tap_sum` with respect to x, computed polyphase.

  Padded-input position p = stride*m + q only receives taps i = stride*t + q,
  from output m - t. So each of the stride**2 phases (q_h, q_w) is a stride-1
  correlation of g with a flipped sub-kernel, and the phases interleave into
  the gradient. Autodiff instead correlates an interior-padded g that is
  mostly zeros (and, in the model, fuses the BatchNorm backward into every
  tap, computing it k*k times).
  """
  n, out_h, out_w, c = g.shape
  # Phase rows m in [start, start + size) cover padded rows [pad, pad + in).
  starts = [pad[0] // stride for pad in pads]
  sizes = [
      -(-(pad[0] + in_size) // stride) - start for pad, in_size, start in zip(pads, in_hw, starts)
  ]
  phases = []
  for q_h in range(stride):
    row = []
    for q_w in range(stride):
      sub = kernel[q_h::stride, q_w::stride][::-1, ::-1]
      sub_pads = [
          (kq - 1 - start, start + size - out_size)
          for kq, start, size, out_size in zip(sub.shape[:2], starts, sizes, (out_h, out_w))
      ]
      row.append(_tap_sum(g, sub, 1, sub_pads))
    phases.append(jnp.stack(row, axis=3))
  # (N, M_h, q_h, M_w, q_w, C) -> padded rows stride*m + q_h, cols likewise.
  dxp = jnp.stack(phases, axis=2).reshape(n, stride * sizes[0], stride * sizes[1], c)
  top = pads[0][0] - stride * starts[0]
  left = pads[1][0] - stride * starts[1]
  return dxp[:, top : top + in_hw[0], left : left + in_hw[1]]


# Row blocks of the kernel gradient's partial sums: the largest divisor of the
# output height up to this many rows (measured best at 56x56x144 among 7-56).
KERNEL_GRAD_MAX_ROWS = 28
# Smaller outputs (14x14, 7x7 at 224) keep the variadic reduce: there the
# loop's per-step overhead outweighs its gain (train step with the loop from
# 28 rows: 5 % faster; from 14 rows: 3.5 %; everywhere: 2 %).
KERNEL_GRAD_LOOP_MIN_ROWS = 28


def _row_block(out_h: int) -> int:
  return max(r for r in range(1, min(out_h, KERNEL_GRAD_MAX_ROWS) + 1) if out_h % r == 0)


def _depthwise_kernel_grad(
    x: Array, g: Array, kernel_shape: Sequence[int], stride: int, pads: Padding
) -> Array:
  """Transpose of `_tap_sum` with respect to the kernel:
  dk[i, j, c] = sum over n, h, w of xp[n, stride*h + i, stride*w + j, c] * g[n, h, w, c].

  XLA:CPU compiles a fused reduction to scalar code (one loop per output
  element) but vectorises elementwise fusions along C. On one device the sum
  over rows is therefore written as unrolled adds of row blocks (strided
  slices of the product, which is never written to memory), in a loop over
  pairs of images that keeps each step's inputs in cache while all k*k taps
  read them; only the small per-tap partial sums reach a real reduction.
  Measured at 32x56x56x144 from a padded input: 7.5 ms against 13 ms for the
  variadic reduce below (3.3 against 4.6 ms at stride 2). In the train step
  (224x224, batch 32, both versions alternating in one process) the loop for
  outputs of 28 rows or more took 550-625 ms against 580-652 (~5 %).

  The variadic reduce stays for small outputs (`KERNEL_GRAD_LOOP_MIN_ROWS`)
  and over several devices: there the loop would run along the sharded batch
  axis, and XLA gathers the whole activation onto every device (with 2 devices
  a step took 701 ms against 570).
  """
  xp = _pad_hw(x, pads).astype(jnp.float32)
  g = g.astype(jnp.float32)
  if jax.device_count() > 1 or g.shape[1] < KERNEL_GRAD_LOOP_MIN_ROWS:
    return _kernel_grad_reduce(xp, g, kernel_shape, stride)
  return _kernel_grad_loop(xp, g, kernel_shape, stride)


def _kernel_grad_reduce(xp: Array, g: Array, kernel_shape: Sequence[int], stride: int) -> Array:
  """One variadic reduce yields all k*k per-channel sums in a single fused
  pass over g and xp. It covers W only (output (N, H, C) per tap) and a plain
  sum over N and H follows: ~7% faster than reducing H and W together, which
  in turn is ~4x faster than reducing N, H and W at once."""
  k_h, k_w = kernel_shape[:2]
  products = tuple(_tap(xp, i, j, stride, g.shape[1:3]) * g for i in range(k_h) for j in range(k_w))
  sums = lax.reduce(
      products,
      (jnp.float32(0),) * len(products),
      lambda a, b: tuple(u + v for u, v in zip(a, b)),
      (2,),
  )
  return jnp.stack(sums).sum(axis=(1, 2)).reshape(kernel_shape)


def _kernel_grad_loop(xp: Array, g: Array, kernel_shape: Sequence[int], stride: int) -> Array:
  """Row-block sums in a loop over pairs of images (see `_depthwise_kernel_grad`)."""
  k_h, k_w = kernel_shape[:2]
  n, out_h, out_w, c = g.shape
  rows = _row_block(out_h)
  blocks = out_h // rows
  batch = 2 if n % 2 == 0 else 1  # Images per step: measured best of 1, 2, 4.

  def tap_sums(xb: Array, gb: Array) -> tuple[Array, ...]:
    sums = []
    for i in range(k_h):
      for j in range(k_w):
        # Row block r of tap (i, j), sliced from xb directly (slicing a sliced
        # tap made XLA materialise the tap), with lax ops rather than jnp
        # indexing: at 224x224 this unrolls to ~7,000 ops, all traced.
        sums.append(
            functools.reduce(
                lax.add,
                (
                    lax.mul(
                        _tap(xb, stride * r + i, j, stride, (blocks, out_w), rows),
                        _tap(gb, r, 0, 1, (blocks, out_w), rows),
                    )
                    for r in range(rows)
                ),
            )
        )
    return tuple(sums)

  def add_images(step: Array, sums: tuple[Array, ...]) -> tuple[Array, ...]:
    xb = lax.dynamic_slice_in_dim(xp, step * batch, batch)
    gb = lax.dynamic_slice_in_dim(g, step * batch, batch)
    return tuple(s + t for s, t in zip(sums, tap_sums(xb, gb)))

  zeros = jnp.zeros((batch, blocks, out_w, c), jnp.float32)
  sums = lax.fori_loop(0, n // batch, add_images, (zeros,) * (k_h * k_w))
  return jnp.stack([s.sum(axis=(0, 1, 2)) for s in sums]).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def taps_depthwise_conv(x: Array, kernel: Array, stride: int, pads: Padding) -> Array:
  return _tap_sum(x, kernel, stride, pads).astype(x.dtype)


def _taps_depthwise_fwd(x, kernel, stride, pads):
  return taps_depthwise_conv(x, kernel, stride, pads), (x, kernel)


def _taps_depthwise_bwd(stride, pads, residuals, g):
  x, kernel = residuals
  dx = _depthwise_input_grad(g, kernel, stride, pads, x.shape[1:3])
  dk = _depthwise_kernel_grad(x, g, kernel.shape, stride, pads)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


taps_depthwise_conv.defvjp(_taps_depthwise_fwd, _taps_depthwise_bwd)


# --- regular conv --------------------------------------------------------------


def dot_conv(x: Array, kernel: Array, stride: int, pads: Padding) -> Array:
  """Regular conv as im2col + one 2-D matmul; for 1x1 just a (strided) matmul.

  On CPU a 1x1 conv as a 2-D `jnp.dot` trains ~4-6x faster than `lax.conv`,
  and faster than a 4-D `dot_general`, whose backward pass is slow. For the
  3x3 stem, im2col trains ~10% faster than `lax.conv` (its forward pass alone
  is ~1.7x slower: building the 27-channel patches dominates).
  """
  patches = im2col(x, kernel.shape, stride, pads)
  y = jnp.dot(patches.reshape(-1, patches.shape[-1]), kernel.reshape(-1, kernel.shape[-1]))
  return y.reshape(*patches.shape[:3], kernel.shape[-1])


def im2col(x: Array, kernel_shape: Sequence[int], stride: int, pads: Padding) -> Array:
  """(N, H_out, W_out, k_h * k_w * C_in) patches: the conv is then
  `patches @ kernel.reshape(-1, C_out)`. For 1x1 kernels just x, strided."""
  k_h, k_w = kernel_shape[:2]
  out_hw = _out_hw(x, kernel_shape[:2], stride, pads)
  xp = _pad_hw(x, pads)
  # Channel order (i, j, c_in) matches the row order of the HWIO reshape.
  taps = [_tap(xp, i, j, stride, out_hw) for i in range(k_h) for j in range(k_w)]
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


# --- BatchNorm -----------------------------------------------------------------

_NHW = (0, 1, 2)  # BatchNorm reduces over batch and space, per channel.


def statistics_dtype(dtype: Any) -> Any:
  """BatchNorm's statistics and arithmetic: float32, or float64 for float64
  activations (bfloat16 would lose the variance)."""
  return jnp.promote_types(dtype, jnp.float32)


def batch_norm(x: Array, scale: Array, bias: Array, epsilon: float) -> tuple[Array, Array, Array]:
  """Training-mode BatchNorm of NHWC `x`: (output, batch mean, batch variance).

  Statistics in float32 (float64 for float64 `x`) from E[x] and E[x^2]
  (flax's default "fast variance"); the output has x's dtype.
  """
  xf = x.astype(statistics_dtype(x.dtype))
  mean = jnp.mean(xf, _NHW)
  var = jnp.maximum(jnp.mean(xf * xf, _NHW) - mean * mean, 0.0)
  return normalize(x, mean, var, scale, bias, epsilon), mean, var


def normalize(
    x: Array, mean: Array, var: Array, scale: Array, bias: Array, epsilon: float
) -> Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias in float32 (float64 for
  float64 `x`), in x's dtype."""
  y = (x.astype(statistics_dtype(x.dtype)) - mean) * (scale * lax.rsqrt(var + epsilon)) + bias
  return y.astype(x.dtype)


def _batch_norm_grad_coefficients(
    scale: Array,
    mean: Array,
    rstd: Array,
    sum_g: Array,
    sum_g_xc: Array,
    d_mean: Array,
    d_var: Array,
    count: int,
) -> tuple[Array, Array, Array]:
  """(a, x_coeff, offset) with dx = a * g + x_coeff * x + offset per channel,
  from sum(g) and sum(g * (x - mean)); see `_fused_batch_norm_bwd`."""
  a = scale * rstd
  x_coeff = (2.0 * d_var - a * rstd * rstd * sum_g_xc) / count
  offset = (d_mean - a * sum_g) / count - x_coeff * mean
  return a, x_coeff, offset


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fused_batch_norm(
    x: Array, scale: Array, bias: Array, epsilon: float
) -> tuple[Array, Array, Array]:
  return batch_norm(x, scale, bias, epsilon)


def _fused_batch_norm_fwd(x, scale, bias, epsilon):
  y, mean, var = batch_norm(x, scale, bias, epsilon)
  return (y, mean, var), (x, scale, mean, lax.rsqrt(var + epsilon))


def _fused_batch_norm_bwd(epsilon, residuals, cotangents):
  """Two reductions and one elementwise pass over x.

  Autodiff of `batch_norm` writes x - mean as a whole tensor and reduces
  three times; on CPU BatchNorm then costs as much as the depthwise
  convolutions. With a = scale * rstd and M values per channel,
    dx = a * (g - sum(g) / M) - a * rstd^2 * sum(g * (x - mean)) / M * (x - mean)
         + d_mean / M + 2 * d_var * (x - mean) / M,
  where the last two terms carry the cotangents of the returned statistics
  (zero when those only update the running averages). Everything is written
  in terms of x, not x - mean: XLA would otherwise materialise x - mean for
  its several consumers. sum(g * (x - mean)) = sum(g * x) - mean * sum(g)
  cancels no worse than the forward's E[x^2] - E[x]^2.
  """
  del epsilon
  x, scale, mean, rstd = residuals
  g, d_mean, d_var = cotangents
  count = x.size // x.shape[-1]
  xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
  sum_g = jnp.sum(gf, _NHW)
  sum_g_xc = jnp.sum(gf * xf, _NHW) - mean * sum_g
  a, x_coeff, offset = _batch_norm_grad_coefficients(
      scale, mean, rstd, sum_g, sum_g_xc, d_mean, d_var, count
  )
  dx = a * gf + x_coeff * xf + offset
  return dx.astype(x.dtype), sum_g_xc * rstd, sum_g


fused_batch_norm.defvjp(_fused_batch_norm_fwd, _fused_batch_norm_bwd)


def _matmul_stats(x_in: Array, kernel: Array) -> tuple[Array, Array, Array, Array]:
  """Column sums and Gram matrix of x_in, and the per-channel mean and
  variance of x = x_in @ kernel computed from them (never from x)."""
  count = x_in.shape[0]
  col_sum = jnp.sum(x_in, 0)
  gram = jnp.dot(x_in.T, x_in)
  mean = col_sum @ kernel / count
  mean_sq = jnp.sum(kernel * (gram @ kernel), 0) / count
  return col_sum, gram, mean, jnp.maximum(mean_sq - mean * mean, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def conv_batch_norm(
    x_in: Array, kernel: Array, scale: Array, bias: Array, epsilon: float
) -> tuple[Array, Array, Array]:
  """`batch_norm(x_in @ kernel, ...)` for 2-D float32 x_in (M, K) and kernel
  (K, C) with K <= C: a conv as a matmul whose output is wider than its
  input (the expansion 1x1 convs: 6x; the stem's 27 patch channels: 32).

  The statistics come from x_in's Gram matrix (K x K) and the normalisation
  folds into the matmul, so the wide pre-BatchNorm tensor is never written
  or read. The VJP likewise works with x_in and the cotangent only: where
  the two-step version passes over (M, C) tensors eight times in the
  backward pass, this one passes three times (two matmuls, one sum).
  """
  return _conv_batch_norm_fwd(x_in, kernel, scale, bias, epsilon)[0]


def _conv_batch_norm_fwd(x_in, kernel, scale, bias, epsilon):
  col_sum, gram, mean, var = _matmul_stats(x_in, kernel)
  rstd = lax.rsqrt(var + epsilon)
  a = scale * rstd
  y = jnp.dot(x_in, kernel * a) + (bias - mean * a)
  return (y, mean, var), (x_in, kernel, scale, col_sum, gram, mean, rstd)


def _conv_batch_norm_bwd(epsilon, residuals, cotangents):
  """`_fused_batch_norm_bwd` with x = x_in @ kernel substituted:
  sum(g * x) = colsum(kernel * (x_in^T g)), and dx_bn = a g + c x + o
  reaches x_in and the kernel as g (a kernel^T) + x_in (kernel c kernel^T)
  + o kernel^T and (x_in^T g) a + (gram kernel) c + col_sum o^T."""
  del epsilon
  x_in, kernel, scale, col_sum, gram, mean, rstd = residuals
  g, d_mean, d_var = cotangents
  count = x_in.shape[0]
  in_g = jnp.dot(x_in.T, g)
  sum_g = jnp.sum(g, 0)
  sum_g_xc = jnp.sum(kernel * in_g, 0) - mean * sum_g
  a, x_coeff, offset = _batch_norm_grad_coefficients(
      scale, mean, rstd, sum_g, sum_g_xc, d_mean, d_var, count
  )
  d_x_in = (
      jnp.dot(g, (kernel * a).T) + jnp.dot(x_in, (kernel * x_coeff) @ kernel.T) + offset @ kernel.T
  )
  d_kernel = in_g * a + (gram @ kernel) * x_coeff + jnp.outer(col_sum, offset)
  return d_x_in, d_kernel, sum_g_xc * rstd, sum_g


conv_batch_norm.defvjp(_conv_batch_norm_fwd, _conv_batch_norm_bwd)
