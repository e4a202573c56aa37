"""The malloc settings `main` and the benchmark re-execute themselves with."""

import os
import pathlib
import subprocess
import sys

import pytest

from mnv2_flax import allocator

from conftest import REPO

THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Re-execs via the allocator, then mallocs and touches 256 MB on a second thread
# (as XLA's runtime does on its worker threads), and prints the tunables and
# how many kB of that block's mapping are transparent huge pages.
PROBE = """
import ctypes, os, threading
from mnv2_flax import allocator
allocator.use_huge_page_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 256 << 20
address = []
def allocate():
  address.append(libc.malloc(size))
  libc.memset(address[0], 1, size)
thread = threading.Thread(target=allocate)
thread.start()
thread.join()
huge_kb, inside = 0, False
with open("/proc/self/smaps") as f:
  for line in f:
    head = line.split()[0]
    if "-" in head and not head.endswith(":"):
      low, high = (int(x, 16) for x in head.split("-"))
      inside = low <= address[0] < high
    elif inside and head == "AnonHugePages:":
      huge_kb = int(line.split()[1])
print(os.environ.get("GLIBC_TUNABLES", ""))
print(huge_kb)
"""


def probe(**env_overrides):
  env = {
      k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MNV2_HUGE_PAGE_MALLOC")
  }
  env.update(env_overrides, PYTHONPATH=str(REPO))
  out = subprocess.run(
      [sys.executable, "-c", PROBE], env=env, check=True, capture_output=True, text=True, timeout=60
  ).stdout
  tunables, huge_kb = out.splitlines()
  return tunables, int(huge_kb)


def thp_mode() -> str:
  text = THP_MODE.read_text() if THP_MODE.exists() else ""
  return text.split("[")[1].split("]")[0] if "[" in text else "unavailable"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_reexec_adds_the_tunables_and_large_blocks_get_huge_pages():
  tunables, huge_kb = probe()
  assert tunables == ":".join(allocator.MALLOC_TUNABLES)
  if thp_mode() in ("always", "madvise"):
    assert huge_kb >= 128 << 10  # At least half of the 256 MB block.


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_opting_out_keeps_glibc_defaults():
  tunables, huge_kb = probe(MNV2_HUGE_PAGE_MALLOC="0")
  assert tunables == ""
  if thp_mode() == "madvise":  # Only glibc's madvise would ask for huge pages.
    assert huge_kb == 0
  user_choice = "glibc.malloc.tcache_count=0"
  assert probe(GLIBC_TUNABLES=user_choice)[0] == user_choice


def test_main_reexecutes_before_importing_jax():
  # The re-exec starts the interpreter afresh: whatever main imported before
  # it (JAX alone is ~1.5 CPU-seconds) would be imported twice per command.
  code = (
      "import sys; sys.argv = ['main', '--config=configs/smoke.py']; "
      "import mnv2_flax.main; print(sorted({'jax', 'numpy'} & set(sys.modules)))"
  )
  env = dict(os.environ, PYTHONPATH=str(REPO))
  out = subprocess.run(
      [sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True, text=True
  ).stdout
  assert out.split() == ["[]"]
