"""Process-level memory allocator settings for XLA's CPU runtime."""

import os
import sys

# XLA's CPU runtime mallocs one buffer for all of a step's temporaries (1.8 GB
# for MobileNetV2 at 224x224, batch 32) and frees it when the step ends. By
# default glibc serves it with a fresh mmap each step, and the kernel then
# zeroes every page of it: a third of the CPU samples of a train step went to
# `clear_page_erms`. So: huge pages (hugetlb=1: 512x fewer page faults), and
# large blocks from the one main heap, kept after `free` for the next step
# (arena_max=1: the worker thread that allocates would otherwise get a
# per-thread arena, which mmaps anything over 64 MB whatever mmap_max says;
# mmap_max=0; trim_threshold: never give the heap's top back).
MALLOC_TUNABLES = (
    "glibc.malloc.hugetlb=1",
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    f"glibc.malloc.trim_threshold={2**40}",
)


def use_huge_page_malloc() -> None:
  """Re-executes this command once with `MALLOC_TUNABLES` added.

  glibc reads GLIBC_TUNABLES only at process start, hence the re-exec. Left
  alone when GLIBC_TUNABLES already sets any glibc.malloc tunable (the user's
  choice, or this process after its re-exec). Opt out with
  MNV2_HUGE_PAGE_MALLOC=0.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if (not sys.platform.startswith("linux") or "glibc.malloc." in tunables
      or os.environ.get("MNV2_HUGE_PAGE_MALLOC", "1") == "0"):
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, *MALLOC_TUNABLES]))
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
