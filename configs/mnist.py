"""MobileNetV2 (width 1.0) on MNIST, resized on device to 32x32.

The MNIST article resizes to 224x224 and reports 99.19 % after 5 epochs; 32x32
with the CIFAR-style strides reaches the same range at ~1/50 of the cost
(set --config.dataset.image_size=224 --config.model.stem_stride=2
--config.model.stage_strides="(1,2,2,2,1,2,1)" for the article's setting).
Expected: ~99 % test top-1 after 5 epochs. Cost: 5 epochs x 60k images,
about 1-2 GPU-minutes; tens of minutes on a 2-core CPU.
"""

from mnv2_flax import config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset.name = "mnist"
  config.dataset.image_size = 32
  config.model.width_multiplier = 1.0
  config.model.stem_stride = 1
  config.model.stage_strides = (1, 1, 2, 2, 1, 2, 1)
  config.optimizer.learning_rate = 0.1
  config.global_batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 5.0
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  return config
