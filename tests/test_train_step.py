"""The train step on a model of two layers: what it does with a non-finite
update (compiles in a second, unlike MobileNetV2)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from mnv2_flax import data, train


class TwoLayers(nn.Module):
  """BatchNorm (statistics to update) and a classifier, as the step expects."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.BatchNorm(use_running_average=not train)(x.reshape(len(x), -1))
    return nn.Dense(3)(x)


def two_layer_step(images: np.ndarray, *, skip_nonfinite: bool, pixel_stats=None):
  """(initial state, jitted train step) of TwoLayers on batches like `images`."""
  model = TwoLayers()
  variables = model.init(jax.random.PRNGKey(0), images)
  state = train.TrainState.create(
      apply_fn=model.apply,
      params=variables["params"],
      tx=optax.sgd(0.1),
      batch_stats=variables["batch_stats"],
  )
  step = jax.jit(
      functools.partial(
          train.train_step,
          image_size=images.shape[1],
          label_smoothing=0.0,
          lr_fn=optax.constant_schedule(0.1),
          skip_nonfinite=skip_nonfinite,
          pixel_stats=pixel_stats,
      )
  )
  return state, step


def step_once(image: np.ndarray, skip_nonfinite: bool):
  """(state before, state after, metrics) of one step on a batch of `image`s."""
  images = np.stack([image + i for i in range(4)]).astype(np.float32)
  state, step = two_layer_step(images, skip_nonfinite=skip_nonfinite)
  batch = {"image": images, "label": np.arange(4, dtype=np.int32) % 3}
  new_state, metrics = step(state, batch, jax.random.PRNGKey(1))
  return state, new_state, jax.device_get(metrics)


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_a_finite_update_is_applied(skip_nonfinite):
  before, after, metrics = step_once(np.ones((2, 2, 1)), skip_nonfinite)
  assert metrics["nonfinite"] == 0 and int(after.step) == 1
  kernel = after.params["Dense_0"]["kernel"]
  assert np.isfinite(kernel).all() and not np.array_equal(
      kernel, before.params["Dense_0"]["kernel"]
  )


def test_a_nonfinite_update_is_skipped_or_applied_as_configured():
  nan = np.full((2, 2, 1), np.nan)
  before, skipped, metrics = step_once(nan, skip_nonfinite=True)
  assert metrics["nonfinite"] == 1
  assert int(skipped.step) == 1  # Counted as a step, so the data moves on.
  for name in ("params", "batch_stats", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, getattr(skipped, name), getattr(before, name))
  _, applied, metrics = step_once(nan, skip_nonfinite=False)
  assert metrics["nonfinite"] == 1
  assert not jnp.isfinite(applied.params["Dense_0"]["kernel"]).any()


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_uint8_images_are_normalised_in_the_step_as_the_float32_expression():
  """Every uint8 value in every channel, jitted as in the steps: the
  float32 (x - mean) / std that numpy computes, bit for bit."""
  stats = data.pixel_stats(IMAGENET)
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
  prepare = jax.jit(functools.partial(train.prepare_images, image_size=16, pixel_stats=stats))
  got = np.asarray(prepare(pixels))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, (pixels.astype(np.float32) - stats[0]) / stats[1])
  with pytest.raises(ValueError, match="pixel_stats"):
    train.prepare_images(jnp.asarray(pixels), 1)


def test_a_uint8_batch_trains_as_its_normalised_float32_batch():
  stats = data.pixel_stats(IMAGENET)
  pixels = np.random.default_rng(0).integers(0, 256, (4, 2, 2, 3), dtype=np.uint8)
  normalised = (pixels.astype(np.float32) - stats[0]) / stats[1]
  state, step = two_layer_step(normalised, skip_nonfinite=False, pixel_stats=stats)
  labels = np.arange(4, dtype=np.int32) % 3
  after = [
      step(state, {"image": images, "label": labels}, jax.random.PRNGKey(1))
      for images in (pixels, normalised)
  ]
  jax.tree.map(np.testing.assert_array_equal, *jax.device_get(after))
