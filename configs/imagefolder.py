"""MobileNetV2 1.0 / 224 fine-tuned on your own folder of class sub-directories.

Point --config.dataset.root at a directory with train/ and test/ (or val/),
each holding one sub-directory per class (e.g. a land-use scene set such as
UC Merced). Set --config.checkpoint_path to an ImageNet checkpoint directory
(WORKDIR/checkpoints of an imagenet.py run) to fine-tune: every weight whose
shape matches is restored. Expected: the land-use article fine-tunes a
pretrained MobileNetV2 to ~93 % validation accuracy; from scratch on a few
thousand images expect far less. Cost: 300 M multiply-adds per image.
"""

from mnv2_flax import config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset.name = "imagefolder"
  config.dataset.image_size = 224
  config.dataset.shuffle_buffer = 4096
  config.model.width_multiplier = 1.0
  config.model.stem_stride = 2
  config.optimizer.learning_rate = 0.01
  config.optimizer.weight_decay = 4e-5
  config.optimizer.warmup_epochs = 1.0
  config.global_batch_size = 64
  config.eval_batch_size = 256
  config.num_epochs = 30.0
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  return config
