"""Trains the smoke config on several device layouts in one process and
reports how far each run's weights are from the 1-device run's, relative to
their own updates (conftest.worst_ratio).

  python tests/layout_worker.py --dtype=float64 --steps=4 --seeds=0,1,2 --restore --out=FILE

Run by tests/test_device_layouts.py in a subprocess with 4 CPU devices (and,
for float64, jax_enable_x64, which is process-wide). Every run goes through
the trainer's own `train.setup`, `Setup.shard` and compiled step, on a mesh
of 1 or of 4 of the process's devices, from the 1-device run's initial state
(initialised once per seed; each initialisation compiled for another mesh
would cost as much as a step); the seed is an argument of the compiled
functions, so one compilation serves every seed.

Runs per seed: "1 device" (the reference), "4 devices", the two faults of
config.testing.fault on 4 devices (which the comparison must catch), and
with --restore "restored on 4 devices": the reference's weights after
--steps steps saved to an orbax checkpoint, restored onto 4 devices and
trained one more step, against the reference's own next step (each
array's update is still its change over the first --steps steps). FILE
gets, per seed and run, the worst array's ratio and its name. With
--save_dir, the first seed's 4-device weights after --steps / 2 and --steps
steps, and its dropped-shard run's after --steps steps, go there as .npz
files ("params/stem/kernel": array): test_multiprocess.py's references.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import LAYOUT_CONFIG, tiny_config, worst_ratio, xla_flags  # noqa: E402, I001

# Four CPU devices, with the tests' XLA flags and compilation cache (conftest):
# before JAX is imported.
os.environ["XLA_FLAGS"] = xla_flags(4)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mnv2_flax import checkpoint, train  # noqa: E402


def variables(state: train.TrainState) -> dict[str, np.ndarray]:
  """ "params/stem/kernel" -> value, for params and batch_stats: copies, since
  on the CPU device_get may alias buffers that the next (donating) step reuses."""
  tree = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  return {
      "/".join(str(k.key) for k in path): np.array(leaf, copy=True)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def updates(reference: dict, initial: dict) -> dict[str, float]:
  """Each array's update: max |reference - initial value|."""
  return {name: float(np.max(np.abs(reference[name] - initial[name]))) for name in reference}


class Run:
  """One training run of a set-up (sharing its compiled steps with others),
  from INITIAL (a state of another layout or a restored one, placed on this
  one's devices, with this one's model: the statistics of
  batch_stats_per_device are its own)."""

  def __init__(self, s: train.Setup, initial: train.TrainState):
    self.setup = s
    self.state = jax.device_put(initial.replace(apply_fn=s.model.apply), s.replicated)
    self.batches = s.dataset.train_batches(0)

  def train(self, steps: int) -> dict[str, np.ndarray]:
    for _ in range(steps):
      self.state, _ = self.setup.train_step(self.state, self.setup.shard(next(self.batches)))
    return variables(self.state)


class Layouts:
  """The set-ups of the compared layouts, compiled once for every seed."""

  def __init__(self, dtype: str):
    self.dtype = dtype
    self.compiled: dict[str, train.Setup] = {}

  def setup(self, name: str, seed: int, devices: int, fault: str = "") -> train.Setup:
    config = tiny_config(
        **LAYOUT_CONFIG, **{"seed": seed, "model.dtype": self.dtype, "testing.fault": fault}
    )
    s = train.setup(config, train.create_mesh(jax.devices()[:devices]))
    if name in self.compiled:  # Another seed: the same compiled functions.
      s = s.replace(init=self.compiled[name].init, step=self.compiled[name].step)
    self.compiled.setdefault(name, s)
    return s

  def compare(
      self, seed: int, steps: int, restore: bool, save_dir: str | None = None
  ) -> dict[str, tuple[float, str]]:
    """The worst ratio of each run; with SAVE_DIR, the 4-device run's weights
    after steps // 2 and after `steps` steps, and the dropped-shard run's."""
    one, four = self.setup("one", seed, 1), self.setup("four", seed, 4)
    # One initialisation for every run: the 2 x 2 run of test_multiprocess.py
    # initialises on its 4 devices itself, against these references.
    # A host copy: the (donating) steps reuse their input's buffers.
    start = jax.tree.map(np.array, jax.device_get(one.init_state()))
    reference = Run(one, start)
    initial = variables(reference.state)
    expected = reference.train(steps)
    update = updates(expected, initial)
    four_devices = Run(four, start)
    halfway = four_devices.train(steps // 2)
    trained = four_devices.train(steps - steps // 2)
    results = {"4 devices": worst_ratio(trained, expected, update)}
    # The shard is dropped on the host: the same compiled step.
    dropped = Run(four.replace(fault="drop_shard"), start).train(steps)
    results["4 devices, drop_shard"] = worst_ratio(dropped, expected, update)
    if save_dir:
      for name, arrays in (("halfway", halfway), ("trained", trained), ("dropped", dropped)):
        np.savez(os.path.join(save_dir, f"four_devices_{name}.npz"), **arrays)
    # A model of its own.
    per_device = Run(self.setup("per_device", seed, 4, "batch_stats_per_device"), start)
    results["4 devices, batch_stats_per_device"] = worst_ratio(
        per_device.train(steps), expected, update
    )
    if not restore:
      return results

    # The 1-device weights restored from a checkpoint onto 4 devices, trained on.
    with tempfile.TemporaryDirectory() as directory:
      ckpt = checkpoint.Checkpointer(directory, keep=1)
      ckpt.save(steps, reference.state)
      ckpt.wait()
      restored_state, _ = ckpt.restore(train.abstract_state(four))
      ckpt.close()
    restored = Run(four, restored_state)
    restored.batches = four.dataset.train_batches(steps)
    assert worst_ratio(variables(restored.state), expected, update)[0] == 0, "restore changed them"
    results["restored on 4 devices"] = worst_ratio(restored.train(1), reference.train(1), update)
    return results


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--dtype", choices=("float32", "float64"), required=True)
  parser.add_argument("--steps", type=int, required=True)
  parser.add_argument("--seeds", required=True, help="Comma-separated.")
  parser.add_argument("--restore", action="store_true", help="Also restore onto 4 devices.")
  parser.add_argument("--out", required=True)
  parser.add_argument("--save_dir", help="Where the first seed's 4-device weights go.")
  args = parser.parse_args()
  jax.config.update("jax_enable_x64", args.dtype == "float64")
  layouts = Layouts(args.dtype)
  seeds = [int(s) for s in args.seeds.split(",")]
  results = {
      f"seed={s}": layouts.compare(s, args.steps, args.restore, args.save_dir if i == 0 else None)
      for i, s in enumerate(seeds)
  }
  with open(args.out, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main()
