"""How far rounding-sized parameter changes move the gradient at initialisation.

  python -m mnv2_flax.sensitivity --config=configs/digits.py
  python -m mnv2_flax.sensitivity --config.model.zero_init_residual=False
  python -m mnv2_flax.sensitivity --config=configs/imagenet.py \\
      --config.dataset.name=synthetic --config.dataset.image_size=64

Perturbs every initial parameter by a relative `--relative` (1e-7: float32
rounding) and compares the gradient of the first training batch before and
after. A recipe whose gradient moves by percents turns the rounding
differences between machines or device counts into different runs
(docs/ablations.md). Prints JSON: `gradient_change` (relative L2 change of
the whole gradient), `gradient_norm`, `logits_change` (max |delta|) and the
layers whose gradients move most. The `project_bn` biases are left out: every
path from them meets a conv followed by BatchNorm, which removes a
per-channel shift, so their gradient is rounding noise.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from flax import traverse_util
from ml_collections import config_flags

from mnv2_flax import config_lib, errors, train

# Every path from these biases meets conv -> BatchNorm: their gradient is noise.
_NO_TRUE_GRADIENT = "project_bn/bias"


def measure(
    config: ml_collections.ConfigDict, relative: float = 1e-7, top: int = 8
) -> dict[str, Any]:
  """Gradient and logits change of the first train batch under the perturbation."""
  s = train.setup(config)
  state = s.init_state()
  batch = next(s.dataset.train_batches(0))
  images = train.prepare_images(
      jnp.asarray(batch["image"]), config.dataset.image_size, s.pixel_stats
  )
  labels = jnp.asarray(batch["label"])

  @jax.jit
  def logits_and_gradient(params: Any) -> tuple[jax.Array, Any]:
    def loss(p: Any) -> tuple[jax.Array, jax.Array]:
      logits, _ = state.apply_fn(
          {"params": p, "batch_stats": state.batch_stats},
          images,
          train=True,
          mutable=["batch_stats"],
          rngs={"dropout": jax.random.PRNGKey(0)},
      )
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), logits

    gradient, logits = jax.grad(loss, has_aux=True)(params)
    return logits, gradient

  # Drawn on the host, in float64 and then rounded to the parameter's dtype:
  # a jitted draw compiles threefry's rounds for every parameter, which takes
  # longer than compiling the model's gradient.
  noise = np.random.default_rng(config.seed + 1)
  params = jax.device_get(state.params)
  perturbed = jax.tree.map(
      lambda p: (p * (1 + relative * noise.standard_normal(p.shape))).astype(p.dtype), params
  )
  logits, gradient = jax.device_get(logits_and_gradient(params))
  perturbed_logits, perturbed_gradient = jax.device_get(logits_and_gradient(perturbed))
  # The statistics in numpy, on the host: in jnp each shape would compile.
  before = traverse_util.flatten_dict(gradient, sep="/")
  after = traverse_util.flatten_dict(perturbed_gradient, sep="/")
  names = [name for name in before if not name.endswith(_NO_TRUE_GRADIENT)]
  norm = lambda tree: float(
      np.sqrt(sum(np.sum(np.square(tree[n], dtype=np.float64)) for n in names))
  )
  change = {n: after[n] - before[n] for n in names}
  per_layer = {
      n: float(np.linalg.norm(change[n]) / max(float(np.linalg.norm(before[n])), 1e-30))
      for n in names
  }
  return {
      "gradient_change": norm(change) / norm(before),
      "gradient_norm": norm(before),
      "logits_change": float(np.max(np.abs(perturbed_logits - logits))),
      "most_moved": sorted(per_layer.items(), key=lambda item: -item[1])[:top],
  }


def define_flags() -> None:
  """The command line. Defined when run, not on import: mnv2_flax.main, which
  tests import next to this module, defines --config too."""
  config_flags.DEFINE_config_file(
      "config", config_lib.__file__, "A config file (configs/*.py); default: the digits default."
  )
  flags.DEFINE_float("relative", 1e-7, "Relative size of the parameter perturbation.")
  flags.DEFINE_integer("top", 8, "How many of the most-moved layers to list.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    result = measure(flags.FLAGS.config, flags.FLAGS.relative, flags.FLAGS.top)
  except errors.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
