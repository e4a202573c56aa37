"""Decoding a rectangle of a JPEG: libjpeg-turbo's TurboJPEG 3 API
(`tj3SetCroppingRegion`), the library that the `turbojpeg` wheel carries.

A training crop needs only its own pixels: libjpeg-turbo then does the inverse
DCT, upsampling and colour conversion for the crop's columns only, and stops
reading the file after the crop's last row (the rows above it are still
entropy-decoded). The pixels are those of the whole image's decode (accurate
integer DCT, fancy upsampling, as simplejpeg and Pillow decode): the region
asked of libjpeg-turbo reaches one column past the crop on each side, so that
the chroma upsampling at the crop's edges sees the same neighbours (without
it, an edge column differs by up to ~20).

Used through ctypes: the `turbojpeg` extension module links the library, so
its symbols resolve through the module's own handle. ctypes releases the GIL
during each call; each thread has its own decompressor.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

# TurboJPEG 3 constants (turbojpeg.h).
_TJINIT_DECOMPRESS = 1
_TJPARAM_SUBSAMP = 4
_TJPARAM_JPEGWIDTH = 5
_TJPF_RGB = 0
# The width of an MCU per chroma subsampling (TJSAMP_444, 422, 420, GRAY,
# 440, 411, 441): a region must start at a multiple of it.
_MCU_WIDTH = (8, 16, 16, 8, 8, 32, 8)


class _Region(ctypes.Structure):
  _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


def _load() -> ctypes.CDLL | None:
  try:
    import turbojpeg  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  lib = ctypes.CDLL(turbojpeg.__file__)
  try:
    lib.tj3Init.restype = ctypes.c_void_p
  except AttributeError:  # A TurboJPEG older than 3: no region decode.
    return None
  lib.tj3Init.argtypes = [ctypes.c_int]
  lib.tj3Destroy.argtypes = [ctypes.c_void_p]
  lib.tj3DecompressHeader.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
  lib.tj3Get.argtypes = [ctypes.c_void_p, ctypes.c_int]
  lib.tj3SetCroppingRegion.argtypes = [ctypes.c_void_p, _Region]
  lib.tj3Decompress8.argtypes = [
      ctypes.c_void_p,
      ctypes.c_char_p,
      ctypes.c_size_t,
      ctypes.c_void_p,
      ctypes.c_int,
      ctypes.c_int,
  ]
  return lib


_LIB = _load()


class _Decompressor:
  """One TurboJPEG handle, destroyed with its thread's local storage."""

  def __init__(self):
    self.handle = _LIB.tj3Init(_TJINIT_DECOMPRESS)
    if not self.handle:
      raise MemoryError("tj3Init failed")
    self._destroy = _LIB.tj3Destroy  # Module globals may be gone at exit.

  def __del__(self):
    self._destroy(self.handle)


_local = threading.local()


def decode_rgb(data: bytes, window: tuple[int, int, int, int]) -> np.ndarray | None:
  """The pixels of window (top, left, height, width) of a YCbCr or gray JPEG,
  uint8 (height, width, 3) as a view; None where the library is
  missing or libjpeg-turbo reports anything, a warning included (the caller
  then decodes the whole image by its own rule)."""
  if _LIB is None:
    return None
  if not isinstance(data, bytes):  # ctypes passes bytes without a copy, and only bytes.
    data = bytes(data)
  decompressor = getattr(_local, "decompressor", None)
  if decompressor is None:
    decompressor = _local.decompressor = _Decompressor()
  handle = decompressor.handle
  if _LIB.tj3DecompressHeader(handle, data, len(data)) != 0:
    return None
  subsampling = _LIB.tj3Get(handle, _TJPARAM_SUBSAMP)
  if not 0 <= subsampling < len(_MCU_WIDTH):
    return None
  top, left, height, width = window
  mcu = _MCU_WIDTH[subsampling]
  x0 = max(left - 1, 0) // mcu * mcu
  x1 = min(left + width + 1, _LIB.tj3Get(handle, _TJPARAM_JPEGWIDTH))
  region = _Region(x0, top, x1 - x0, height)
  if _LIB.tj3SetCroppingRegion(handle, region) != 0:
    return None
  out = np.empty((height, x1 - x0, 3), np.uint8)
  if _LIB.tj3Decompress8(handle, data, len(data), out.ctypes.data, out.strides[0], _TJPF_RGB):
    return None
  return out[:, left - x0 : left - x0 + width]
