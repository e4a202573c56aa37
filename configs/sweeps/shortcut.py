"""Where the shortcut goes, at t = 6, on digits (Figure 6b).

  python -m launch.sweep --sweep=configs/sweeps/shortcut.py \
      --workdir=workdirs/shortcut --seeds=0,1,2,3,4
  python -m launch.report workdirs/shortcut

Cost: 3 points (model.residual: between bottlenecks as in the paper, between
expansion layers, none) x 5 seeds = 15 runs of configs/digits.py on 400
training images (BASE), 1-6 minutes each on one core: about 20 minutes on a
2-core CPU with --parallel=2.
Expected (the paper, on ImageNet): the shortcut between bottlenecks above both
the shortcut between expansion layers and no shortcut (Figure 6b). On nearly
saturated digits the gaps may sit inside the 95 % CIs; read the paired
differences.
"""

# The digits ablation's settings and point names, kept in expansion.py.
from expansion import BASE, NAMES  # noqa: F401

CONFIG = "configs/digits.py"


def get_sweep():
  return [
      {"model.expansion": 6, "model.residual": residual}
      for residual in ("bottleneck", "expansion", "none")
  ]
