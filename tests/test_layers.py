"""The "taps" kernels must be drop-in replacements for the "xla" ones."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mnv2_flax import cpu_kernels, layers

# Odd H != even W: covers both parities, and at stride 2 tf_same pads the two
# dimensions differently ((1, 1) for H, (0, 1) for W).
HW = (9, 8)


def _random(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


@functools.partial(jax.jit, static_argnums=0)
def _forward_and_vjp(module, params, x, cotangent):
  y, vjp = jax.vjp(lambda p, x: module.apply(p, x), params, x)
  return y, vjp(cotangent)


def _assert_taps_matches_xla(make_module, x, tol=1e-5):
  """Outputs and gradients w.r.t. params and x agree between the impls."""
  xla, taps = make_module(impl="xla"), make_module(impl="taps")
  # Unit-scale random parameters rather than the (small) initial ones.
  params = jax.tree.map(
      lambda p: _random(p.shape, seed=1, dtype=p.dtype),
      jax.eval_shape(xla.init, jax.random.key(0), x),
  )
  out = jax.eval_shape(xla.apply, params, x)
  cotangent = _random(out.shape, seed=2, dtype=out.dtype)
  expected = _forward_and_vjp(xla, params, x, cotangent)
  actual = _forward_and_vjp(taps, params, x, cotangent)
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.shape == e.shape and a.dtype == e.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), tol, tol)


@pytest.mark.parametrize("padding", layers.PADDINGS)
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_matches_xla(stride, padding):
  make = functools.partial(layers.DepthwiseConv, strides=stride, padding=padding)
  _assert_taps_matches_xla(make, _random((2, *HW, 8), seed=0))


@pytest.mark.parametrize("padding", layers.PADDINGS)
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_kernel_grad_formulations_match_xla(stride, padding):
  """Both kernel-gradient formulations (the loop, and the variadic reduce for
  small outputs and several devices) against autodiff of `lax.conv`. 60 rows
  take the loop (3 row blocks of 20 at stride 1, 2 of 15 at stride 2; the
  model tests' outputs are all below `KERNEL_GRAD_LOOP_MIN_ROWS`), and the odd
  batch makes it take one image per step."""
  x = _random((3, 60, 7, 4), seed=0)
  kernel = _random((3, 3, 1, 4), seed=1)
  pads = layers.spatial_padding(padding, x.shape, 3, stride)
  out, vjp = jax.vjp(lambda k: layers.xla_depthwise_conv(x, k, stride, pads), kernel)
  g = _random(out.shape, seed=2)
  (expected,) = vjp(g)
  xp = cpu_kernels._pad_hw(x, pads)
  loop = cpu_kernels._kernel_grad_loop(xp, g, kernel.shape, stride)
  reduce = cpu_kernels._kernel_grad_reduce(xp, g, kernel.shape, stride)
  assert jax.device_count() == 1  # So `_depthwise_kernel_grad` takes the loop.
  chosen = cpu_kernels._depthwise_kernel_grad(x, g, kernel.shape, stride, pads)
  for actual in (loop, reduce, chosen):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("padding", layers.PADDINGS)
@pytest.mark.parametrize("stride", [1, 2])
def test_stem_conv_matches_xla(stride, padding):
  make = functools.partial(layers.Conv, 8, kernel_size=3, strides=stride, padding=padding)
  _assert_taps_matches_xla(make, _random((2, *HW, 3), seed=0))


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_matches_xla(stride):
  make = functools.partial(layers.Conv, 16, kernel_size=1, strides=stride)
  _assert_taps_matches_xla(make, _random((2, *HW, 8), seed=0))


@pytest.mark.parametrize(
    "module, reference",
    [
        (
            layers.DepthwiseConv(),
            nn.Conv(8, (3, 3), feature_group_count=8, use_bias=False),
        ),
        (layers.Conv(16, kernel_size=1), nn.Conv(16, (1, 1), use_bias=False)),
        (layers.Conv(16, kernel_size=3), nn.Conv(16, (3, 3), use_bias=False)),
    ],
)
def test_params_are_independent_of_impl(module, reference):
  x, rng = jnp.zeros((2, 8, 8, 8)), jax.random.key(0)
  xla = jax.jit(module.clone(impl="xla").init)(rng, x)
  taps = jax.jit(module.clone(impl="taps").init)(rng, x)
  assert jax.tree.structure(taps) == jax.tree.structure(xla)
  for a, e in zip(jax.tree.leaves(taps), jax.tree.leaves(xla)):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(a, e)
  expected = jax.eval_shape(reference.init, rng, x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), taps) == jax.tree.map(
      lambda a: (a.shape, a.dtype), expected
  )


@pytest.mark.parametrize(
    "make_module",
    [
        functools.partial(layers.DepthwiseConv, strides=2, padding="tf_same"),
        functools.partial(layers.Conv, 16, kernel_size=1),
    ],
)
def test_bfloat16_under_jit(make_module):
  # bfloat16 rounds to ~4e-3 relative; the impls must agree to that precision
  # and in every dtype (bfloat16 activations, float32 parameter gradients).
  make = functools.partial(make_module, dtype=jnp.bfloat16)
  x = _random((2, *HW, 8), seed=0, dtype=jnp.bfloat16)
  _assert_taps_matches_xla(make, x, tol=2e-2)


def test_auto_is_taps_on_cpu_only():
  assert layers.resolve_conv_impl("auto", "cpu") == "taps"
  assert layers.resolve_conv_impl("auto", "gpu") == "xla"


def _batch_norm_step(module, variables, x, cotangent):
  """Train-mode output, updated running statistics and the gradients w.r.t.
  the params and x of <output, cotangent>."""

  def forward(params, x):
    y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return y, updates["batch_stats"]

  y, vjp, stats = jax.vjp(forward, variables["params"], x, has_aux=True)
  return y, stats, vjp(cotangent)


@pytest.mark.parametrize("impl", ["xla", "taps"])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_batch_norm_matches_flax(impl, dtype, tol):
  # An offset mean and uneven scale exercise the variance and centring terms.
  x = (3.0 + 2.0 * _random((4, *HW, 8), seed=0)).astype(dtype)
  kwargs = dict(momentum=0.9, epsilon=1e-3, dtype=dtype)
  ours = layers.BatchNorm(impl=impl, **kwargs)
  flax_bn = nn.BatchNorm(use_running_average=False, **kwargs)
  variables = jax.jit(ours.init)(jax.random.key(0), x)
  reference = jax.jit(flax_bn.init)(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == jax.tree.map(
      lambda a: (a.shape, a.dtype), reference
  )
  variables = jax.tree.map(
      lambda v: v + _random(v.shape, seed=v.size, dtype=v.dtype) ** 2, variables
  )
  cotangent = _random(x.shape, seed=3, dtype=dtype)
  step = jax.jit(_batch_norm_step, static_argnums=0)
  actual = step(ours, variables, x, cotangent)
  expected = step(flax_bn, variables, x, cotangent)
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.shape == e.shape and a.dtype == e.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), tol, tol)
  eval_ours = ours.clone(use_running_average=True).apply(variables, x)
  eval_flax = flax_bn.clone(use_running_average=True).apply(variables, x)
  np.testing.assert_allclose(
      np.asarray(eval_ours, np.float32), np.asarray(eval_flax, np.float32), tol, tol
  )


def test_batch_norm_scale_init():
  # Zero-initialised scales (residual blocks that start as the identity);
  # the default stays flax's ones.
  x = jnp.zeros((2, 4, 4, 8))
  default = layers.BatchNorm().init(jax.random.key(0), x)["params"]
  zeros = layers.BatchNorm(scale_init=nn.initializers.zeros).init(jax.random.key(0), x)["params"]
  np.testing.assert_array_equal(default["scale"], np.ones(8, np.float32))
  np.testing.assert_array_equal(zeros["scale"], np.zeros(8, np.float32))
  assert zeros["scale"].dtype == jnp.float32


def test_fused_batch_norm_gradient_of_statistics():
  # The running averages never get a gradient in training, but the VJP must
  # still be right when someone differentiates the batch statistics.
  x = 1.0 + _random((2, *HW, 8), seed=0)
  scale, bias = _random((8,), seed=1), _random((8,), seed=2)
  cotangents = tuple(_random(shape, seed=3 + i) for i, shape in enumerate([x.shape, (8,), (8,)]))

  def vjp(fn):
    return jax.vjp(lambda *a: fn(*a, 1e-3), x, scale, bias)[1](cotangents)

  for a, e in zip(vjp(cpu_kernels.fused_batch_norm), vjp(cpu_kernels.batch_norm)):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kernel_size, stride, in_channels, out_channels",
    [(1, 1, 8, 48), (1, 1, 48, 8), (3, 2, 3, 32)],
)
def test_conv_batch_norm_matches_two_steps(kernel_size, stride, in_channels, out_channels):
  # Expansion (8 -> 48) and the stem (27 patch channels -> 32) take the
  # fused path on "taps"; projection (48 -> 8) and "xla" run conv, then
  # BatchNorm. All must agree: outputs, running statistics and gradients
  # w.r.t. the input, the kernel, scale and bias.
  x = 1.0 + _random((4, *HW, in_channels), seed=0)
  conv = layers.Conv(out_channels, kernel_size=kernel_size, strides=stride)
  norm = layers.BatchNorm(momentum=0.9)

  def conv_norm(impl, conv_params, norm_variables, x):
    bound = conv.clone(impl=impl).bind(conv_params)
    out, updates = norm.clone(impl=impl).apply(
        norm_variables,
        bound(x),
        matmul_input=bound.matmul_input(x),
        matmul_kernel=conv_params["params"]["kernel"],
        mutable=["batch_stats"],
    )
    return out, updates["batch_stats"]

  conv_params = jax.tree.map(lambda p: _random(p.shape, seed=1), conv.init(jax.random.key(0), x))
  norm_variables = norm.init(jax.random.key(0), conv.apply(conv_params, x))
  norm_variables["params"] = jax.tree.map(
      lambda p: 1.0 + _random(p.shape, seed=p.size), norm_variables["params"]
  )
  cotangent = _random(conv.apply(conv_params, x).shape, seed=3)
  outputs = {}
  for impl in ("xla", "taps"):
    f = functools.partial(conv_norm, impl)
    (out, stats), vjp = jax.vjp(f, conv_params, norm_variables, x)
    outputs[impl] = (out, stats, vjp((cotangent, jax.tree.map(jnp.zeros_like, stats))))
  for a, e in zip(jax.tree.leaves(outputs["taps"]), jax.tree.leaves(outputs["xla"])):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-4)
