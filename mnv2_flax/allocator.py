"""Process-level memory settings for XLA's CPU runtime."""

import os
import sys

# XLA's CPU runtime mallocs one buffer for all of a step's temporaries (1.8 GB
# for MobileNetV2 at 224x224, batch 32) and frees it when the step ends. By
# default glibc mmaps such a block afresh each step and the kernel faults in and
# zeroes every page of it again. Transparent huge pages make that 512x fewer
# faults (train step 1,091 -> 625 ms); the main thread's heap keeping what it
# frees (no mmap, no trim) removes the faults altogether (554-603 ms), if the
# step runs on the main thread (`keep_step_memory`). Other threads' arenas still
# mmap large blocks: keeping those too (arena_max=1) fragmented the heap (4.7-8.2
# GB peak instead of 3.0 GB, docs/benchmarks.md).
MALLOC_TUNABLES = (
    "glibc.malloc.hugetlb=1",
    "glibc.malloc.mmap_max=0",
    f"glibc.malloc.trim_threshold={1 << 40}",
)


def tune_malloc() -> None:
  """Re-executes this command once with `MALLOC_TUNABLES` added.

  glibc reads GLIBC_TUNABLES only at process start, hence the re-exec. Left
  alone when GLIBC_TUNABLES already sets any glibc.malloc tunable (the user's
  choice, or this process after its re-exec). Opt out with MNV2_TUNE_MALLOC=0.
  The process that has the tunables then calls `keep_step_memory`.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if set(MALLOC_TUNABLES) <= set(tunables.split(":")):
    keep_step_memory()
    return
  if (not sys.platform.startswith("linux") or "glibc.malloc." in tunables
      or os.environ.get("MNV2_TUNE_MALLOC", "1") == "0"):
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, *MALLOC_TUNABLES]))
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def keep_step_memory() -> None:
  """Runs single-device CPU computations on the calling thread.

  Then XLA mallocs a step's temporaries from the main thread's heap, which
  `MALLOC_TUNABLES` keep mapped, so the next step reuses the memory instead of
  faulting it in anew. Must run before JAX creates its CPU client. Costs the
  overlap of Python with the step (none measurable for the digits default).
  """
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_cpu_enable_async_dispatch", False)
