"""The malloc settings `main` and the benchmark re-execute themselves with."""

import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO
from mnv2_flax import allocator

THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
TEMP_MB = 256

# Re-execs via the allocator, then prints, one per line: the tunables; how many
# kB of a 256 MB block malloc'd and touched on a second thread (as XLA's worker
# threads do) are transparent huge pages; whether JAX dispatches CPU work
# asynchronously; and the page faults of the third call of a jitted function
# whose temporaries take 256 MB (as a train step's do, at every step).
PROBE = """
import ctypes, os, resource, threading
from mnv2_flax import allocator
allocator.tune_malloc()
import jax, jax.numpy as jnp
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
step = jax.jit(lambda x: jnp.cumsum(jnp.sin(x), axis=0)[-1])
x = jnp.ones((4096, 8192))
temp_mb = step.lower(x).compile().memory_analysis().temp_size_in_bytes >> 20
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.environ.get("GLIBC_TUNABLES", ""))
print(huge_kb)
print(jax.config.values["jax_cpu_enable_async_dispatch"])
print(temp_mb)
print(faults)
"""


def probe(**env_overrides):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "MNV2_TUNE_MALLOC")}
  env.update(env_overrides, PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True,
                       capture_output=True, text=True, timeout=120).stdout
  tunables, huge_kb, async_dispatch, temp_mb, faults = out.splitlines()
  assert int(temp_mb) == TEMP_MB
  return tunables, int(huge_kb), async_dispatch == "True", int(faults)


def thp_mode() -> str:
  text = THP_MODE.read_text() if THP_MODE.exists() else ""
  return text.split("[")[1].split("]")[0] if "[" in text else "unavailable"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_reexec_keeps_step_memory_and_gives_large_blocks_huge_pages():
  tunables, huge_kb, async_dispatch, faults = probe()
  assert tunables == ":".join(allocator.MALLOC_TUNABLES)
  if thp_mode() in ("always", "madvise"):
    assert huge_kb >= 128 << 10  # At least half of the 256 MB block.
  # The step runs on the main thread, whose heap kept the last call's
  # temporaries: no page of them is faulted in again (65,536 4 KiB pages).
  assert not async_dispatch
  assert faults < 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_opting_out_keeps_glibc_and_jax_defaults():
  tunables, huge_kb, async_dispatch, faults = probe(MNV2_TUNE_MALLOC="0")
  assert tunables == ""
  assert async_dispatch
  if thp_mode() == "madvise":  # Only glibc's madvise would ask for huge pages.
    assert huge_kb == 0
    assert faults > (TEMP_MB << 20) // 4096 // 2  # Faulted in afresh.
  user_choice = "glibc.malloc.tcache_count=0"
  assert probe(GLIBC_TUNABLES=user_choice)[:3] == (user_choice, huge_kb, True)
