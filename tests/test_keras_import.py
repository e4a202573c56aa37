"""Fine-tuned Keras models in: transfer-learning models as Keras' guide and
TensorFlow's tutorial build them (MobileNetV2(include_top=False) nested in a
Functional model, or its layers flattened into the outer model; Rescaling,
Normalization or preprocess_input inside; GlobalAveragePooling2D, Dropout,
Dense(7, softmax) or Dense(1)), saved as .keras and .h5 and imported with
their preprocessing; their outputs match Keras' `predict` within 1e-4.

Every model is width 0.35 at 96 or 97 pixels with random weights and
BatchNorm statistics, built once per module (Keras is imported here only).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from mnv2_flax import checkpoint, convert, models, predict

from conftest import REPO, random_batch_norm

TOLERANCE = 1e-4
ALPHA = 0.35


def _keras():
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  return pytest.importorskip("keras")


def randomize(model, seed: int = 0) -> None:
  """He-normal kernels and random BatchNorm statistics in every layer,
  nested models' too (Keras' own init gives nearly equal outputs for every
  image, which would hide layout bugs)."""
  keras = _keras()
  rng = np.random.default_rng(seed)

  def walk(layers):
    for layer in layers:
      if hasattr(layer, "layers"):
        walk(layer.layers)
      elif isinstance(
          layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)
      ):
        kernel, *bias = layer.get_weights()
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        fan_in = kernel[:, :, 0].size if depthwise else kernel[..., 0].size
        weights = rng.normal(0, np.sqrt(2 / fan_in), kernel.shape).astype(np.float32)
        layer.set_weights([weights] + [b + 0.1 for b in bias])
      elif isinstance(layer, keras.layers.BatchNormalization):
        layer.set_weights(random_batch_norm(rng, layer.gamma.shape[0]))

  walk(model.layers)


def backbone(size: int, **kwargs):
  return _keras().applications.MobileNetV2(
      alpha=ALPHA, input_shape=(size, size, 3), include_top=False, weights=None, **kwargs
  )


def _save(model, directory, name: str) -> dict[str, str]:
  paths = {ext: str(directory / f"{name}{ext}") for ext in (".keras", ".h5")}
  for path in paths.values():
    model.save(path)
  return paths


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
  """Keras' transfer-learning guide: RandomFlip, Rescaling to [-1, 1], the
  nested MobileNetV2 (training=False), pooling, Dropout, Dense(7, softmax);
  an odd input size (97). Returns (model, its files, its MobileNetV2)."""
  keras = _keras()
  keras.utils.set_random_seed(0)
  base = backbone(97)
  inputs = keras.Input((97, 97, 3))
  x = keras.layers.RandomFlip("horizontal")(inputs)
  x = keras.layers.Rescaling(1 / 127.5, offset=-1)(x)
  x = base(x, training=False)
  x = keras.layers.GlobalAveragePooling2D()(x)
  x = keras.layers.Dropout(0.2)(x)
  outputs = keras.layers.Dense(7, activation="softmax")(x)
  model = keras.Model(inputs, outputs)
  randomize(model)
  return model, _save(model, tmp_path_factory.mktemp("guide"), "guide"), base


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
  """TensorFlow's transfer-learning tutorial: an augmentation Sequential,
  preprocess_input inside the model (operations, not layers), the nested
  MobileNetV2, pooling, Dropout, Dense(1) on logits."""
  keras = _keras()
  keras.utils.set_random_seed(1)
  base = backbone(96)
  augmentation = keras.Sequential(
      [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)],
      name="data_augmentation",
  )
  inputs = keras.Input((96, 96, 3))
  x = augmentation(inputs)
  x = keras.applications.mobilenet_v2.preprocess_input(x)
  x = base(x, training=False)
  x = keras.layers.GlobalAveragePooling2D()(x)
  x = keras.layers.Dropout(0.2)(x)
  outputs = keras.layers.Dense(1)(x)
  model = keras.Model(inputs, outputs)
  randomize(model, seed=1)
  return model, _save(model, tmp_path_factory.mktemp("tutorial"), "tutorial")


@pytest.fixture(scope="module")
def flattened(tmp_path_factory):
  """The MobileNetV2's own layers in the outer model (its input_tensor a
  Normalization's output), pooling and Dense(7, softmax): the outer model's
  name says no alpha, its channels do."""
  keras = _keras()
  keras.utils.set_random_seed(2)
  inputs = keras.Input((96, 96, 3))
  mean, variance = [120.0, 110.0, 100.0], [3600.0, 3300.0, 3000.0]
  x = keras.layers.Normalization(mean=mean, variance=variance)(inputs)
  base = backbone(96, input_tensor=x)
  x = keras.layers.GlobalAveragePooling2D()(base.output)
  outputs = keras.layers.Dense(7, activation="softmax")(x)
  model = keras.Model(inputs, outputs, name="scenes")
  randomize(model, seed=2)
  return model, _save(model, tmp_path_factory.mktemp("flat"), "flat")


def pixels(size: int, seed: int = 0) -> np.ndarray:
  """Two images of different colours and brightness gradients (noise alone
  averages out in the pooling: every image would get the same output)."""
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0, 1, size)[None, :, None, None] * np.array([[[[1.0]]], [[[-1.0]]]])
  colours = np.array([[40.0, 200.0, 90.0], [220.0, 60.0, 150.0]])[:, None, None, :]
  images = colours + 50 * ramp + rng.uniform(-30, 30, (2, size, size, 3))
  return np.clip(images, 0, 255).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, x):
  return model.apply(variables, x, train=False)


def our_outputs(imported: convert.KerasImport, images: np.ndarray) -> np.ndarray:
  """Softmax probabilities (features: the pooled features) of [0, 255]
  pixels, normalised by the imported settings."""
  settings = imported.settings()
  mean = np.asarray(settings["dataset.mean"], np.float32) * 255
  std = np.asarray(settings["dataset.std"], np.float32) * 255
  out = np.asarray(_apply(imported.model, imported.variables, (images - mean) / std))
  return out if imported.num_classes == 0 else np.asarray(jax.nn.softmax(out))


def _check(ours: np.ndarray, theirs: np.ndarray, label: str, relative: bool = False) -> None:
  """Within 1e-4; features (relative=True, values up to 6) within 1e-4 of
  their largest value: float32 rounding grows with the values."""
  delta = float(np.max(np.abs(ours - theirs)))
  scale = max(1.0, float(np.max(np.abs(theirs)))) if relative else 1.0
  print(f"{label}: max |delta| {delta:.2e}, max |output| {np.max(np.abs(theirs)):.3g}")
  assert ours.shape == theirs.shape and delta <= TOLERANCE * scale, label
  assert np.max(np.abs(theirs[0] - theirs[1])) > 100 * TOLERANCE, label  # Inputs matter.


@pytest.mark.parametrize("ext", [".keras", ".h5"])
def test_guide_model_file_matches_keras(guide, ext):
  model, paths, _ = guide
  x = pixels(97)
  imported = convert.keras_file(paths[ext])
  assert (imported.width_multiplier, imported.num_classes, imported.image_size) == (ALPHA, 7, 97)
  settings = imported.settings()
  assert settings["dataset.mean"] == settings["dataset.std"] == [0.5, 0.5, 0.5]
  assert settings["dataset.eval_resize"] == "stretch" and settings["model.padding"] == "tf_same"
  _check(our_outputs(imported, x), model.predict(x, verbose=0), f"guide {ext}")


@pytest.mark.parametrize("ext", [".keras", ".h5"])
def test_tutorial_preprocess_input_and_binary_head(tutorial, ext):
  model, paths = tutorial
  x = pixels(96, seed=1)
  imported = convert.keras_file(paths[ext])
  # preprocess_input's divide and subtract (model.operations) are the normalisation.
  assert imported.normalization == ((0.5,) * 3, (0.5,) * 3)
  assert imported.num_classes == 2  # Dense(1): logits [0, z].
  logit = model.predict(x, verbose=0)
  _check(our_outputs(imported, x)[:, 1:], 1 / (1 + np.exp(-logit)), f"tutorial {ext}")


def test_keras_cannot_reload_the_tutorial_h5_but_h5py_reads_it(tutorial):
  keras = _keras()
  with pytest.raises(Exception, match="TrueDivide"):
    keras.saving.load_model(tutorial[1][".h5"], compile=False)
  config, arrays = convert.keras_h5_file(tutorial[1][".h5"])
  assert "Conv1/kernel" in arrays and f"{tutorial[0].layers[-1].name}/kernel" in arrays
  assert {layer.kind for layer in convert.keras_layers(config)} >= {"TrueDivide", "Subtract"}


def test_flattened_model_width_from_its_channels(flattened):
  model, paths = flattened
  x = pixels(96, seed=2)
  for source in (model, paths[".h5"]):
    if isinstance(source, str):
      imported = convert.keras_file(source)
    else:
      imported = convert.keras_import_model(source)
    assert imported.width_multiplier == ALPHA and imported.fine_tuned
    mean, std = imported.normalization
    np.testing.assert_allclose(mean, np.array([120, 110, 100]) / 255, rtol=1e-6)
    np.testing.assert_allclose(std, np.sqrt([3600, 3300, 3000]) / 255, rtol=1e-6)
    _check(our_outputs(imported, x), model.predict(x, verbose=0), f"flattened {type(source)}")


def test_backbone_alone_is_a_features_model_with_keras_feature_maps(guide):
  """include_top=False: the pooled features; `features` gives Keras' maps
  at strides 2 to 32 (the last layer of each stride)."""
  keras = _keras()
  _, _, base = guide
  imported = convert.keras_import_model(base)
  assert imported.num_classes == 0 and imported.model.head == "features"
  assert "classifier" not in imported.variables["params"] and not imported.fine_tuned
  x = pixels(97, seed=3) / 127.5 - 1
  keras_maps = {
      "block0": "expanded_conv_project_BN",
      "block2": "block_2_add",
      "block5": "block_5_add",
      "block12": "block_12_add",
      "block16": "block_16_project_BN",
  }
  probe = keras.Model(
      base.input, [base.output] + [base.get_layer(n).output for n in keras_maps.values()]
  )
  final, *theirs = probe.predict(x, verbose=0)
  model = imported.model
  pooled = np.asarray(_apply(model, imported.variables, x))
  _check(pooled, final.mean(axis=(1, 2)), "features pooled", relative=True)
  ours = jax.jit(lambda v, x: model.apply(v, x, method=model.features))(imported.variables, x)
  info = model.feature_info()
  assert [i["name"] for i in info] == list(keras_maps) and set(ours) == set(keras_maps)
  assert [i["stride"] for i in info] == [2, 4, 8, 16, 32]
  for entry, their_map in zip(info, theirs):
    our_map = np.asarray(ours[entry["name"]])
    assert our_map.shape[-1] == entry["channels"]
    assert our_map.shape[1] == -(-97 // entry["stride"])
    _check(our_map, their_map, entry["name"], relative=True)


def _head_model(base, *head_layers):
  keras = _keras()
  inputs = keras.Input(base.input.shape[1:])
  x = base(inputs, training=False)
  for layer in head_layers:
    x = layer(x)
  return keras.Model(inputs, x)


def test_other_heads_are_refused_in_one_line_naming_the_layer(guide):
  keras = _keras()
  base = guide[2]
  layers = keras.layers
  cases = [
      (
          [
              layers.GlobalAveragePooling2D(),
              layers.Dense(16, activation="relu", name="hidden"),
              layers.Dense(7, activation="softmax"),
          ],
          "'hidden' (Dense) has activation 'relu'",
      ),
      ([layers.Flatten(name="flat"), layers.Dense(7)], "'flat' (Flatten)"),
      ([layers.GlobalMaxPooling2D(name="max_pool"), layers.Dense(7)], "'max_pool'"),
  ]
  for head, message in cases:
    with pytest.raises(convert.ConversionError, match=re.escape(message)) as error:
      convert.keras_import_model(_head_model(base, *head))
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  """Three 194x97 PNGs (wider than high), each pixel twice side by side: the
  whole image resized to 97x97 is then exact in uint8 and in float (the
  bilinear weights are 1/2 on two equal pixels), so evaluation's pixels and
  Keras' are the same numbers; a centre crop would see another image."""
  directory = tmp_path_factory.mktemp("photos") / "all"
  directory.mkdir()
  images = pixels(97, seed=5)
  images = np.concatenate([images, images[:, ::-1]])[:3]
  for i, image in enumerate(np.round(images).astype(np.uint8)):
    Image.fromarray(np.repeat(image, 2, axis=1)).save(directory / f"p{i}.png")
  return sorted(str(p) for p in directory.iterdir())


def test_cli_import_then_predict_gives_keras_top1(guide, photos, tmp_path):
  """The README's commands: convert the .keras file with class names, then
  predict the files: the top-1 of Keras' model on image_dataset_from_directory's
  images (the whole image resized, no crop)."""
  keras = _keras()
  model, paths, _ = guide
  names = ["airplane", "beach", "forest", "harbor", "river", "runway", "tennis"]
  (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
  out = str(tmp_path / "my_model")
  convert.main(
      [
          "--source=keras",
          f"--weights={paths['.keras']}",
          f"--class_names={tmp_path / 'classes.txt'}",
          f"--out={out}",
      ]
  )
  dataset = keras.utils.image_dataset_from_directory(
      os.path.dirname(photos[0]), labels=None, image_size=(97, 97), shuffle=False, batch_size=8
  )
  theirs = model.predict(dataset, verbose=0)
  predictor = predict.Predictor.from_checkpoint(out)
  assert predictor.spec.resize == "stretch" and predictor.spec.class_names == tuple(names)
  results, errors = predictor.predict_files(photos)
  assert not errors
  for path, probabilities in zip(photos, theirs):
    ours = results[path]
    print(f"{os.path.basename(path)}: keras {probabilities.round(4)}, ours {ours.round(4)}")
    np.testing.assert_allclose(ours, probabilities, atol=TOLERANCE)
    assert predictor.top_k(ours, 1)[0][0] == names[int(np.argmax(probabilities))]


def test_settings_file_round_trip_of_a_features_import(guide, tmp_path):
  base = guide[2]
  imported = convert.keras_import_model(base)
  out = str(tmp_path / "features")
  checkpoint.save_variables(out, imported.variables, imported.settings(), (), "test")
  model, variables, config, names = checkpoint.load_model(out)
  assert model.head == "features" and names == () and config.dataset.eval_resize == "crop"
  assert isinstance(model, models.MobileNetV2) and "classifier" not in variables["params"]


@pytest.fixture(scope="module")
def features_checkpoint(guide, tmp_path_factory):
  """The guide's .h5 imported without its classifier (`convert --head=features`)."""
  out = str(tmp_path_factory.mktemp("features") / "mnv2_features")
  convert.main(
      ["--source=keras", f"--weights={guide[1]['.h5']}", "--head=features", f"--out={out}"]
  )
  return out


def test_embeddings_of_files(guide, features_checkpoint, photos, tmp_path):
  """`predict --embeddings`: a features checkpoint's pooled features, and a
  classifier checkpoint's (the classifier's input) are the same vectors."""
  model, variables, config, names = checkpoint.load_model(features_checkpoint)
  assert model.head == "features" and names == () and config.dataset.eval_resize == "stretch"
  assert "classifier" not in variables["params"]
  features = predict.Predictor.from_checkpoint(features_checkpoint)
  assert not features.has_classes
  pixels_, errors = features.read_files(photos)
  assert not errors
  vectors = features.embeddings(np.stack(list(pixels_.values())))
  assert vectors.shape == (len(photos), 1280)
  # The same vectors, through the classifier model's own input.
  imported = convert.keras_file(guide[1][".keras"])
  classifier_dir = str(tmp_path / "classifier")
  checkpoint.save_variables(classifier_dir, imported.variables, imported.settings(), (), "test")
  classifier = predict.Predictor.from_checkpoint(classifier_dir)
  np.testing.assert_allclose(
      classifier.embeddings(np.stack(list(pixels_.values()))), vectors, atol=1e-5
  )
  with pytest.raises(convert.ConfigError, match="has no classes"):
    features.predict(np.stack(list(pixels_.values())))


@pytest.mark.slow
def test_features_export_outputs_features(features_checkpoint, tmp_path):
  """export of a features model: one output, named `features` (SavedModel)."""
  tf = pytest.importorskip("tensorflow")
  from mnv2_flax import export  # pylint: disable=g-import-not-at-top

  out = str(tmp_path / "export")
  info = export.export(features_checkpoint, out, ["saved_model"])
  assert info["outputs"] == ["features"] and info["class_names"] == []
  assert info["resize"] == "stretch"
  images = pixels(97, seed=7)
  serve = tf.saved_model.load(os.path.join(out, "saved_model")).signatures["serving_default"]
  got = serve(**{export.INPUT_NAME: tf.constant(images)})
  assert list(got) == ["features"]
  expected = predict.Predictor.from_checkpoint(features_checkpoint).embeddings(images)
  _check(got["features"].numpy(), expected, "exported features", relative=True)
  exported = predict.Predictor.from_exported(os.path.join(out, "saved_model"))
  _check(exported.embeddings(images), expected, "predict --model features", relative=True)


def _readme_commands() -> list[str]:
  """The README's block of commands for a fine-tuned model and features."""
  text = (REPO / "README.md").read_text()
  start = text.index("```bash\n", text.index("**Your own fine-tuned model, and features.**"))
  block = text[start + len("```bash\n") : text.index("```", start + 8)]
  return [line for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_commands_import_predict_and_embed_quietly(guide, photos, tmp_path):
  """Each README command, run as written on this test's files: the Keras
  fine-tune and the Lightning checkpoint imported, a photo classified as
  Keras does, features written; no library log lines, only the answers."""
  commands = _readme_commands()
  assert len(commands) == 5 and all(c.startswith("python -m mnv2_flax.") for c in commands)
  names = ["airplane", "beach", "forest", "harbor", "river", "runway", "tennis"]
  (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
  replacements = {
      "/tmp/": f"{tmp_path}/",
      "my_model.keras": guide[1][".keras"],
      "classes.txt": str(tmp_path / "classes.txt"),
      "photo.jpg": photos[0],
      "lightning.ckpt": str(tmp_path / "lightning.ckpt"),
  }
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    torch = None
  if torch is not None:  # A LightningModule's checkpoint: keys "model.features...".
    from test_convert import random_variables, torchvision_state_dict  # pylint: disable=g-import-not-at-top

    state = torchvision_state_dict(random_variables(ALPHA))
    torch.save(
        {
            "state_dict": {"model." + k: torch.from_numpy(v.copy()) for k, v in state.items()},
            "hyper_parameters": {"lr": 0.01},
        },
        replacements["lightning.ckpt"],
    )
  outputs = []
  for command in commands:
    if "lightning.ckpt" in command and torch is None:
      continue  # CI has no torch; test_convert covers the prefixes on numpy state dicts.
    for old, new in replacements.items():
      command = command.replace(old, new)
    argv = command.split()
    proc = subprocess.run(
        [sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
    assert proc.stderr == "", f"{command} logged:\n{proc.stderr[-2000:]}"
    outputs.append(proc.stdout.splitlines())
  prediction = outputs[1]
  assert prediction[0] == photos[0] and len(prediction) == 6  # The path, then the top 5.
  keras_top1 = names[int(np.argmax(guide[0].predict(_photo_pixels(photos[0]), verbose=0)))]
  assert prediction[1].split()[-1] == keras_top1
  embeddings = np.load(tmp_path / "embeddings.npy")
  assert embeddings.shape == (1, 1280) and outputs[-1][0].startswith("Wrote")


def _photo_pixels(path: str) -> np.ndarray:
  """What image_dataset_from_directory gives Keras (exact for `photos`)."""
  image = np.asarray(Image.open(path).convert("RGB"), np.float32)
  return image.reshape(97, 97, 2, 3).mean(axis=2)[None]


def test_tf_keras_2_tfoplambda_preprocessing_is_read():
  """tf.keras 2 (the tf-keras package) writes preprocess_input as TFOpLambda
  layers, their constant in the inbound node's kwargs; the config below is
  what tf-keras 2.21 wrote into a tutorial model's .h5 (its import matched
  within 6e-6 there)."""
  config = {
      "class_name": "Functional",
      "config": {
          "name": "model",
          "layers": [
              {
                  "class_name": "InputLayer",
                  "name": "input_2",
                  "config": {"batch_input_shape": [None, 96, 96, 3], "name": "input_2"},
                  "inbound_nodes": [],
              },
              {
                  "class_name": "TFOpLambda",
                  "name": "tf.math.truediv",
                  "config": {"name": "tf.math.truediv", "function": "math.truediv"},
                  "inbound_nodes": [["input_2", 0, 0, {"y": 127.5, "name": None}]],
              },
              {
                  "class_name": "TFOpLambda",
                  "name": "tf.math.subtract",
                  "config": {"name": "tf.math.subtract", "function": "math.subtract"},
                  "inbound_nodes": [["tf.math.truediv", 0, 0, {"y": 1.0, "name": None}]],
              },
          ],
      },
  }
  layers = convert.keras_layers(config)
  assert [(layer.kind, float(layer.constant)) for layer in layers[1:]] == [
      ("math.truediv", 127.5),
      ("math.subtract", 1.0),
  ]
  plan = convert._KerasPlan()  # pylint: disable=protected-access
  for layer in layers:
    convert._preprocessing(layer, plan, {})  # pylint: disable=protected-access
  assert convert._keras_normalization(plan) == ((0.5,) * 3, (0.5,) * 3)  # pylint: disable=protected-access
  assert plan.input_shape == (None, 96, 96, 3)
