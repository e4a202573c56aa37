"""Seed-to-seed spread of the digits default, and what zero-initialised residual scales do to it.

  python -m launch.sweep --sweep=configs/sweeps/stability.py \
      --workdir=workdirs/stability --seeds=0,1,2,3,4,5,6,7,8,9 --parallel=2
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m launch.sweep \
      --sweep=configs/sweeps/stability.py --workdir=workdirs/stability_4dev \
      --seeds=0,1,2,3,4,5,6,7,8,9 --parallel=2
  python -m launch.report workdirs/stability

Cost: 2 points x 10 seeds = 20 runs of configs/digits.py, ~40 s each on a
2-core CPU: ~15 minutes (4 fake CPU devices: about 1.5x that).
Expected: the default (zero_init=True) puts every seed at >= 98 % test top-1,
and its 4-device mean inside the 1-device mean's 95 % interval; without it
(the init before 2026-12-01) some seeds fall into a ~96 % mode on some CPUs.
Measured figures: docs/ablations.md.
"""

CONFIG = "configs/digits.py"
NAMES = {"model.zero_init_residual": "zero_init"}


def get_sweep():
  return [{"model.zero_init_residual": True}, {"model.zero_init_residual": False}]
