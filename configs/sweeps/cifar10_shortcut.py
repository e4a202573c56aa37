"""Where the shortcut goes, at t = 6, on CIFAR-10 (Figure 6b).

  python -m launch.sweep --sweep=configs/sweeps/cifar10_shortcut.py \
      --workdir=workdirs/cifar10_shortcut --seeds=0,1,2,3,4 --devices=0,1,2
  python -m launch.report workdirs/cifar10_shortcut

The points of shortcut.py (model.residual: between bottlenecks as in the
paper, between expansion layers, none) on configs/cifar10.py, 200 epochs each.
Cost: 3 runs per seed of roughly an hour on one modern GPU each
(configs/cifar10.py): ~15 GPU-hours for 5 seeds.
Expected (the paper, on ImageNet): the shortcut between bottlenecks above both
the shortcut between expansion layers and no shortcut (Figure 6b).
"""

# The digits sweep's points, without its BASE (the digits task settings).
from shortcut import NAMES, get_sweep  # noqa: F401

CONFIG = "configs/cifar10.py"
