"""Weight import: each source's logits are reproduced, bad weights refused.

Every source model gets random weights and random BatchNorm statistics
(default statistics, mean 0 and variance 1, would hide epsilon and layout
bugs). Keras and TF-slim run wherever TensorFlow does; torchvision and timm
are checked against the real frameworks when installed and, everywhere, on
numpy state dicts written here by hand from their published layouts.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

# torchvision's import segfaults once TensorFlow is loaded (torch 2.14.1,
# tensorflow 2.21.0); the reverse order works, so it goes first, at collection.
try:
  import torch
  import torchvision
except ImportError:
  torch = torchvision = None

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mnv2_flax import checkpoint, convert, data, models  # noqa: E402

from conftest import random_batch_norm  # noqa: E402

TOLERANCE = 1e-4
NUM_CLASSES = 10


def _keras():
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  return pytest.importorskip("keras")


def _images(size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)


def _logits(model, variables, x) -> np.ndarray:
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


def _check(ours: np.ndarray, theirs: np.ndarray, label: str) -> None:
  delta = float(np.max(np.abs(ours - theirs)))
  print(f"{label}: max |logit| {np.max(np.abs(theirs)):.3g}, max |delta| {delta:.3g}")
  assert ours.shape == theirs.shape
  assert delta <= TOLERANCE, f"{label}: max |delta| {delta}"
  # The two images' logits differ far beyond the tolerance: a layout bug shows.
  assert np.max(np.abs(theirs[0] - theirs[1])) > 100 * TOLERANCE, label


# --- Keras ---------------------------------------------------------------------------


def keras_model(alpha: float, size: int, seed: int = 0, classes: int = NUM_CLASSES):
  """A random keras.applications.MobileNetV2 with random BatchNorm statistics."""
  keras = _keras()
  keras.utils.set_random_seed(seed)
  model = keras.applications.MobileNetV2(
      alpha=alpha,
      input_shape=(size, size, 3),
      weights=None,
      classes=classes,
      classifier_activation=None,
  )
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
      kernel, *bias = layer.get_weights()
      depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)  # (k, k, C, 1)
      fan_in = kernel[:, :, 0].size if depthwise else kernel[..., 0].size
      fan_in *= 8 if isinstance(layer, keras.layers.Dense) else 1  # Logits of a few units.
      layer.set_weights([_he(kernel.shape, fan_in, rng)] + [b + 0.1 for b in bias])
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.set_weights(random_batch_norm(rng, layer.gamma.shape[0]))
  return model


def _he(shape, fan_in: int, rng) -> np.ndarray:
  """He-normal weights: the input still moves the logits after 17 blocks
  (with the frameworks' own inits every image gets nearly the same logits,
  which would hide layout bugs behind the biases). The classifier's are
  smaller: float32 rounding grows with the logits (~1e-4 at logits of 25,
  in the frameworks as here)."""
  return rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)


def _keras_logits(model, x: np.ndarray) -> np.ndarray:
  return np.asarray(model(x, training=False))


@pytest.mark.parametrize(
    "alpha,sizes",
    [
        (0.35, (32, 33)),
        pytest.param(1.0, (64, 65), marks=pytest.mark.slow),
        pytest.param(1.4, (32, 37), marks=pytest.mark.slow),
    ],
)
def test_keras_logits_match(alpha, sizes):
  source = keras_model(alpha, sizes[0])
  model, variables = convert.from_keras(source)
  assert model.width_multiplier == alpha and model.padding == "tf_same"
  for size in sizes:
    if size != sizes[0]:  # Keras' padding depends on the static input size.
      resized = keras_model(alpha, size, seed=1)
      resized.set_weights(source.get_weights())
    else:
      resized = source
    x = _images(size)
    _check(_logits(model, variables, x), _keras_logits(resized, x), f"keras {alpha} {size}px")


def test_keras_softmax_top_gives_logits():
  keras = _keras()
  source = keras_model(0.35, 32)
  softmax = keras.applications.MobileNetV2(
      alpha=0.35, input_shape=(32, 32, 3), weights=None, classes=NUM_CLASSES
  )
  softmax.set_weights(source.get_weights())
  model, variables = convert.from_keras(softmax)
  x = _images(32)
  _check(_logits(model, variables, x), _keras_logits(source, x), "keras softmax top")


def test_keras_rounding_matches_for_published_alphas():
  for alpha in convert.PUBLISHED_WIDTHS + (0.25, 0.6, 0.9, 1.1, 2.0):
    convert.check_keras_width(alpha)
  # Keras truncates int(16 * 0.56) = 8 before rounding; we round 8.96 to 16.
  with pytest.raises(convert.ConversionError, match="expanded_conv_project 8 channels"):
    convert.check_keras_width(0.56)
  with pytest.raises(convert.ConversionError, match="block_3_project"):
    convert.check_keras_width(0.84)


def test_keras_width_without_its_name():
  source = keras_model(0.35, 32)
  source.name = "renamed"
  # The channels tell the width (block_16_project: 112 at 0.35).
  assert convert.from_keras(source)[0].width_multiplier == 0.35
  # The wrong width: the first layer whose shape differs is named.
  with pytest.raises(convert.ConversionError, match="Conv1/kernel has shape"):
    convert.from_keras(source, width_multiplier=1.0)
  model, _ = convert.from_keras(source, width_multiplier=0.35)
  assert model.width_multiplier == 0.35


# --- TF-slim -------------------------------------------------------------------------


def slim_name(keras_name: str) -> str:
  """The TF-slim variable of a Keras one ("block_3_expand_BN/gamma" ->
  "MobilenetV2/expanded_conv_3/expand/BatchNorm/gamma"), from the layouts of
  tensorflow/models research/slim/nets/mobilenet."""
  layer, variable = keras_name.split("/")
  bn = layer.endswith("_BN") or layer.endswith("_bn") or layer == "bn_Conv1"
  layer = layer.removesuffix("_BN").removesuffix("_bn")
  if layer in ("Conv1", "bn_Conv1"):
    scope = "Conv"
  elif layer == "Conv_1":
    scope = "Conv_1"
  elif layer == "predictions":
    return f"MobilenetV2/Logits/Conv2d_1c_1x1/{ {'kernel': 'weights', 'bias': 'biases'}[variable]}"
  elif layer.startswith("expanded_conv_"):
    scope = "expanded_conv/" + layer.removeprefix("expanded_conv_")
  else:
    _, index, part = layer.split("_")
    scope = f"expanded_conv_{index}/{part}"
  if bn:
    return f"MobilenetV2/{scope}/BatchNorm/{variable}"
  return f"MobilenetV2/{scope}/{'depthwise_weights' if 'depthwise' in scope else 'weights'}"


def write_slim_checkpoint(prefix: str, keras_source, seed: int = 0) -> None:
  """A TF-slim checkpoint of a Keras model's weights, 1001 classes (class 0 =
  background): the ExponentialMovingAverage copies hold the Keras values, the
  plain variables other ones, plus a global_step and an optimizer slot."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  tensors = {"global_step": np.array(1234, np.int64)}
  for name, value in convert.keras_arrays(keras_source).items():
    if name == "predictions/kernel":
      value = np.concatenate([rng.normal(size=(value.shape[0], 1)), value], axis=1)
      value = value.reshape(1, 1, *value.shape).astype(np.float32)
    elif name == "predictions/bias":
      value = np.concatenate([[5.0], value]).astype(np.float32)
    slim = slim_name(name)
    tensors[slim + "/ExponentialMovingAverage"] = value
    tensors[slim] = (value + rng.normal(size=value.shape)).astype(np.float32)
  tensors["MobilenetV2/Conv/weights/RMSProp"] = tensors["MobilenetV2/Conv/weights"]
  names = sorted(tensors)
  tf.raw_ops.SaveV2(
      prefix=prefix,
      tensor_names=names,
      shape_and_slices=[""] * len(names),
      tensors=[tf.constant(tensors[n]) for n in names],
  )


def test_slim_checkpoint_prefers_ema_and_drops_background(tmp_path):
  source = keras_model(0.35, 33, classes=1000)
  prefix = str(tmp_path / "model.ckpt-1234")
  write_slim_checkpoint(prefix, source)
  model, variables = convert.from_slim(prefix, width_multiplier=0.35)
  assert model.num_classes == 1000 and model.bn_epsilon == 1e-3
  x = _images(33)
  _check(_logits(model, variables, x), _keras_logits(source, x), "slim 0.35 33px")


# --- torchvision and timm on numpy state dicts ----------------------------------------


def random_variables(width: float, padding: str = "symmetric", seed: int = 0):
  """Random variables of our model (random BatchNorm statistics included)."""
  model = models.MobileNetV2(
      num_classes=NUM_CLASSES, width_multiplier=width, padding=padding, conv_impl="xla"
  )
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.3, 2.0, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.3, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, dict(shapes))


def _torch_conv(kernel):  # HWIO (depthwise: (k, k, 1, C)) -> OIHW (depthwise: (C, 1, k, k)).
  return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def _torch_bn(state, prefix, variables, layer):
  state[f"{prefix}.weight"] = variables["params"][layer]["scale"]
  state[f"{prefix}.bias"] = variables["params"][layer]["bias"]
  state[f"{prefix}.running_mean"] = variables["batch_stats"][layer]["mean"]
  state[f"{prefix}.running_var"] = variables["batch_stats"][layer]["var"]
  state[f"{prefix}.num_batches_tracked"] = np.array(7, np.int64)


def _flatten_layers(tree, prefix=""):
  """{"block3": {"expand_bn": ...}} -> {"block3/expand_bn": ...}."""
  flat = {}
  for name, value in tree.items():
    if isinstance(value, dict) and not any(isinstance(v, np.ndarray) for v in value.values()):
      flat.update(_flatten_layers(value, f"{prefix}{name}/"))
    else:
      flat[prefix + name] = value
  return flat


def torchvision_state_dict(variables) -> dict[str, np.ndarray]:
  """torchvision.models.mobilenet_v2's state dict of our variables, written
  from torchvision's module layout (features.N.conv...)."""
  params = _flatten_layers(variables["params"])
  flat = {"params": params, "batch_stats": _flatten_layers(variables["batch_stats"])}
  state = {"features.0.0.weight": _torch_conv(params["stem"]["kernel"])}
  _torch_bn(state, "features.0.1", flat, "stem_bn")
  for i in range(17):
    b, block = f"features.{i + 1}.conv", f"block{i}"
    if i == 0:
      state[f"{b}.0.0.weight"] = _torch_conv(params[f"{block}/depthwise"]["kernel"])
      _torch_bn(state, f"{b}.0.1", flat, f"{block}/depthwise_bn")
      state[f"{b}.1.weight"] = _torch_conv(params[f"{block}/project"]["kernel"])
      _torch_bn(state, f"{b}.2", flat, f"{block}/project_bn")
    else:
      state[f"{b}.0.0.weight"] = _torch_conv(params[f"{block}/expand"]["kernel"])
      _torch_bn(state, f"{b}.0.1", flat, f"{block}/expand_bn")
      state[f"{b}.1.0.weight"] = _torch_conv(params[f"{block}/depthwise"]["kernel"])
      _torch_bn(state, f"{b}.1.1", flat, f"{block}/depthwise_bn")
      state[f"{b}.2.weight"] = _torch_conv(params[f"{block}/project"]["kernel"])
      _torch_bn(state, f"{b}.3", flat, f"{block}/project_bn")
  state["features.18.0.weight"] = _torch_conv(params["head"]["kernel"])
  _torch_bn(state, "features.18.1", flat, "head_bn")
  state["classifier.1.weight"] = np.ascontiguousarray(params["classifier"]["kernel"].T)
  state["classifier.1.bias"] = params["classifier"]["bias"]
  return state


def timm_state_dict(variables) -> dict[str, np.ndarray]:
  """timm's mobilenetv2_* state dict of our variables (EfficientNet layout:
  blocks.STAGE.INDEX; block 0 a DepthwiseSeparableConv)."""
  params = _flatten_layers(variables["params"])
  flat = {"params": params, "batch_stats": _flatten_layers(variables["batch_stats"])}
  state = {"conv_stem.weight": _torch_conv(params["stem"]["kernel"])}
  _torch_bn(state, "bn1", flat, "stem_bn")
  i = 0
  for stage, depth in enumerate((1, 2, 3, 4, 3, 3, 1)):
    for j in range(depth):
      b, block = f"blocks.{stage}.{j}", f"block{i}"
      if i == 0:
        state[f"{b}.conv_dw.weight"] = _torch_conv(params[f"{block}/depthwise"]["kernel"])
        _torch_bn(state, f"{b}.bn1", flat, f"{block}/depthwise_bn")
        state[f"{b}.conv_pw.weight"] = _torch_conv(params[f"{block}/project"]["kernel"])
        _torch_bn(state, f"{b}.bn2", flat, f"{block}/project_bn")
      else:
        state[f"{b}.conv_pw.weight"] = _torch_conv(params[f"{block}/expand"]["kernel"])
        _torch_bn(state, f"{b}.bn1", flat, f"{block}/expand_bn")
        state[f"{b}.conv_dw.weight"] = _torch_conv(params[f"{block}/depthwise"]["kernel"])
        _torch_bn(state, f"{b}.bn2", flat, f"{block}/depthwise_bn")
        state[f"{b}.conv_pwl.weight"] = _torch_conv(params[f"{block}/project"]["kernel"])
        _torch_bn(state, f"{b}.bn3", flat, f"{block}/project_bn")
      i += 1
  state["conv_head.weight"] = _torch_conv(params["head"]["kernel"])
  _torch_bn(state, "bn2", flat, "head_bn")
  state["classifier.weight"] = np.ascontiguousarray(params["classifier"]["kernel"].T)
  state["classifier.bias"] = params["classifier"]["bias"]
  return state


def _assert_trees_equal(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert [p for p, _ in flat_a] == list(flat_b)
  for path, leaf in flat_a:
    np.testing.assert_array_equal(leaf, flat_b[path], err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("width", [0.35, 1.0, 1.4])
@pytest.mark.parametrize(
    "source,write", [("torchvision", torchvision_state_dict), ("timm", timm_state_dict)]
)
def test_torch_layouts_on_numpy_state_dicts(source, write, width):
  variables = random_variables(width)
  state = write(variables)
  from_source = {"torchvision": convert.from_torchvision, "timm": convert.from_timm}[source]
  model, converted = from_source(state, width_multiplier=width)
  assert (model.padding, model.bn_epsilon, model.num_classes) == ("symmetric", 1e-5, NUM_CLASSES)
  _assert_trees_equal(converted, variables)


def test_timm_safetensors_file(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  variables = random_variables(0.5)
  path = str(tmp_path / "model.safetensors")
  safetensors_numpy.save_file(timm_state_dict(variables), path)
  _, converted = convert.from_timm(path, width_multiplier=0.5)
  _assert_trees_equal(converted, variables)


# --- refusals --------------------------------------------------------------------------


def test_refuses_wrong_shape_unknown_and_missing_names():
  state = torchvision_state_dict(random_variables(0.35))
  wrong = dict(state, **{"features.5.conv.1.0.weight": np.zeros((5, 1, 3, 3), np.float32)})
  with pytest.raises(convert.ConversionError, match=r"features\.5\.conv\.1\.0\.weight has shape"):
    convert.from_torchvision(wrong, width_multiplier=0.35)
  unknown = dict(state, **{"features.19.weight": np.zeros(3, np.float32)})
  with pytest.raises(convert.ConversionError, match=r"unknown weights, e\.g\. features\.19"):
    convert.from_torchvision(unknown, width_multiplier=0.35)
  missing = {k: v for k, v in state.items() if k != "features.7.conv.3.running_var"}
  with pytest.raises(convert.ConversionError, match=r"lacks features\.7\.conv\.3\.running_var"):
    convert.from_torchvision(missing, width_multiplier=0.35)
  with pytest.raises(convert.ConversionError, match=r"features\.0\.0\.weight has shape"):
    convert.from_torchvision(state, width_multiplier=1.0)
  headless = {k: v for k, v in state.items() if not k.startswith("classifier.")}
  with pytest.raises(convert.ConversionError, match=r"lacks classifier\.1\.weight"):
    convert.from_torchvision(headless, width_multiplier=0.35, head="classifier")
  # One line each: the CLI prints them as "error: ...".
  try:
    convert.from_torchvision(missing, width_multiplier=0.35)
  except convert.ConversionError as e:
    assert "\n" not in str(e)


def test_refuses_timm_depth_multiplied_variants():
  state = timm_state_dict(random_variables(1.0))
  deeper = dict(state)
  for name in [n for n in state if n.startswith("blocks.2.2.")]:
    deeper[name.replace("blocks.2.2.", "blocks.2.3.")] = state[name]
  with pytest.raises(convert.ConversionError, match=r"blocks\.2 has 4 blocks.*mobilenetv2_110d"):
    convert.from_timm(deeper)


def test_settings_per_source():
  keras = convert.settings("keras", 1.4, 1000)
  assert keras["model.padding"] == "tf_same" and keras["model.bn_epsilon"] == 1e-3
  assert keras["dataset.mean"] == keras["dataset.std"] == [0.5, 0.5, 0.5]
  assert keras["dataset.eval_crop_fraction"] == 0.875
  assert keras["model.stem_stride"] == 2
  assert keras["model.stage_strides"] == list(models.PAPER_STAGE_STRIDES)
  v2 = convert.settings("torchvision", 1.0, 1000, weights_version="V2")
  assert v2["dataset.eval_crop_fraction"] == 224 / 232 and v2["model.padding"] == "symmetric"
  assert convert.settings("torchvision", 1.0, 1000)["dataset.eval_crop_fraction"] == 224 / 256
  assert convert.settings("slim", 0.5, 1000, image_size=160)["dataset.image_size"] == 160
  with pytest.raises(convert.ConversionError, match="weights_version"):
    convert.settings("torchvision", 1.0, 1000, weights_version="V3")


def test_module_imports_without_frameworks():
  code = (
      "import sys; import mnv2_flax.convert; "
      "bad = {'tensorflow', 'torch', 'timm', 'keras'} & set(sys.modules); "
      "assert not bad, bad"
  )
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- command line ------------------------------------------------------------------------


def test_cli_keras_weights_file_end_to_end(tmp_path, capsys):
  source = keras_model(0.35, 32, classes=1000)
  weights = str(tmp_path / "random.weights.h5")
  source.save_weights(weights)
  out = str(tmp_path / "imported")
  argv = [
      "--source=keras",
      f"--weights={weights}",
      "--width_multiplier=0.35",
      "--image_size=32",
      f"--out={out}",
  ]
  convert.main(argv)
  model, variables, config, class_names = checkpoint.load_model(out)
  assert class_names == data.imagenet_class_names()
  assert config.model.padding == "tf_same" and config.dataset.image_size == 32
  assert tuple(config.dataset.mean) == (0.5, 0.5, 0.5)
  x = _images(32)
  _check(_logits(model, variables, x), _keras_logits(source, x), "keras CLI 0.35 32px")
  # A second import into the same directory is refused, in one line.
  with pytest.raises(SystemExit) as exit_info:
    convert.run(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "already holds a checkpoint" in err and "\n" not in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--source=torchvision", "--out=x"], "needs --weights=PATH"),
        (["--source=caffe", "--out=x"], "invalid choice"),
        (["--source=timm", "--weights=/nonexistent.pth", "--out=x"], "does not exist"),
        (["--source=keras", "--width_multiplier=0.56", "--out=x"], "no equivalent"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    convert.run(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and message in err and "\n" not in err, err


# --- the real frameworks -------------------------------------------------------------------


def _randomize_torch(module, seed: int) -> None:
  """He-normal weights and random BatchNorm statistics (see `_he`)."""
  generator = torch.Generator().manual_seed(seed)
  rng = np.random.default_rng(seed)
  for m in module.modules():
    if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
      w = m.weight.data
      fan_in = w[0].numel() * (8 if isinstance(m, torch.nn.Linear) else 1)
      m.weight.data = torch.from_numpy(_he(tuple(w.shape), fan_in, rng))
      if m.bias is not None:
        m.bias.data += 0.1
    if isinstance(m, torch.nn.BatchNorm2d):
      c = m.num_features
      m.weight.data = torch.rand(c, generator=generator) + 0.5
      m.bias.data = torch.randn(c, generator=generator) * 0.3
      m.running_mean.data = torch.randn(c, generator=generator) * 0.3
      m.running_var.data = torch.rand(c, generator=generator) * 1.7 + 0.3


def _torch_logits(module, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return module(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


@pytest.mark.parametrize(
    "width,sizes",
    [(0.35, (32, 33)), pytest.param(1.0, (64, 65), marks=pytest.mark.slow), (1.4, (32, 37))],
)
def test_torchvision_logits_match(width, sizes):
  if torchvision is None:
    pytest.skip("torchvision is not installed")
  torch.manual_seed(0)
  source = torchvision.models.mobilenet_v2(width_mult=width, num_classes=NUM_CLASSES).eval()
  _randomize_torch(source, 0)
  state = source.state_dict()
  # The hand-written layout above is torchvision's.
  reference = torchvision_state_dict(random_variables(width))
  assert {k: tuple(v.shape) for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
  model, variables = convert.from_torchvision(state, width_multiplier=width)
  for size in sizes:
    x = _images(size)
    _check(_logits(model, variables, x), _torch_logits(source, x), f"torchvision {width} {size}px")


TIMM_VARIANTS = {0.35: "mobilenetv2_035", 0.5: "mobilenetv2_050", 1.0: "mobilenetv2_100"}
TIMM_VARIANTS.update({1.4: "mobilenetv2_140"})


@pytest.mark.parametrize(
    "width,sizes",
    [(0.35, (32, 33)), pytest.param(1.0, (64, 65), marks=pytest.mark.slow), (1.4, (32, 37))],
)
def test_timm_logits_match(width, sizes):
  timm = pytest.importorskip("timm")
  torch.manual_seed(0)
  source = timm.create_model(TIMM_VARIANTS[width], pretrained=False, num_classes=NUM_CLASSES)
  source = source.eval()
  _randomize_torch(source, 0)
  state = source.state_dict()
  reference = timm_state_dict(random_variables(width))
  assert {k: tuple(v.shape) for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
  model, variables = convert.from_timm(state, width_multiplier=width)
  for size in sizes:
    x = _images(size)
    _check(_logits(model, variables, x), _torch_logits(source, x), f"timm {width} {size}px")


def test_timm_refuses_real_depth_multiplied_variant():
  timm = pytest.importorskip("timm")
  source = timm.create_model("mobilenetv2_110d", pretrained=False, num_classes=NUM_CLASSES)
  with pytest.raises(convert.ConversionError, match="mobilenetv2_110d"):
    convert.from_timm(source.state_dict(), width_multiplier=1.1)


# --- checkpoints as saved in practice: Lightning, DataParallel, timm heads -----------


def _prefixed(state, prefix: str, **extra):
  return {**{prefix + k: v for k, v in state.items()}, **extra}


@pytest.mark.parametrize(
    "source,write,prefix",
    [
        ("torchvision", torchvision_state_dict, "model."),  # LightningModule.model
        ("torchvision", torchvision_state_dict, "module.net."),  # DataParallel of a wrapper
        ("timm", timm_state_dict, "backbone."),
    ],
)
def test_lightning_style_prefixes_are_removed(source, write, prefix):
  """A LightningModule's state dict prefixes every key with the attribute
  holding the network; its other attributes (a loss's class weights, an EMA
  copy) are left out."""
  variables = random_variables(0.35)
  state = _prefixed(
      write(variables),
      prefix,
      **{"criterion.weight": np.ones(NUM_CLASSES, np.float32)},
  )
  # An EMA copy under a longer prefix: the shortest prefix is the model.
  state.update({f"ema.{prefix}{k}": v * 0 for k, v in write(variables).items()})
  from_source = {"torchvision": convert.from_torchvision, "timm": convert.from_timm}[source]
  _, converted = from_source(state, width_multiplier=0.35)
  _assert_trees_equal(converted, variables)


def test_timm_num_classes_n_and_0():
  """timm.create_model(..., num_classes=7) replaces the classifier (7
  classes); num_classes=0 has none: a features model, the same tree less
  the classifier."""
  model = models.MobileNetV2(num_classes=7, width_multiplier=0.5, conv_impl="xla")
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )
  rng = np.random.default_rng(3)
  variables = jax.tree.map(lambda s: rng.uniform(0.3, 1, s.shape).astype(np.float32), dict(shapes))
  state = timm_state_dict(variables)
  converted_model, converted = convert.from_timm(state, width_multiplier=0.5)
  assert converted_model.num_classes == 7
  _assert_trees_equal(converted, variables)
  headless = {k: v for k, v in state.items() if not k.startswith("classifier.")}
  features_model, features = convert.from_timm(headless, width_multiplier=0.5)
  assert features_model.head == "features"
  expected = {"params": dict(variables["params"]), "batch_stats": variables["batch_stats"]}
  del expected["params"]["classifier"]
  _assert_trees_equal(features, expected)
  # A classifier dropped on request (--head=features).
  _, dropped = convert.from_timm(state, width_multiplier=0.5, head="features")
  _assert_trees_equal(dropped, expected)


def test_lightning_checkpoint_file_with_hyper_parameters(tmp_path):
  """A real torch.save'd Lightning-style checkpoint (state_dict under
  "state_dict", "model." prefixes, hyper-parameters of a class torch's
  weights_only loading refuses) is read without unpickling that class."""
  torch = pytest.importorskip("torch")  # noqa: F811 (without torchvision too)
  variables = random_variables(0.35)
  state = {
      "model." + k: torch.from_numpy(np.ascontiguousarray(v))
      for k, v in torchvision_state_dict(variables).items()
  }
  path = str(tmp_path / "epoch=3-step=400.ckpt")
  torch.save(
      {
          "epoch": 3,
          "global_step": 400,
          "pytorch-lightning_version": "2.5.0",
          "state_dict": state,
          "hyper_parameters": HyperParameters(lr=0.01, classes=NUM_CLASSES),
      },
      path,
  )
  with pytest.raises(torch.serialization.pickle.UnpicklingError):  # What the stubs work around.
    torch.load(path, weights_only=True)
  _, converted = convert.from_torchvision(convert.load_state_dict(path), width_multiplier=0.35)
  _assert_trees_equal(converted, variables)
  assert not HyperParameters.constructed  # Its code never ran.


class HyperParameters:
  """Stands for a LightningModule's saved hyper-parameters (an AttributeDict,
  a config object)."""

  constructed = False

  def __init__(self, **kwargs):
    self.__dict__.update(kwargs)

  def __setstate__(self, state):
    HyperParameters.constructed = True
    self.__dict__.update(state)
