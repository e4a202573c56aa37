"""Expansion ratio t x bottleneck non-linearity on digits (Figure 6a, section 4).

  python -m launch.sweep --sweep=configs/sweeps/expansion.py \
      --workdir=workdirs/expansion --seeds=0,1,2,3,4
  python -m launch.report workdirs/expansion

Cost: 12 points (t = 1, 2, 4, 6, 8, 10 times a linear or a ReLU6 bottleneck)
x 5 seeds = 60 runs of configs/digits.py on 400 training images (BASE), 1-6
minutes each on one core: about 1.3 hours on a 2-core CPU with --parallel=2.
Expected (the paper, on ImageNet): the linear bottleneck above ReLU6 at every
t (Figure 6a); t from 5 to 10 nearly identical (section 4), smaller t lower.
On digits the gaps may be tenths of a percent, inside the 95 % CIs; the
report's paired differences (same seed, so the same data order) are the
sharper test. Measured: docs/ablations.md.
"""

from launch import sweep_lib

CONFIG = "configs/digits.py"
# The digits ablation task, for every point here, in shortcut.py and in
# ablation.py: the digits default trained on its first 400 training images
# for 40 epochs (240 steps). With all 1,437 images every variant ends near
# 99 % and the gaps drown in seed noise; a quarter of the data leaves room to
# separate them, and costs about half a default run. Evaluated every 40 steps
# for the report's learning curves.
BASE = {"dataset.train_examples": 400, "num_epochs": 40.0, "eval_every_steps": 40}
NAMES = {"model.expansion": "t"}


def get_sweep():
  return sweep_lib.product(
      {"model.expansion": (1, 2, 4, 6, 8, 10), "model.bottleneck": ("linear", "relu6")}
  )
