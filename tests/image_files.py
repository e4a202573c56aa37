"""Image files as users have them, for the data tests: encoded by Pillow's own
save, ImageNet's tars as image-net.org ships them; and a Python process in
which importing TensorFlow fails."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from typing import Any

import numpy as np
from PIL import Image

from conftest import REPO


def encode(pixels: np.ndarray, fmt: str = "JPEG", **params: Any) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, fmt, **params)
  return out.getvalue()


def random_jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  return encode(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_imagenet_tars(manual_dir: str, synsets: list[str], rng: np.random.Generator) -> None:
  """ILSVRC2012_img_{train,val}.tar as image-net.org ships them (train: one
  tar per synset), with 4 JPEGs per synset and 5 validation JPEGs."""

  def add(archive: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    archive.addfile(info, io.BytesIO(content))

  os.makedirs(manual_dir)
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as train:
    for synset in synsets:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as per_synset:
        for i in range(4):
          add(per_synset, f"{synset}_{i}.JPEG", random_jpeg(rng, 30, 40))
      add(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as val:
    for i in range(1, 6):
      add(val, f"ILSVRC2012_val_{i:08d}.JPEG", random_jpeg(rng, 30, 40))


def tensorflow_blocker(directory) -> str:
  """A directory that, first on PYTHONPATH, makes `import tensorflow` fail
  (in the process and in the worker processes it starts)."""
  blocked = directory / "no_tensorflow"
  (blocked / "tensorflow").mkdir(parents=True, exist_ok=True)
  (blocked / "tensorflow" / "__init__.py").write_text(
      "raise ImportError('tensorflow is blocked in this process')\n"
  )
  return str(blocked)


def run_without_tensorflow(script: str, tmp_path, timeout: int = 300) -> str:
  """Runs `script` in a Python process where `import tensorflow` fails;
  asserts it ends without TensorFlow loaded; returns its stdout."""
  blocked = tensorflow_blocker(tmp_path)
  check = "\nassert not [m for m in sys.modules if m.split('.')[0] == 'tensorflow']\n"
  env = dict(
      os.environ,
      PYTHONPATH=os.pathsep.join([blocked, str(REPO), str(REPO / "tests")]),
      JAX_PLATFORMS="cpu",
  )
  proc = subprocess.run(
      [sys.executable, "-c", "import sys\n" + script + check],
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def shared_memory_names(pid: int) -> set[str]:
  """Process `pid`'s training-image blocks (`input_pipeline._BlockRing`)."""
  return {n for n in os.listdir("/dev/shm") if n.startswith(f"mnv2_{pid}_")}
