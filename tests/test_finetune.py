"""Fine-tuning: a new classifier, a frozen or slower backbone, frozen BatchNorm."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from mnv2_flax import checkpoint, config_lib, models, train
from mnv2_flax.errors import ConfigError

from conftest import SHALLOW, tiny_config

# One worker: the tests share the image folder and pretrained fixtures.
pytestmark = pytest.mark.xdist_group("finetune")

FOLDER_CLASSES = ("field", "forest", "river")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> str:
  """train/ and test/ of 3 classes of random TIFFs (4 and 2 per class), as
  UC Merced, the land-use set of the README's fine-tuning example, ships."""
  root = tmp_path_factory.mktemp("scenes")
  rng = np.random.default_rng(0)
  for split, count in (("train", 4), ("test", 2)):
    for name in FOLDER_CLASSES:
      os.makedirs(root / split / name)
      for i in range(count):
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{i}.tif")
  return str(root)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
  """A weights-only checkpoint of a 10-class RGB model with non-trivial
  BatchNorm statistics, as `mnv2_flax.convert` writes."""
  config = tiny_config(**{"dataset.name": "synthetic", **SHALLOW})
  model = models.create_model(config.model, 10)
  # Jitted: op by op, every operation of the model would compile on its own.
  variables = jax.jit(lambda: model.init(models.random_weights_key(1), jnp.zeros((1, 16, 16, 3))))()
  rng = np.random.default_rng(1)
  variables = {
      "params": variables["params"],
      "batch_stats": jax.tree.map(
          lambda x: np.asarray(x) + rng.uniform(0.1, 0.5, x.shape).astype(np.float32),
          variables["batch_stats"],
      ),
  }
  directory = str(tmp_path_factory.mktemp("pretrained") / "weights")
  checkpoint.save_variables(
      directory,
      variables,
      config_lib.settings_of(config, 10),
      [str(i) for i in range(10)],
      source="test",
  )
  return directory


def finetune(image_root: str, pretrained: str, workdir: str, **overrides):
  config = tiny_config(
      **{
          "dataset.name": "imagefolder",
          "dataset.root": image_root,
          "dataset.workers": 0,
          "checkpoint_path": pretrained,
          "global_batch_size": 4,
          "eval_batch_size": 6,
          "num_train_steps": 3,
          "optimizer.warmup_epochs": 0.0,
          "optimizer.schedule": "constant",
          **overrides,
      }
  )
  train.train_and_evaluate(config, workdir)
  saved, _ = checkpoint.read_checkpoint(os.path.join(workdir, "checkpoints"))
  return saved


def backbone(tree):
  return {k: v for k, v in tree.items() if k != "classifier"}


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow  # Training or evaluation runs on an image folder.
def test_frozen_backbone_trains_the_new_classifier_only(image_root, pretrained, tmp_path):
  loaded, _ = checkpoint.read_checkpoint(pretrained)
  saved = finetune(image_root, pretrained, str(tmp_path), **{"finetune.freeze": "backbone"})
  assert saved["params"]["classifier"]["kernel"].shape[-1] == len(FOLDER_CLASSES)
  assert_trees_equal(backbone(saved["params"]), backbone(loaded["params"]))
  assert_trees_equal(saved["batch_stats"], loaded["batch_stats"])
  # The new run's settings name the folder's classes.
  settings = checkpoint.read_settings(os.path.join(tmp_path, "checkpoints"))
  assert settings["class_names"] == list(FOLDER_CLASSES)


@pytest.mark.slow  # Training or evaluation runs on an image folder.
def test_frozen_batch_stats_train_the_weights_but_keep_the_statistics(
    image_root, pretrained, tmp_path
):
  loaded, _ = checkpoint.read_checkpoint(pretrained)
  saved = finetune(image_root, pretrained, str(tmp_path), **{"finetune.freeze_batch_stats": True})
  assert_trees_equal(saved["batch_stats"], loaded["batch_stats"])
  stem = saved["params"]["stem"]["kernel"]
  assert np.abs(stem - loaded["params"]["stem"]["kernel"]).max() > 0


@pytest.mark.parametrize("multiplier", [0.1, 0.0])
def test_backbone_learning_rate_multiplier_scales_its_updates(multiplier):
  params = {
      "stem": {"kernel": jnp.ones((3, 3, 1, 4))},
      "classifier": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
  }
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)

  def first_update(**finetune_overrides):
    config = tiny_config(**{f"finetune.{k}": v for k, v in finetune_overrides.items()})
    tx = train.create_optimizer(config, optax.constant_schedule(0.1))
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates

  plain = first_update()
  scaled = first_update(backbone_lr_multiplier=multiplier)
  np.testing.assert_allclose(scaled["stem"]["kernel"], multiplier * plain["stem"]["kernel"])
  assert_trees_equal(scaled["classifier"], plain["classifier"])
  frozen = first_update(freeze="backbone")
  assert_trees_equal(frozen["stem"]["kernel"], jnp.zeros_like(params["stem"]["kernel"]))
  assert_trees_equal(frozen["classifier"], plain["classifier"])


def test_freezing_random_weights_is_refused():
  config = tiny_config(**{"finetune.freeze": "backbone"})
  with pytest.raises(ConfigError, match=r"^config.finetune.freeze: .* set checkpoint_path"):
    config_lib.validate(config, device_count=1)


@pytest.mark.slow  # Training or evaluation runs on an image folder.
def test_imported_weights_evaluate_with_their_own_settings(pretrained, tmp_path):
  # Another width and resolution in the config: settings.json decides.
  config = tiny_config(
      **{
          "dataset.name": "synthetic",
          "model.width_multiplier": 0.5,
          "dataset.image_size": 24,
          "checkpoint_path": pretrained,
      }
  )
  results = train.evaluate(config, str(tmp_path))
  assert results["step"] == 0
  assert results["num_examples"] == config.global_batch_size
  model, variables, loaded_config, names = checkpoint.load_model(pretrained)
  assert (model.width_multiplier, loaded_config.dataset.image_size) == (0.35, 16)
  assert names == tuple(str(i) for i in range(10))
  images = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
  saved, _ = checkpoint.read_checkpoint(pretrained)
  np.testing.assert_array_equal(
      model.apply(variables, images, train=False), model.apply(saved, images, train=False)
  )


@pytest.fixture(scope="module")
def pretrained_features(pretrained, tmp_path_factory) -> str:
  """`pretrained` as a features checkpoint (model.head="features": no
  classifier), as converting timm's num_classes=0 or Keras' include_top=False
  writes it."""
  loaded, _ = checkpoint.read_checkpoint(pretrained)
  settings = checkpoint.read_settings(pretrained)["config"]
  settings["model.head"] = "features"
  directory = str(tmp_path_factory.mktemp("features") / "weights")
  variables = {
      "params": {k: v for k, v in loaded["params"].items() if k != "classifier"},
      "batch_stats": loaded["batch_stats"],
  }
  checkpoint.save_variables(directory, variables, settings, (), source="test")
  return directory


@pytest.mark.slow  # A fine-tuning run on an image folder.
def test_features_checkpoint_gets_a_new_classifier(image_root, pretrained_features, tmp_path):
  loaded, _ = checkpoint.read_checkpoint(pretrained_features)
  saved = finetune(
      image_root, pretrained_features, str(tmp_path), **{"finetune.freeze": "backbone"}
  )
  assert saved["params"]["classifier"]["kernel"].shape[-1] == len(FOLDER_CLASSES)
  assert_trees_equal(backbone(saved["params"]), loaded["params"])
  settings = checkpoint.read_settings(os.path.join(tmp_path, "checkpoints"))["config"]
  assert settings["model.head"] == "classifier"
  # Evaluating the features checkpoint itself is refused in one line.
  config = tiny_config(**{"dataset.name": "synthetic", "checkpoint_path": pretrained_features})
  with pytest.raises(ConfigError, match=r"^config.model.head: 'features' has no classifier"):
    train.evaluate(config, str(tmp_path / "eval"))
