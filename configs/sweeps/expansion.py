"""Expansion ratio t x bottleneck non-linearity on digits (Figure 6a, section 4).

  python -m launch.sweep --sweep=configs/sweeps/expansion.py \
      --workdir=workdirs/expansion --seeds=0,1,2,3,4
  python -m launch.report workdirs/expansion

Cost: 12 points (t = 1, 2, 4, 6, 8, 10 times a linear or a ReLU6 bottleneck)
x 5 seeds = 60 runs of configs/digits.py, ~40 s each on a 2-core CPU: ~40
minutes.
Expected (the paper, on ImageNet): the linear bottleneck above ReLU6 at every
t (Figure 6a); t from 5 to 10 nearly identical (section 4), smaller t lower.
Digits is nearly saturated (~98 % top-1), so the gaps may be tenths of a
percent, inside the 95 % CIs; the report's paired differences (same seed, so
the same data order) are the sharper test.
"""

from launch import sweep_lib

CONFIG = "configs/digits.py"
# The digits ablation's settings on top of CONFIG, for every point here and in
# shortcut.py; to be tuned (e.g. model.width_multiplier, dataset.image_size,
# dataset.train_examples, num_epochs).
BASE = {}
NAMES = {"model.expansion": "t"}


def get_sweep():
  return sweep_lib.product({"model.expansion": (1, 2, 4, 6, 8, 10),
                            "model.bottleneck": ("linear", "relu6")})
