"""Expansion ratio x bottleneck non-linearity, on the embedded digits default.

  python -m launch.sweep --sweep=configs/sweeps/expansion.py --workdir=/tmp/expansion

Eight runs: expansion t in {2, 4, 6, 8} (the paper uses 6) times a linear
bottleneck (the paper's) or a ReLU6 one (its ablation).
"""

import itertools


def get_sweep():
  return [{"model.expansion": t, "model.bottleneck": bottleneck}
          for t, bottleneck in itertools.product((2, 4, 6, 8), ("linear", "relu6"))]
