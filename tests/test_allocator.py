"""The malloc settings `main` and the benchmark re-execute themselves with."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from mnv2_flax import allocator

# Re-execs via the allocator, then mallocs 256 MB on a second thread (as XLA's
# runtime does on its worker threads), frees it, mallocs again, and prints the
# tunables, whether the block lay in the main heap, and whether it was reused.
PROBE = """
import ctypes, os, threading
from mnv2_flax import allocator
allocator.use_huge_page_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
addresses = []
def allocate():
  for _ in range(2):
    addresses.append(libc.malloc(256 << 20))
    libc.free(addresses[-1])
thread = threading.Thread(target=allocate)
thread.start()
thread.join()
with open("/proc/self/maps") as f:
  heap = [line.split()[0] for line in f if line.rstrip().endswith("[heap]")]
low, high = (int(x, 16) for x in heap[0].split("-")) if heap else (0, 0)
print(os.environ.get("GLIBC_TUNABLES", ""))
print(low <= addresses[0] < high, addresses[0] == addresses[1])
"""


def probe(**env_overrides):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "MNV2_HUGE_PAGE_MALLOC")}
  env.update(env_overrides, PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True,
                       capture_output=True, text=True, timeout=60).stdout
  return out.splitlines()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_come_from_the_main_heap_and_are_reused():
  tunables, placement = probe()
  assert tunables == ":".join(allocator.MALLOC_TUNABLES)
  assert placement == "True True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_opting_out_keeps_glibc_defaults():
  # Without the settings glibc mmaps the block afresh, outside the heap.
  tunables, placement = probe(MNV2_HUGE_PAGE_MALLOC="0")
  assert tunables == "" and placement.startswith("False ")
  assert probe(GLIBC_TUNABLES="glibc.malloc.tcache_count=0")[0] == (
      "glibc.malloc.tcache_count=0")
