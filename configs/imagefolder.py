"""MobileNetV2 1.0 / 224 fine-tuned on your own folder of class sub-directories.

Point --config.dataset.root at a directory with train/ and test/ (or val/),
each holding one sub-directory per class (e.g. a land-use scene set such as
UC Merced) of images in any format Pillow decodes (JPEG, PNG, TIFF, BMP, WebP,
GIF, ...). Set --config.checkpoint_path to a checkpoints directory to start
from its weights: an imagenet.py run's WORKDIR/checkpoints, or published
ImageNet weights imported with `python -m mnv2_flax.convert` (Keras,
torchvision, timm, TF-slim). The weights' own settings (width, padding,
BatchNorm epsilon, input normalisation) come from the checkpoint's
settings.json; a new classifier is made for the folder's classes.

  python -m mnv2_flax.main --config=configs/imagefolder.py --workdir=DIR \
      --config.dataset.root=FOLDER --config.checkpoint_path=WEIGHTS \
      --config.finetune.freeze=backbone    # or: none (the default), with
      # --config.finetune.backbone_lr_multiplier=0.1 and/or
      # --config.finetune.freeze_batch_stats=True

Check first what the model will see (image counts, classes, unreadable files,
a grid of augmented training and of evaluation images):

  python -m mnv2_flax.datasets --config=configs/imagefolder.py \
      --config.dataset.root=FOLDER --show=/tmp/folder_show

Expected: the land-use article fine-tunes a pretrained MobileNetV2 to ~93 %
validation accuracy; from scratch on a few thousand images expect far less.
Cost: 300 M multiply-adds per image.
"""

from mnv2_flax import config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset.name = "imagefolder"
  config.dataset.image_size = 224
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
