"""A seconds-long smoke test of the whole pipeline: digits at 16x16, width 0.35.

Checks an installation end to end (data, train step, checkpoint, eval) and is
the base of the test suite. Accuracy is meaningless at 8 steps; with
--config.num_train_steps=300 expect ~85-95 % on digits.
"""

from mnv2_flax import config_lib


def get_config():
  config = config_lib.base_config()
  config.model.width_multiplier = 0.35
  config.dataset.image_size = 16
  config.global_batch_size = 32
  config.optimizer.learning_rate = 0.05
  config.eval_batch_size = 128
  config.num_train_steps = 8
  config.log_every_steps = 4
  config.checkpoint_every_steps = 4
  return config
