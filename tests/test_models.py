"""MobileNetV2 architecture: sizes against the references, block rules, options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mnv2_flax import layers, models


def count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def abstract_variables(model, shape):
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))


def test_reference_sizes_at_width_1_224():
  # torchvision / Keras MobileNetV2(weights=None): 3,504,872 trainable params.
  model = models.MobileNetV2(num_classes=1000)
  variables = abstract_variables(model, (224, 224, 3))
  assert count(variables["params"]) == 3_504_872
  assert count(variables["batch_stats"]) == 34_112
  # torchvision reports 300.77 M multiply-adds ("0.30 GFLOPS").
  assert models.count_macs(model, variables, (224, 224, 3)) == 300_774_272


@pytest.mark.parametrize("width,channels", [(0.35, (16, 8, 1280)), (1.4, (48, 24, 1792))])
def test_width_multiplier_rounds_to_multiples_of_8(width, channels):
  model = models.MobileNetV2(num_classes=10, width_multiplier=width)
  params = abstract_variables(model, (32, 32, 3))["params"]
  stem, first_block, head = channels
  assert params["stem"]["kernel"].shape == (3, 3, 3, stem)
  assert params["block0"]["project"]["kernel"].shape[-1] == first_block
  assert params["head"]["kernel"].shape[-1] == head
  assert all(leaf.shape[-1] % 8 == 0 for leaf in jax.tree.leaves(params)
             if leaf.ndim == 4)


def test_block_structure_follows_table_2():
  params = abstract_variables(models.MobileNetV2(num_classes=10), (32, 32, 3))["params"]
  blocks = sorted((k for k in params if k.startswith("block")), key=lambda k: int(k[5:]))
  assert len(blocks) == 17  # 1 + 2 + 3 + 4 + 3 + 3 + 1
  assert "expand" not in params["block0"]  # t = 1: no expansion conv.
  assert params["block1"]["expand"]["kernel"].shape == (1, 1, 16, 96)  # 16 * 6
  assert params["block1"]["depthwise"]["kernel"].shape == (3, 3, 1, 96)
  assert params["block16"]["project"]["kernel"].shape == (1, 1, 960, 320)


def test_expansion_changes_the_graph():
  params = abstract_variables(models.MobileNetV2(num_classes=10, expansion=4),
                              (32, 32, 3))["params"]
  assert params["block1"]["expand"]["kernel"].shape == (1, 1, 16, 64)
  assert "expand" not in params["block0"]  # The t = 1 block stays t = 1.


def block_output(stride, in_channels, out_channels, bottleneck="linear"):
  """An InvertedResidual whose projection BN outputs exactly zero."""
  block = models.InvertedResidual(
      out_channels=out_channels, stride=stride, expansion=6,
      conv=layers.Conv, depthwise_conv=layers.DepthwiseConv,
      norm=lambda name: nn.BatchNorm(use_running_average=True, name=name),
      bottleneck=bottleneck)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, in_channels))
  variables = block.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: p, variables["params"])
  params["project_bn"]["scale"] = jnp.zeros_like(params["project_bn"]["scale"])
  return x, block.apply({**variables, "params": params}, x), block, variables


def test_residual_only_with_stride_1_and_equal_channels():
  x, y, _, _ = block_output(stride=1, in_channels=16, out_channels=16)
  np.testing.assert_allclose(y, x, atol=1e-6)  # Identity + zero branch.
  _, y, _, _ = block_output(stride=1, in_channels=16, out_channels=24)
  np.testing.assert_allclose(y, 0.0, atol=1e-6)  # Channels differ: no shortcut.
  _, y, _, _ = block_output(stride=2, in_channels=16, out_channels=16)
  assert y.shape == (2, 4, 4, 16)
  np.testing.assert_allclose(y, 0.0, atol=1e-6)  # Stride 2: no shortcut.


def test_bottleneck_relu6_clips_the_projection():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 16))
  outputs = {}
  for bottleneck in models.BOTTLENECKS:
    block = models.InvertedResidual(
        out_channels=24, stride=1, expansion=6, conv=layers.Conv,
        depthwise_conv=layers.DepthwiseConv,
        norm=lambda name: nn.BatchNorm(use_running_average=False, name=name),
        bottleneck=bottleneck)
    variables = block.init(jax.random.PRNGKey(0), x)
    outputs[bottleneck], _ = block.apply(variables, x, mutable=["batch_stats"])
  assert float(outputs["linear"].min()) < -0.5  # BN output: ~N(0, 1).
  assert float(outputs["relu6"].min()) >= 0.0
  assert float(outputs["relu6"].max()) <= 6.0
  np.testing.assert_allclose(outputs["relu6"], jnp.clip(outputs["linear"], 0, 6),
                             atol=1e-6)


@pytest.fixture(scope="module")
def small_model():
  model = models.MobileNetV2(num_classes=5, width_multiplier=0.35, stem_stride=1)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  return model, model.init(jax.random.PRNGKey(1), x, train=False), x


def test_train_mode_updates_batch_stats_and_uses_dropout(small_model):
  model, variables, x = small_model
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.PRNGKey(2)})
  assert logits.shape == (4, 5)
  old = variables["batch_stats"]["stem_bn"]["mean"]
  assert not np.allclose(updates["batch_stats"]["stem_bn"]["mean"], old)
  other, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.PRNGKey(3)})
  assert not np.allclose(logits, other)  # Dropout depends on the rng.
  eval_a = model.apply(variables, x, train=False)
  eval_b = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)


def test_bfloat16_compute_keeps_float32_params(small_model):
  model, variables, x = small_model
  bf16 = model.clone(dtype=jnp.bfloat16)
  params = bf16.init(jax.random.PRNGKey(1), x, train=False)["params"]
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  logits = bf16.apply(variables, x, train=False)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, model.apply(variables, x, train=False),
                             atol=0.1, rtol=0.1)


def test_remat_recomputes_the_same_step(small_model):
  # Per-block rematerialisation trades memory for compute; the loss, the
  # gradients and the new running statistics must not change (beyond
  # summation order).
  model, variables, x = small_model

  def loss_and_grads(m):
    def loss(params):
      logits, updates = m.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"],
                                rngs={"dropout": jax.random.PRNGKey(2)})
      return jnp.sum(logits**2), updates
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  plain, remat = loss_and_grads(model), loss_and_grads(model.clone(remat=True))
  assert jax.tree.structure(plain) == jax.tree.structure(remat)
  # Gradients here reach ~1e3, and some (biases before a BatchNorm) are zero
  # up to float noise of that scale.
  scale = max(float(np.max(np.abs(e))) for e in jax.tree.leaves(plain))
  for a, e in zip(jax.tree.leaves(remat), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("padding", ["symmetric", "tf_same"])
def test_input_size_and_padding_give_expected_feature_sizes(padding):
  model = models.MobileNetV2(num_classes=3, width_multiplier=0.35, padding=padding)
  for size in (32, 33, 65):  # Odd sizes exercise tf_same's asymmetric padding.
    logits = jax.eval_shape(
        lambda: model.init_with_output(jax.random.PRNGKey(0),
                                       jnp.zeros((2, size, size, 3)))[0])
    assert logits.shape == (2, 3)


def test_make_divisible_matches_reference_rule():
  assert [models.make_divisible(v) for v in (32 * 0.35, 16 * 0.35, 1280, 24 * 0.75, 4)] \
      == [16, 8, 1280, 24, 8]
