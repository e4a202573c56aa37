"""Expansion ratio t x bottleneck non-linearity on CIFAR-10 (Figure 6a, section 4).

  python -m launch.sweep --sweep=configs/sweeps/cifar10_expansion.py \
      --workdir=workdirs/cifar10_expansion --seeds=0,1,2,3,4 --devices=0,1,2,3
  python -m launch.report workdirs/cifar10_expansion

The points of expansion.py (t = 1, 2, 4, 6, 8, 10 times a linear or a ReLU6
bottleneck) on configs/cifar10.py, 200 epochs each.
Cost: a t = 6 run is roughly an hour on one modern GPU (configs/cifar10.py);
multiply-adds scale with t (15 M at t = 1 to 141 M at t = 10, 88 M at t = 6),
so the 12 points cost ~10 such hours per seed: ~50 GPU-hours for 5 seeds.
Expected (the paper, on ImageNet): the linear bottleneck above ReLU6 at every
t (Figure 6a); t from 5 to 10 nearly identical (section 4), smaller t lower.
"""

# The digits sweep's points, without its BASE (the digits task settings).
from expansion import NAMES, get_sweep  # noqa: F401

CONFIG = "configs/cifar10.py"
