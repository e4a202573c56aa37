"""MobileNetV2 architecture: sizes against the references, block rules, options."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mnv2_flax import layers, models

# One worker: the tests share the compiled small_model.
pytestmark = pytest.mark.xdist_group("models")


def count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def abstract_variables(model, shape):
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False)
  )


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
  assert all(leaf.shape[-1] % 8 == 0 for leaf in jax.tree.leaves(params) if leaf.ndim == 4)


def test_block_structure_follows_table_2():
  params = abstract_variables(models.MobileNetV2(num_classes=10), (32, 32, 3))["params"]
  blocks = sorted((k for k in params if k.startswith("block")), key=lambda k: int(k[5:]))
  assert len(blocks) == 17  # 1 + 2 + 3 + 4 + 3 + 3 + 1
  assert "expand" not in params["block0"]  # t = 1: no expansion conv.
  assert params["block1"]["expand"]["kernel"].shape == (1, 1, 16, 96)  # 16 * 6
  assert params["block1"]["depthwise"]["kernel"].shape == (3, 3, 1, 96)
  assert params["block16"]["project"]["kernel"].shape == (1, 1, 960, 320)


@pytest.mark.parametrize(
    "depth_multiplier, blocks_per_stage",
    [(0.25, (1, 1, 1, 1, 1, 1, 1)), (0.5, (1, 1, 2, 2, 2, 2, 1)), (2.0, (2, 4, 6, 8, 6, 6, 2))],
)
def test_depth_multiplier_scales_blocks_per_stage(depth_multiplier, blocks_per_stage):
  model = models.MobileNetV2(num_classes=10, depth_multiplier=depth_multiplier)
  params = abstract_variables(model, (32, 32, 3))["params"]
  # Each stage's first block changes the width: its projection's channels
  # tell which stage a block belongs to.
  widths = [
      params[f"block{i}"]["project"]["kernel"].shape[-1] for i in range(sum(blocks_per_stage))
  ]
  assert f"block{sum(blocks_per_stage)}" not in params
  stage_widths = [16, 24, 32, 64, 96, 160, 320]
  assert widths == [w for w, n in zip(stage_widths, blocks_per_stage) for _ in range(n)]
  # The strides stay the paper's: the feature maps' strides do not change.
  assert [e["stride"] for e in model.feature_info()] == [2, 4, 8, 16, 32]


def test_expansion_changes_the_graph():
  params = abstract_variables(models.MobileNetV2(num_classes=10, expansion=4), (32, 32, 3))[
      "params"
  ]
  assert params["block1"]["expand"]["kernel"].shape == (1, 1, 16, 64)
  assert "expand" not in params["block0"]  # The t = 1 block stays t = 1.


def make_block(
    stride,
    in_channels,
    out_channels,
    *,
    bottleneck="linear",
    residual="bottleneck",
    use_running_average=True,
    **kwargs,
):
  """An InvertedResidual with flax's BatchNorm, and its variables on an input."""
  block = models.InvertedResidual(
      out_channels=out_channels,
      stride=stride,
      expansion=6,
      conv=layers.Conv,
      depthwise_conv=layers.DepthwiseConv,
      norm=functools.partial(nn.BatchNorm, use_running_average=use_running_average),
      bottleneck=bottleneck,
      residual=residual,
      **kwargs,
  )
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, in_channels))
  return block, block.init(jax.random.PRNGKey(0), x), x


def block_output(stride, in_channels, out_channels, residual="bottleneck", shortcut=None):
  """(input, output, hand-over) of a block whose projection BN outputs exactly
  zero and whose expansion BN outputs exactly 1 (scale 0, bias 1)."""
  block, variables, x = make_block(stride, in_channels, out_channels, residual=residual)
  params = jax.tree.map(lambda p: p, variables["params"])
  params["project_bn"]["scale"] = jnp.zeros_like(params["project_bn"]["scale"])
  params["expand_bn"]["scale"] = jnp.zeros_like(params["expand_bn"]["scale"])
  params["expand_bn"]["bias"] = jnp.ones_like(params["expand_bn"]["bias"])
  y, hand_over = block.apply({**variables, "params": params}, x, shortcut)
  return x, y, hand_over


def test_residual_only_with_stride_1_and_equal_channels():
  x, y, hand_over = block_output(stride=1, in_channels=16, out_channels=16)
  np.testing.assert_allclose(y, x, atol=1e-6)  # Identity + zero branch.
  assert hand_over is None
  _, y, _ = block_output(stride=1, in_channels=16, out_channels=24)
  np.testing.assert_allclose(y, 0.0, atol=1e-6)  # Channels differ: no shortcut.
  _, y, _ = block_output(stride=2, in_channels=16, out_channels=16)
  assert y.shape == (2, 4, 4, 16)
  np.testing.assert_allclose(y, 0.0, atol=1e-6)  # Stride 2: no shortcut.


def test_expansion_shortcut_hands_the_expanded_activation_on():
  # Figure 6b's "shortcut between expansions": no bottleneck shortcut; the
  # expanded activation (here relu6(1) = 1 everywhere) goes to the next block,
  # which adds it to its own expansion.
  x, y, hand_over = block_output(1, 16, 16, residual="expansion")
  np.testing.assert_allclose(y, 0.0, atol=1e-6)
  np.testing.assert_allclose(hand_over, 1.0, atol=1e-6)
  assert hand_over.shape == (2, 8, 8, 96)
  assert block_output(2, 16, 16, residual="expansion")[2] is None  # Stride 2.
  assert block_output(1, 16, 24, residual="expansion")[2] is None  # Widths differ.
  # A received hand-over is added after the expansion's ReLU6, and handed on.
  shortcut = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 96))
  _, _, hand_over = block_output(1, 16, 16, residual="expansion", shortcut=shortcut)
  np.testing.assert_allclose(hand_over, 1.0 + shortcut, atol=1e-6)
  x, y, hand_over = block_output(1, 16, 16, residual="none")
  np.testing.assert_allclose(y, 0.0, atol=1e-6)
  assert hand_over is None


@pytest.mark.parametrize("residual", models.RESIDUALS)
def test_residual_variants_and_zero_init_keep_the_parameter_tree(residual):
  paper = abstract_variables(models.MobileNetV2(num_classes=10), (32, 32, 3))
  variant = models.MobileNetV2(num_classes=10, residual=residual, zero_init_residual=True)
  variables = abstract_variables(variant, (32, 32, 3))
  assert jax.tree.map(lambda v: v.shape, variables) == jax.tree.map(lambda v: v.shape, paper)
  logits = jax.eval_shape(lambda v: variant.apply(v, jnp.zeros((2, 32, 32, 3))), variables)
  assert logits.shape == (2, 10)


@pytest.mark.slow  # Two initialisations (of the BatchNorm scales only).
def test_zero_init_residual_starts_each_residual_branch_as_the_identity():
  for residual, branch_end in (("bottleneck", "project_bn"), ("expansion", "expand_bn")):
    model = models.MobileNetV2(
        num_classes=10,
        width_multiplier=0.35,
        stem_stride=1,
        residual=residual,
        zero_init_residual=True,
    )

    def block_bn_scales(key, model=model):
      params = model.init(key, jnp.zeros((1, 16, 16, 3)))["params"]
      return {
          (name, layer): variables["scale"]
          for name, block in params.items()
          for layer, variables in block.items()
          if layer.endswith("_bn")
      }

    # Only the blocks' BatchNorm scales are returned, so XLA drops the
    # kernels' random draws: a fraction of a whole initialisation's compile
    # time. The scales do not depend on the random numbers.
    scales = jax.jit(block_bn_scales)(models.random_weights_key(0))
    zeroed = {n for (n, layer), scale in scales.items() if layer == branch_end and not scale.any()}
    # The 10 blocks with stride 1 and equal widths (bottleneck shortcut), or
    # the 10 blocks that receive their predecessor's expansion.
    expected = (
        {
            "block2",
            "block4",
            "block5",
            "block7",
            "block8",
            "block9",
            "block11",
            "block12",
            "block14",
            "block15",
        }
        if residual == "bottleneck"
        else {
            "block3",
            "block5",
            "block6",
            "block8",
            "block9",
            "block10",
            "block12",
            "block13",
            "block15",
            "block16",
        }
    )
    assert zeroed == expected
    others = [
        scale
        for (name, layer), scale in scales.items()
        if not (name in expected and layer == branch_end)
    ]
    assert others and all(np.all(scale == 1.0) for scale in others)


def test_bottleneck_relu6_clips_the_projection():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 16))
  outputs = {}
  for bottleneck in models.BOTTLENECKS:
    block, variables, _ = make_block(1, 16, 24, bottleneck=bottleneck, use_running_average=False)
    (outputs[bottleneck], _), _ = block.apply(variables, x, mutable=["batch_stats"])
  assert float(outputs["linear"].min()) < -0.5  # BN output: ~N(0, 1).
  assert float(outputs["relu6"].min()) >= 0.0
  assert float(outputs["relu6"].max()) <= 6.0
  np.testing.assert_allclose(outputs["relu6"], jnp.clip(outputs["linear"], 0, 6), atol=1e-6)


@pytest.fixture(scope="module")
def small_model():
  # 11 blocks (residual ones among them) instead of 17. Jitted: op by op, each
  # of the model's hundreds of operations would compile on its own (4x the time).
  model = models.MobileNetV2(
      num_classes=5, width_multiplier=0.35, depth_multiplier=0.5, stem_stride=1
  )
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  return (
      model,
      jax.jit(functools.partial(model.init, train=False))(models.random_weights_key(1), x),
      x,
  )


@pytest.mark.slow  # Compiles the model in train and in eval mode.
def test_train_mode_updates_batch_stats_and_uses_dropout(small_model):
  model, variables, x = small_model
  train_apply = jax.jit(
      lambda rng: model.apply(
          variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng}
      )
  )
  logits, updates = train_apply(jax.random.PRNGKey(2))
  assert logits.shape == (4, 5)
  old = variables["batch_stats"]["stem_bn"]["mean"]
  assert not np.allclose(updates["batch_stats"]["stem_bn"]["mean"], old)
  other, _ = train_apply(jax.random.PRNGKey(3))
  assert not np.allclose(logits, other)  # Dropout depends on the rng.
  eval_apply = jax.jit(lambda: model.apply(variables, x, train=False))
  np.testing.assert_array_equal(eval_apply(), eval_apply())


@pytest.mark.slow  # As above, in bfloat16 too.
def test_bfloat16_compute_keeps_float32_params(small_model):
  model, variables, x = small_model
  bf16 = model.clone(dtype=jnp.bfloat16)
  params = jax.eval_shape(functools.partial(bf16.init, train=False), jax.random.PRNGKey(1), x)
  assert {leaf.dtype for leaf in jax.tree.leaves(params["params"])} == {jnp.dtype("float32")}
  logits, reference = jax.jit(
      lambda: (bf16.apply(variables, x, train=False), model.apply(variables, x, train=False))
  )()
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, reference, atol=0.1, rtol=0.1)


@pytest.mark.slow  # Two compilations of the model's gradient.
def test_remat_recomputes_the_same_step(small_model):
  # Per-block rematerialisation trades memory for compute; the loss, the
  # gradients and the new running statistics must not change (beyond
  # summation order).
  model, variables, x = small_model

  def loss_and_grads(m):
    def loss(params):
      logits, updates = m.apply(
          {**variables, "params": params},
          x,
          train=True,
          mutable=["batch_stats"],
          rngs={"dropout": jax.random.PRNGKey(2)},
      )
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
        lambda x: model.init_with_output(jax.random.PRNGKey(0), x)[0],
        jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32),
    )
    assert logits.shape == (2, 3)


def test_make_divisible_matches_reference_rule():
  assert [models.make_divisible(v) for v in (32 * 0.35, 16 * 0.35, 1280, 24 * 0.75, 4)] == [
      16,
      8,
      1280,
      24,
      8,
  ]
