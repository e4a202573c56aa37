"""Process-level memory allocator settings for XLA's CPU runtime."""

import os
import sys

# XLA's CPU runtime mallocs one buffer for all of a step's temporaries (1.8 GB
# for MobileNetV2 at 224x224, batch 32) and frees it when the step ends; glibc
# mmaps it afresh each step and the kernel faults it in. Transparent huge pages
# make that 512x fewer faults (train step 1,091 -> 625 ms). Keeping the block in
# the heap instead (arena_max=1, mmap_max=0, no trim) was measured too: it held
# 4.7-8.2 GB instead of 3.0 GB at peak and was slower (docs/cpu_kernels.md).
MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1",)


def use_huge_page_malloc() -> None:
  """Re-executes this command once with `MALLOC_TUNABLES` added.

  glibc reads GLIBC_TUNABLES only at process start, hence the re-exec. Left
  alone when GLIBC_TUNABLES already sets any glibc.malloc tunable (the user's
  choice, or this process after its re-exec). Opt out with
  MNV2_HUGE_PAGE_MALLOC=0.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if (
      not sys.platform.startswith("linux")
      or "glibc.malloc." in tunables
      or os.environ.get("MNV2_HUGE_PAGE_MALLOC", "1") == "0"
  ):
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, *MALLOC_TUNABLES]))
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
