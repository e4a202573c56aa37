"""Where the shortcut goes, at t = 6, on ImageNet (Figure 6b).

  python -m launch.sweep --sweep=configs/sweeps/imagenet_shortcut.py \
      --workdir=workdirs/imagenet_shortcut --seeds=0 --backend=slurm \
      --slurm_partition=PARTITION --slurm_gpus_per_task=8 --slurm_cpus_per_task=64
  python -m launch.report workdirs/imagenet_shortcut

The points of shortcut.py (model.residual: between bottlenecks as in the
paper, between expansion layers, none) on configs/imagenet.py, 300 epochs.
Cost: 3 runs per seed of about 11 hours at 10,000 images/s each
(configs/imagenet.py): ~33 hours per seed; the paper reports single runs.
Expected: the shortcut between bottlenecks (72.0 % top-1 in the paper) above
both the shortcut between expansion layers and no shortcut (Figure 6b).
"""

# The digits sweep's points, without its BASE (the digits task settings).
from shortcut import NAMES, get_sweep  # noqa: F401

CONFIG = "configs/imagenet.py"
