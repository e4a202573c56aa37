"""The command line: summary mode, and one-line errors (exit 2) for bad input."""

import json
import sys

import jax
import numpy as np
import pytest
from absl import flags

from mnv2_flax import checkpoint, config_lib, errors, models, train
from mnv2_flax import main as cli

from conftest import CACHE_DIR, run_main, tiny_config

# One worker: the tests share the compiled wide_setup.
pytestmark = pytest.mark.xdist_group("cli")

IMAGENET = "--config=configs/imagenet.py"


def run_in_process(argv, capsys):
  """Runs the CLI in this process; returns (exit code, stderr lines)."""
  if not any(a.startswith("--config=") for a in argv):
    # The default config file is loaded, and its --config.KEY override flags
    # defined, when main is imported; only a parsed --config does it again.
    argv = [f"--config={config_lib.__file__}", *argv]
  # The tests' compilation cache: main points JAX's at the config's, for the
  # rest of this process (the default is the user's ~/.cache).
  argv = [*argv, f"--config.compilation_cache_dir={CACHE_DIR}"]
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # Or the next parse would define it twice.
  flags.FLAGS.unparse_flags()
  sys.argv = ["mnv2_flax.main", *argv]
  with pytest.raises(SystemExit) as exit_info:
    cli.run()
  return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def wide_setup():
  """A width-0.5 model on the tiny config, compiled once for this module."""
  return train.setup(tiny_config(**{"model.width_multiplier": 0.5}))


@pytest.fixture(scope="module")
def wide_state(wide_setup):
  """Its state, with random weights drawn by the cheaper generator."""
  return wide_setup.init(models.random_weights_key(0))


@pytest.fixture(scope="module")
def other_model_checkpoint(tmp_path_factory, wide_state):
  """A checkpoint of a width-0.5 model, to be restored into a width-0.35 one."""
  directory = tmp_path_factory.mktemp("wide") / "checkpoints"
  ckpt = checkpoint.Checkpointer(str(directory), keep=1)
  ckpt.save(1, wide_state)
  ckpt.wait()
  return str(directory)


# (case id, argv, text the one-line message must contain). {tmp} is a fresh
# empty directory, {ckpt} a checkpoint of another model.
BAD_INPUTS = [
    ("unknown key", ["--config.model.widht=1"], "config.model.widht: unknown key"),
    (
        "unknown key with a config file",
        ["--config=configs/smoke.py", "--config.optimizer.lr=0.1"],
        "config.optimizer.lr: unknown key (set to 0.1)",
    ),
    ("wrong type", ["--config.model.width_multiplier=wide"], "width_multiplier"),
    ("zero lr", ["--config.optimizer.learning_rate=0"], "optimizer.learning_rate"),
    ("negative lr", ["--config.optimizer.learning_rate=-0.1"], "optimizer.learning_rate"),
    ("zero width", ["--config.model.width_multiplier=0"], "model.width_multiplier"),
    ("zero batch", ["--config.global_batch_size=0"], "global_batch_size"),
    ("zero eval batch", ["--config.eval_batch_size=0"], "eval_batch_size"),
    ("no steps", ["--config.num_epochs=0"], "num_epochs"),
    ("zero log interval", ["--config.log_every_steps=0"], "log_every_steps"),
    ("tiny resolution", ["--config.dataset.image_size=8"], "dataset.image_size"),
    ("unknown dataset", ["--config.dataset.name=imagenet21k"], "dataset.name"),
    ("bad bottleneck", ["--config.model.bottleneck=gelu"], "model.bottleneck"),
    ("bad padding", ["--config.model.padding=valid"], "model.padding"),
    ("bad conv impl", ["--config.model.conv_impl=cudnn"], "model.conv_impl"),
    ("bad strides", ["--config.model.stage_strides=(1,2)"], "model.stage_strides"),
    ("stride 3", ["--config.model.stem_stride=3"], "stride"),
    ("dropout 1", ["--config.model.dropout_rate=1.0"], "model.dropout_rate"),
    (
        "bad residual",
        ["--config.model.residual=dense"],
        "config.model.residual: must be 'bottleneck', 'expansion' or 'none', got 'dense'",
    ),
    (
        "bn momentum 1.5",
        ["--config.model.bn_momentum=1.5"],
        "config.model.bn_momentum: must be a float in [0, 1), got 1.5",
    ),
    ("zero bn epsilon", ["--config.model.bn_epsilon=0"], "config.model.bn_epsilon:"),
    (
        "negative momentum",
        ["--config.optimizer.momentum=-1"],
        "config.optimizer.momentum: must be a float in [0, 1), got -1.0",
    ),
    (
        "negative warmup",
        ["--config.optimizer.warmup_epochs=-1"],
        "config.optimizer.warmup_epochs: must be a float >= 0, got -1.0",
    ),
    (
        "zero decay rate",
        ["--config.optimizer.decay_rate=0"],
        "config.optimizer.decay_rate: must be a float in (0, 1], got 0.0",
    ),
    ("zero decay epochs", ["--config.optimizer.decay_epochs=0"], "config.optimizer.decay_epochs:"),
    (
        "nan lr",
        ["--config.optimizer.learning_rate=nan"],
        "config.optimizer.learning_rate: must be a float > 0, got nan",
    ),
    (
        "two-channel mean",
        ["--config.dataset.mean=(0.5,0.5)"],
        "config.dataset.mean: must be a tuple of 1 or 3 entries, each a float in "
        "[0, 1], got (0.5, 0.5)",
    ),
    (
        "zero std",
        ["--config.dataset.std=(0,0,0)"],
        "config.dataset.std: must be a tuple of 1 or 3 entries, each a float > 0, got (0, 0, 0)",
    ),
    (
        "mean and std lengths differ",
        ["--config.dataset.std=(0.5,)"],
        "config.dataset.std: has 1 entries but dataset.mean has 3",
    ),
    (
        "crop area 2",
        ["--config.dataset.crop_area_min=2"],
        "config.dataset.crop_area_min: must be a float in (0, 1], got 2.0",
    ),
    (
        "zero eval crop",
        ["--config.dataset.eval_crop_fraction=0"],
        "config.dataset.eval_crop_fraction:",
    ),
    (
        "negative worker count",
        ["--config.dataset.workers=-2"],
        "config.dataset.workers: must be an int >= -1, got -2",
    ),
    ("negative seed", ["--config.seed=-1"], "config.seed: must be an int >= 0, got -1"),
    (
        "zero train steps",
        ["--config.num_train_steps=0"],
        "config.num_train_steps: must be -1 or an int >= 1, got 0",
    ),
    ("no checkpoints kept", ["--config.keep_checkpoints=0"], "config.keep_checkpoints:"),
    ("negative profile steps", ["--config.profile_steps=-1"], "config.profile_steps:"),
    ("bad optimizer", ["--config.optimizer.name=adam"], "optimizer.name"),
    ("bad best metric", ["--config.best_metric=f1"], "best_metric"),
    ("batch > dataset", ["--config.global_batch_size=4096"], "global_batch_size"),
    ("missing config file", ["--config=configs/nope.py"], "nope.py"),
    ("missing config file and a key", ["--config=configs/nope.py", "--config.seed=1"], "nope.py"),
    ("bad mode", ["--mode=predict"], "mode"),
    ("stray argument", ["train"], "unexpected arguments"),
    (
        "imagenet not downloaded",
        [
            IMAGENET,
            "--config.dataset.data_dir={tmp}/tfds",
            "--config.dataset.manual_dir={tmp}/manual",
        ],
        "ILSVRC2012_img_train.tar",
    ),
    (
        "image folder missing",
        ["--config=configs/imagefolder.py", "--config.dataset.root={tmp}/nothing"],
        "dataset.root",
    ),
    (
        "image folder empty",
        ["--config=configs/imagefolder.py", "--config.dataset.root={tmp}"],
        "dataset.root",
    ),
    ("eval without checkpoint", ["--mode=eval"], "no checkpoint"),
    (
        "incompatible checkpoint",
        ["--config=configs/smoke.py", "--mode=eval", "--config.checkpoint_path={ckpt}"],
        "params/block10/expand_bn/bias: checkpoint (192,) vs model (144,)",
    ),
    ("unwritable workdir", ["--workdir=/proc/version/run"], "/proc/version/run"),
]


@pytest.mark.parametrize(
    "argv,expected",
    [
        # Slow: the cases that train a model to make their checkpoint.
        pytest.param(*c[1:], id=c[0], marks=[pytest.mark.slow] if "{ckpt}" in str(c[1]) else [])
        for c in BAD_INPUTS
    ],
)
def test_bad_input_is_one_line_exit_2(argv, expected, tmp_path, capsys, request):
  substitutions = {"tmp": tmp_path}
  if any("{ckpt}" in a for a in argv):
    substitutions["ckpt"] = request.getfixturevalue("other_model_checkpoint")
  argv = [a.format(**substitutions) for a in argv]
  if not any(a.startswith("--workdir") for a in argv):
    argv.append(f"--workdir={tmp_path / 'work'}")
  code, lines = run_in_process(argv, capsys)
  assert code == 2
  errors = [line for line in lines if line.startswith("error: ")]
  assert len(errors) == 1, lines
  assert expected in errors[0]
  assert not any("Traceback" in line for line in lines)


@pytest.mark.slow
def test_subprocess_errors_exit_2_without_traceback(tmp_path):
  # Divisibility needs several devices; run the real CLI in a subprocess.
  proc = run_main(
      ["--config=configs/smoke.py", "--config.global_batch_size=30", f"--workdir={tmp_path}"],
      devices=4,
      check=False,
  )
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert "global_batch_size: 30 is not divisible by the 4 devices" in proc.stderr


def test_summary_reports_paper_size(capsys):
  flags.FLAGS.unparse_flags()
  sys.argv = ["mnv2_flax.main", IMAGENET, "--mode=summary"]
  with pytest.raises(SystemExit) as exit_info:
    cli.run()
  assert not exit_info.value.code  # sys.exit(None): success.
  info = json.loads(capsys.readouterr().out.splitlines()[0])
  assert info["params"] == 3_504_872
  assert info["macs"] == 300_774_272


@pytest.mark.slow  # Compiles the whole width-0.5 model's initialisation and evaluation.
def test_nan_eval_loss_raises(wide_setup, wide_state):
  # Training, its periodic evals and --mode=eval all evaluate through this;
  # main maps NonFiniteError to exit status 1.
  state = wide_state.replace(params=jax.tree.map(lambda p: p * np.nan, wide_state.params))
  with pytest.raises(errors.NonFiniteError, match="non-finite eval loss .* at step 0"):
    train.evaluate_dataset(wide_setup, state)
