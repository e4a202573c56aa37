"""The command line: summary mode, and one-line errors (exit 2) for bad input."""

import json
import sys

import pytest
from absl import flags

from conftest import run_main, tiny_config
from mnv2_flax import checkpoint, train
from mnv2_flax import main as cli

IMAGENET = "--config=configs/imagenet.py"


def run_in_process(argv, capsys):
  """Runs the CLI in this process; returns (exit code, stderr lines)."""
  flags.FLAGS.unparse_flags()
  sys.argv = ["mnv2_flax.main", *argv]
  with pytest.raises(SystemExit) as exit_info:
    cli.run()
  return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def other_model_checkpoint(tmp_path_factory):
  """A checkpoint of a width-0.5 model, to be restored into a width-0.35 one."""
  directory = tmp_path_factory.mktemp("wide") / "checkpoints"
  s = train.setup(tiny_config(**{"model.width_multiplier": 0.5}))
  ckpt = checkpoint.Checkpointer(str(directory), keep=1)
  ckpt.save(1, s.init_state())
  ckpt.wait()
  return str(directory)


# (case id, argv, text the one-line message must contain). {tmp} is a fresh
# empty directory, {ckpt} a checkpoint of another model.
BAD_INPUTS = [
    ("unknown key", ["--config.model.widht=1"], "widht"),
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
    ("bad optimizer", ["--config.optimizer.name=adam"], "optimizer.name"),
    ("bad best metric", ["--config.best_metric=f1"], "best_metric"),
    ("batch > dataset", ["--config.global_batch_size=4096"], "global_batch_size"),
    ("missing config file", ["--config=configs/nope.py"], "nope.py"),
    ("bad mode", ["--mode=predict"], "mode"),
    ("stray argument", ["train"], "unexpected arguments"),
    ("imagenet not downloaded",
     [IMAGENET, "--config.dataset.data_dir={tmp}/tfds",
      "--config.dataset.manual_dir={tmp}/manual"], "ILSVRC2012_img_train.tar"),
    ("image folder missing",
     ["--config=configs/imagefolder.py", "--config.dataset.root={tmp}/nothing"],
     "dataset.root"),
    ("image folder empty",
     ["--config=configs/imagefolder.py", "--config.dataset.root={tmp}"], "dataset.root"),
    ("eval without checkpoint", ["--mode=eval"], "no checkpoint"),
    ("incompatible checkpoint",
     ["--config=configs/smoke.py", "--mode=eval", "--config.checkpoint_path={ckpt}"],
     "params/block10/expand_bn/bias: checkpoint (192,) vs model (144,)"),
    ("unwritable workdir", ["--workdir=/proc/version/run"], "/proc/version/run"),
]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
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
  proc = run_main(["--config=configs/smoke.py", "--config.global_batch_size=30",
                   f"--workdir={tmp_path}"], devices=4, check=False)
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
