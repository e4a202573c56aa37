"""Expansion ratio t x bottleneck non-linearity on ImageNet (Figure 6a, section 4).

  python -m launch.sweep --sweep=configs/sweeps/imagenet_expansion.py \
      --workdir=workdirs/imagenet_expansion --seeds=0 --backend=slurm \
      --slurm_partition=PARTITION --slurm_gpus_per_task=8 --slurm_cpus_per_task=64
  python -m launch.report workdirs/imagenet_expansion

The points of expansion.py (t = 1, 2, 4, 6, 8, 10 times a linear or a ReLU6
bottleneck) on configs/imagenet.py, the paper's 300-epoch recipe.
Cost: a t = 6 run is about 11 hours at 10,000 images/s (configs/imagenet.py);
multiply-adds scale with t (64 M at t = 1 to 473 M at t = 10, 301 M at t = 6),
so the 12 points cost ~115 such hours per seed. The paper reports single runs
(--seeds=0); each further seed costs as much again.
Expected: the linear bottleneck above ReLU6 at every t (Figure 6a); t from 5
to 10 nearly identical (section 4: "nearly identical performance curves"),
smaller t lower; t = 6 with a linear bottleneck near the paper's 72.0 % top-1.
"""

# The digits sweep's points, without its BASE (the digits task settings).
from expansion import NAMES, get_sweep  # noqa: F401

CONFIG = "configs/imagenet.py"
