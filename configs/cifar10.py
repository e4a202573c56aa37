"""MobileNetV2 (width 1.0) on CIFAR-10, the small-input variant.

As in the PyTorch CIFAR-10 variants of MobileNetV2: the stem and the second
stage use stride 1 instead of 2 (total stride 8 instead of 32), so a 32x32
image ends on a 4x4 map. SGD + Nesterov momentum, cosine schedule, random crop
(4-pixel padding) and flip, 200 epochs.
Expected: ~94 % test top-1 (the published figures for this variant are
93.5-94.5 %; not reproduced on this project's CPU-only machines).
Cost: 88 M multiply-adds per image (2.24 M parameters); 200 epochs of 50k
images, roughly an hour on one modern GPU.
"""

from mnv2_flax import config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset.name = "cifar10"
  config.dataset.image_size = 32
  config.dataset.mean = (0.4914, 0.4822, 0.4465)
  config.dataset.std = (0.2470, 0.2435, 0.2616)
  config.model.width_multiplier = 1.0
  config.model.stem_stride = 1
  config.model.stage_strides = (1, 1, 2, 2, 1, 2, 1)
  config.optimizer.learning_rate = 0.1
  config.optimizer.weight_decay = 5e-4
  config.optimizer.warmup_epochs = 1.0
  config.global_batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 200.0
  config.log_every_steps = 100
  config.eval_every_steps = 3900  # Every 10 epochs.
  config.checkpoint_every_steps = 1950
  return config
