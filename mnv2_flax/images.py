"""Image files to model inputs: the one place where a file's bytes become pixels.

Training, evaluation, `predict` and the int8 export's calibration all decode
here (no TensorFlow), so a file gives the model the same uint8 pixels on every
path.

Formats: every format Pillow opens, among them JPEG (grayscale, YCbCr, CMYK,
progressive), PNG (1, 2, 4, 8 and 16 bit; gray, RGB, palette, with alpha),
TIFF, BMP, WebP, GIF. A file of several frames (animated GIF, WebP or PNG,
multi-page TIFF) gives its first frame. Pixels are Pillow's, converted by the
rule below. Gray and YCbCr JPEGs, most image files, are decoded by
libjpeg-turbo through simplejpeg, which gives Pillow's pixels bit for bit (the
same library, accurate integer DCT, fancy upsampling) 1.6x faster; CMYK and
YCCK JPEGs, and those simplejpeg refuses (a recoverable error in the data), go
to Pillow. A training crop of a gray or YCbCr JPEG is decoded alone, by the
libjpeg-turbo that the `turbojpeg` wheel carries (`jpeg_region`: TurboJPEG 3's
region decode, 0.66 against 0.81 ms for a 500x375 image on one core): the
same pixels as the crop of the whole image's decode, so training, evaluation
and `predict` still see one decode (a file it reports anything about, a
warning included, is decoded whole as above).

Conversion, one rule for every format:
* 16-bit samples (16-bit PNG and TIFF, gray or colour) become 8-bit by their
  high byte, v // 256, which is what Pillow itself does for 16-bit colour; 32-bit
  integer images are clipped to 0..65535 first. Floating-point images (mode F)
  have no defined range and are refused.
* Alpha is dropped, not composited: the colour stored under a transparent pixel
  is kept (as TensorFlow's decode_image and Keras' loaders do).
* Palette images take their palette's colours; bilevel images are 0 or 255.
* 3 channels: grayscale is repeated, CMYK and the other colour modes go through
  Pillow's conversion to RGB. 1 channel: Pillow's luma of those RGB pixels
  (ITU-R 601-2, L = 0.299 R + 0.587 G + 0.114 B in integer arithmetic; a gray
  image keeps its values).
* EXIF orientation is not applied and ICC profiles are ignored: pixels as
  stored, as TensorFlow, Keras and torchvision read them (the published weights
  were trained so). A phone photo taken upright but stored on its side is seen
  on its side.

Geometry:
* `eval_image` with resize="crop": the centre square of crop_fraction of the
  shorter side; with resize="stretch": the whole image (aspect ratio not kept).
* `train_image`: Inception's random-resized crop, then a random horizontal flip.
* Both resize with OpenCV's bit-exact bilinear interpolation
  (INTER_LINEAR_EXACT: half-pixel centres, no antialiasing, as
  `tf.image.resize(..., "bilinear")`; within 1 of the exact value, rounded).

Every failure to read the bytes as an image (empty, truncated, not an image,
unsupported mode, too large) raises DecodeError with a short reason. Each call
runs on the calling thread; a loader parallelises over images.
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from mnv2_flax import jpeg_region

# One thread per call: a loader parallelises over images (workers), and
# OpenCV's own threads would oversubscribe the cores.
cv2.setNumThreads(1)

RESIZE_MODES = ("crop", "stretch")
_JPEG_START = b"\xff\xd8\xff"
# Pillow refuses more pixels than this (DecompressionBombError); so does the JPEG fast path.
_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
# Inception's random-resized crop (today's ImageNet training).
_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10


class DecodeError(ValueError):
  """The bytes are not a readable image (empty, truncated, not an image, ...)."""


def _open(data: bytes) -> Image.Image:
  """The image's first frame, opened but not yet decoded."""
  if not data:
    raise DecodeError("empty file")
  try:
    return Image.open(io.BytesIO(data))
  except UnidentifiedImageError as e:
    raise DecodeError(f"not an image in a format Pillow reads (starts with {data[:8]!r})") from e
  except Exception as e:  # Pillow raises many types (SyntaxError, struct.error, ...).
    raise DecodeError(_reason(e)) from e


def _reason(error: Exception) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def _pillow_rgb(image: Image.Image) -> np.ndarray:
  """Decodes an opened image into uint8 (H, W, 3) by the module's rule."""
  try:
    image.load()
    mode = image.mode
    if mode == "F":
      raise DecodeError("32-bit floating-point pixels (mode F) have no defined 0-255 range")
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N (16-bit) and I (32-bit integer).
      gray = (np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8)
      return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))
  except DecodeError:
    raise
  except Exception as e:  # Truncated data, unsupported conversions, decompression bombs.
    raise DecodeError(_reason(e)) from e


def _libjpeg_size(data: bytes) -> tuple[int, int] | None:
  """(height, width) of a JPEG that libjpeg-turbo decodes here; None for
  other files."""
  if data[:3] != _JPEG_START:
    return None
  try:
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
  except ValueError:
    return None  # Broken data: Pillow decides.
  # CMYK and YCCK: Pillow's conversion to RGB is the rule (libjpeg-turbo's
  # differs). Larger images: Pillow's DecompressionBombError.
  if colorspace in ("YCbCr", "Gray") and height * width <= _MAX_PIXELS:
    return height, width
  return None


def _decode_rgb(data: bytes) -> np.ndarray:
  if _libjpeg_size(data) is not None:
    try:
      # Accurate DCT and fancy upsampling are the defaults, as in Pillow.
      return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:
      pass  # A recoverable error in the data: Pillow decides.
  with _open(data) as image:
    return _pillow_rgb(image)


def _to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
  if channels == 3:
    return rgb
  return np.asarray(Image.fromarray(rgb).convert("L"))[:, :, None]


def decode(data: bytes, channels: int) -> np.ndarray:
  """An image file's bytes as uint8 (H, W, channels), channels 1 or 3."""
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  return _to_channels(_decode_rgb(data), channels)


def resize_bilinear(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (height, width, C): bilinear, half-pixel centres,
  no antialiasing, bit-exact on every CPU (OpenCV's INTER_LINEAR_EXACT)."""
  out = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR_EXACT)
  return out.reshape(height, width, pixels.shape[2])


def _crop_resize(
    pixels: np.ndarray, window: tuple[int, int, int, int], image_size: int
) -> np.ndarray:
  top, left, height, width = window
  return resize_bilinear(pixels[top : top + height, left : left + width], image_size, image_size)


def center_window(height: int, width: int, crop_fraction: float) -> tuple[int, int, int, int]:
  """(top, left, side, side): the centre square of crop_fraction of the shorter side."""
  side = max(int(crop_fraction * min(height, width)), 1)
  return (height - side) // 2, (width - side) // 2, side, side


def random_window(
    height: int, width: int, rng: np.random.Generator, area_min: float
) -> tuple[int, int, int, int]:
  """(top, left, h, w) of Inception's random-resized crop: area uniform in
  [area_min, 1] of the image, aspect ratio w/h uniform in [3/4, 4/3]; the whole
  image if none of 10 attempts fits."""
  for _ in range(_CROP_ATTEMPTS):
    area = rng.uniform(area_min, 1.0) * height * width
    aspect = rng.uniform(*_ASPECT_RATIO_RANGE)
    h = round(math.sqrt(area / aspect))
    w = round(math.sqrt(area * aspect))
    if 0 < h <= height and 0 < w <= width:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  return 0, 0, height, width


def eval_image(
    data: bytes, *, image_size: int, crop_fraction: float, channels: int, resize: str = "crop"
) -> np.ndarray:
  """Evaluation input: uint8 (image_size, image_size, channels).

  resize="crop": the centre square of crop_fraction of the shorter side,
  resized; resize="stretch": the whole image resized, aspect ratio not kept.
  """
  if resize not in RESIZE_MODES:
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
  pixels = decode(data, channels)
  height, width = pixels.shape[:2]
  if resize == "stretch":
    window = (0, 0, height, width)
  else:
    window = center_window(height, width, crop_fraction)
  return _crop_resize(pixels, window, image_size)


def train_image(
    data: bytes,
    rng: np.random.Generator,
    *,
    image_size: int,
    area_min: float,
    channels: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
  """Training input: uint8 (image_size, image_size, channels), written into
  `out` (C-contiguous, that shape) when given, and returned.

  Inception's random-resized crop (`random_window`), bilinear resize,
  horizontal flip with probability 1/2; a pure function of (data, rng state).
  A JPEG that libjpeg-turbo decodes is decoded only as far as the crop needs
  (`jpeg_region`), with the pixels of the whole image's decode.
  """
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  size = _libjpeg_size(data)
  crop = None
  if size is not None:
    window = random_window(*size, rng, area_min)
    crop = jpeg_region.decode_rgb(data, window)
  if crop is None:
    pixels = _decode_rgb(data)
    if size is None:
      window = random_window(*pixels.shape[:2], rng, area_min)
    top, left, height, width = window
    crop = pixels[top : top + height, left : left + width]
  shape = (image_size, image_size, channels)
  if out is None:
    out = np.empty(shape, np.uint8)
  elif out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
    raise ValueError(f"out must be C-contiguous uint8 {shape}, got {out.dtype} {out.shape}")
  # OpenCV writes into `out` (2-D for one channel); a flip needs a copy.
  target = out.reshape(shape[:2]) if channels == 1 else out
  pixels = _to_channels(crop, channels)
  if rng.random() < 0.5:
    resized = resize_bilinear(pixels, image_size, image_size)
    cv2.flip(resized.reshape(target.shape), 1, dst=target)
  else:
    cv2.resize(pixels, shape[1::-1], dst=target, interpolation=cv2.INTER_LINEAR_EXACT)
  return out
