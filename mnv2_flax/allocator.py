"""Process-level memory allocator settings for XLA's CPU runtime."""

import os
import sys

HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"


def use_huge_page_malloc() -> None:
  """Re-executes this command once with glibc's transparent-huge-page malloc.

  XLA's CPU runtime allocates and frees large buffers every step; with 4 KiB
  pages the train step spends a large share of its time in page faults.
  glibc reads GLIBC_TUNABLES only at process start, hence the re-exec.
  Opt out with MNV2_HUGE_PAGE_MALLOC=0.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if (not sys.platform.startswith("linux") or "glibc.malloc.hugetlb" in tunables
      or os.environ.get("MNV2_HUGE_PAGE_MALLOC", "1") == "0"):
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, HUGE_PAGE_MALLOC]))
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
