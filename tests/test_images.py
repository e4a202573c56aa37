"""mnv2_flax.images: every format Pillow writes as cameras and datasets ship
them, one conversion rule, evaluation and predict giving identical pixels,
the training crop, and DecodeError for every kind of broken file."""

import io

import cv2
import numpy as np
import pytest
import simplejpeg
from PIL import Image

from mnv2_flax import export, images, jpeg_region, predict

HEIGHT, WIDTH = 24, 40


def _smooth_rgb() -> np.ndarray:
  """A colour gradient: JPEG keeps it within a few levels."""
  y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
  return np.stack([x * 6, y * 10, 240 - x * 3 - y * 2], axis=-1).astype(np.uint8)


RGB = _smooth_rgb()
GRAY_RGB = np.repeat(np.asarray(Image.fromarray(RGB).convert("L"))[:, :, None], 3, axis=2)
# Alpha 0 over half the image: the colour stored under it must survive.
ALPHA = np.where(np.arange(WIDTH) < WIDTH // 2, 0, 255).astype(np.uint8)[None].repeat(HEIGHT, 0)
# A dark 16-bit image: values up to 3836 of 65535, i.e. 0..14 in 8 bits.
GRAY16 = (np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) * 4).astype(np.uint16)
# 16-bit colour: every value's high byte is RGB's, its low byte arbitrary.
RGB16 = RGB.astype(np.uint16) * 256 + np.arange(RGB.size, dtype=np.uint16).reshape(RGB.shape) % 256


def _exif_rotated() -> Image.Exif:
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: stored rotated, "display rotated 90 degrees".
  return exif


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """One file per format and mode, each written by Pillow's own save call;
  returns {name: (path, expected RGB pixels or None for lossy formats)}."""
  directory = tmp_path_factory.mktemp("formats")
  rgb = Image.fromarray(RGB)
  rgba = Image.fromarray(np.dstack([RGB, ALPHA]))
  gray = rgb.convert("L")
  palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
  gray16_rgb = np.repeat((GRAY16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
  second_frame = Image.fromarray(255 - RGB).convert("P", palette=Image.Palette.ADAPTIVE)
  files = {
      "baseline.jpg": (rgb, {"quality": 95}, None),
      "progressive.jpg": (rgb, {"quality": 95, "progressive": True}, None),
      "gray.jpg": (gray, {"quality": 95}, None),
      "cmyk.jpg": (rgb.convert("CMYK"), {"quality": 95}, None),
      "exif_rotated.jpg": (rgb, {"quality": 95, "exif": _exif_rotated()}, None),
      "rgb.png": (rgb, {}, RGB),
      "gray16.png": (Image.fromarray(GRAY16), {}, gray16_rgb),
      "palette.png": (palette, {}, np.asarray(palette.convert("RGB"))),
      "la.png": (Image.fromarray(np.dstack([np.asarray(gray), ALPHA])), {}, GRAY_RGB),
      "rgba.png": (rgba, {}, RGB),
      "rgb.tif": (rgb, {"compression": "tiff_lzw"}, RGB),
      "gray16.tif": (Image.fromarray(GRAY16), {}, gray16_rgb),
      "rgb.bmp": (rgb, {}, RGB),
      "lossless.webp": (rgb, {"lossless": True}, RGB),
      "lossy.webp": (rgb, {"quality": 95}, None),
      "rgba.webp": (rgba, {"lossless": True, "exact": True}, RGB),  # Keep hidden colour.
      "animated.gif": (
          palette,
          {"save_all": True, "append_images": [second_frame], "duration": 100},
          np.asarray(palette.convert("RGB")),
      ),
  }
  out = {}
  for name, (image, kwargs, expected) in files.items():
    path = directory / name
    image.save(path, **kwargs)
    out[name] = (str(path), expected)
  # Pillow writes no 16-bit colour: OpenCV does (BGR channel order).
  for name, pixels, expected in (
      ("rgb16.png", RGB16, RGB),
      ("rgb16.tif", RGB16, RGB),
      ("opencv.jpg", RGB, None),
  ):
    path = directory / name
    assert cv2.imwrite(str(path), pixels[:, :, ::-1])
    out[name] = (str(path), expected)
  return out


def _read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def test_every_format_decodes_by_the_rule(folder):
  for name, (path, expected) in folder.items():
    pixels = images.decode(_read(path), 3)
    assert pixels.shape == (HEIGHT, WIDTH, 3) and pixels.dtype == np.uint8, name
    if expected is not None:  # Lossless: exactly the stored pixels, alpha dropped.
      np.testing.assert_array_equal(pixels, expected, err_msg=name)
    else:  # JPEG and lossy WebP: close to what was saved (grayscale: its luma).
      source = GRAY_RGB if name.startswith("gray") else RGB
      error = np.abs(pixels.astype(int) - source).mean()
      assert error < 4, (name, error)


@pytest.mark.parametrize(
    "options",
    [
        {"subsampling": "4:4:4"},
        {"subsampling": "4:2:2"},
        {"subsampling": "4:2:0"},
        {"subsampling": "4:2:0", "progressive": True},
        {"subsampling": "4:2:0", "restart_marker_rows": 1},
    ],
)
def test_jpeg_fast_path_gives_pillows_pixels(options):
  # Odd sizes: the chroma upsampling's edges.
  pixels = np.random.default_rng(0).integers(0, 256, (23, 37, 3), dtype=np.uint8)
  pixels = cv2.GaussianBlur(pixels, (5, 5), 0)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, **options)
  data = buffer.getvalue()
  simplejpeg.decode_jpeg(data, strict=True)  # The fast path takes it.
  with Image.open(io.BytesIO(data)) as image:
    expected = np.asarray(image.convert("RGB"))
  np.testing.assert_array_equal(images.decode(data, 3), expected)


def test_other_jpegs_give_pillows_pixels(folder):
  # CMYK: libjpeg-turbo converts to RGB differently; Pillow's conversion is the rule.
  cmyk = _read(folder["cmyk.jpg"][0])
  # Bytes before the end marker, a recoverable error common in real datasets.
  extra = _read(folder["baseline.jpg"][0])
  extra = extra[:-2] + b"\0\0" + extra[-2:]
  for data in (cmyk, extra):
    with Image.open(io.BytesIO(data)) as image:
      expected = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(images.decode(data, 3), expected)


def test_one_channel_is_pillows_luma(folder):
  path, _ = folder["rgb.png"]
  expected = np.asarray(Image.fromarray(RGB).convert("L"))[:, :, None]
  np.testing.assert_array_equal(images.decode(_read(path), 1), expected)
  gray16 = images.decode(_read(folder["gray16.png"][0]), 1)
  np.testing.assert_array_equal(gray16[:, :, 0], GRAY16 >> 8)


def test_dark_16_bit_png_stays_dark(folder):
  # Pillow's own 16-bit to RGB conversion clips: this image would be white.
  path, _ = folder["gray16.png"]
  with Image.open(path) as image:
    assert np.mean(np.asarray(image.convert("RGB")) == 255) > 0.9
  pixels = images.decode(_read(path), 3)
  assert pixels.max() == int(GRAY16.max()) >> 8 == 14


def test_alpha_is_dropped_not_composited(folder):
  pixels = images.decode(_read(folder["rgba.png"][0]), 3)
  # Fully transparent left half: the stored colour, not white or black.
  np.testing.assert_array_equal(pixels[:, : WIDTH // 2], RGB[:, : WIDTH // 2])


def test_exif_orientation_is_not_applied(folder):
  path, _ = folder["exif_rotated.jpg"]
  with Image.open(path) as image:
    assert image.getexif()[0x0112] == 6
  plain = images.decode(_read(folder["baseline.jpg"][0]), 3)
  np.testing.assert_array_equal(images.decode(_read(path), 3), plain)


def test_gif_gives_its_first_frame(folder):
  path, expected = folder["animated.gif"]
  with Image.open(path) as image:
    assert image.n_frames == 2
  np.testing.assert_array_equal(images.decode(_read(path), 3), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_predict_loads_exactly_what_evaluation_makes(folder, channels):
  spec = export.InputSpec(16, channels, (0.5,) * channels, (0.25,) * channels, 0.875, "x", ("a",))
  for name, (path, _) in folder.items():
    expected = images.eval_image(_read(path), image_size=16, crop_fraction=0.875, channels=channels)
    got = predict.load_image(path, spec)
    assert got.shape == (16, 16, channels) and got.dtype == np.uint8, name
    np.testing.assert_array_equal(got, expected, err_msg=name)


def test_eval_crop_and_stretch():
  pixels = np.zeros((8, 16, 3), np.uint8)
  pixels[2:6, 6:10] = 200  # The centre square of half the shorter side.
  data = _png(pixels)
  crop = images.eval_image(data, image_size=4, crop_fraction=0.5, channels=3)
  np.testing.assert_array_equal(crop, 200)
  stretch = images.eval_image(data, image_size=4, crop_fraction=0.5, channels=3, resize="stretch")
  np.testing.assert_array_equal(stretch, images.resize_bilinear(pixels, 4, 4))
  with pytest.raises(ValueError, match="resize"):
    images.eval_image(data, image_size=4, crop_fraction=0.5, channels=3, resize="pad")


def _encoded(pixels: np.ndarray, fmt: str, **params) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt, **params)
  return buffer.getvalue()


def _png(pixels: np.ndarray) -> bytes:
  return _encoded(pixels, "PNG")


def _jpeg(pixels: np.ndarray, **params) -> bytes:
  return _encoded(pixels, "JPEG", **params)


def test_resize_is_half_pixel_bilinear():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
  # Halving samples the centre of each 2x2 block: their mean, halves rounded up.
  blocks = pixels.reshape(4, 2, 6, 2, 3).astype(np.float64).mean(axis=(1, 3))
  np.testing.assert_array_equal(images.resize_bilinear(pixels, 4, 6), np.floor(blocks + 0.5))
  np.testing.assert_array_equal(images.resize_bilinear(pixels, 8, 12), pixels)
  gray = images.resize_bilinear(pixels[:, :, :1], 4, 6)
  np.testing.assert_array_equal(gray, np.floor(blocks[:, :, :1] + 0.5))


@pytest.mark.slow  # Importing TensorFlow.
def test_resize_matches_tensorflow():
  tf = pytest.importorskip("tensorflow")
  pixels = np.random.default_rng(0).integers(0, 256, (13, 9, 3), dtype=np.uint8)
  for size in (4, 16):  # Down and up.
    expected = tf.image.resize(pixels, (size, size), method="bilinear").numpy()
    got = images.resize_bilinear(pixels, size, size).astype(np.float32)
    np.testing.assert_allclose(got, expected, atol=0.51)  # Rounded to integers.


def test_train_image_is_a_pure_function_of_the_rng_state(folder):
  data = _read(folder["baseline.jpg"][0])
  kwargs = dict(image_size=16, area_min=0.08, channels=3)
  outputs = [images.train_image(data, np.random.default_rng(seed), **kwargs) for seed in range(8)]
  again = [images.train_image(data, np.random.default_rng(seed), **kwargs) for seed in range(8)]
  for a, b in zip(outputs, again):
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
  assert len({o.tobytes() for o in outputs}) == len(outputs)


@pytest.mark.parametrize(
    "encode",
    [
        *[dict(subsampling=s) for s in ("4:4:4", "4:2:2", "4:2:0")],
        dict(subsampling="4:2:0", progressive=True),
        dict(subsampling="4:2:0", restart_marker_rows=1),
        *[dict(cv2_sampling=s) for s in ("411", "440")],
        dict(gray=True),
    ],
)
def test_training_crop_decode_gives_the_whole_decodes_pixels(encode):
  # The region decode (jpeg_region) against the crop of the whole image's
  # decode, at crop edges on and off the MCU grid; odd sizes, a texture
  # whose chroma changes from pixel to pixel (upsampling's edges show).
  rng = np.random.default_rng(0)
  pixels = cv2.GaussianBlur(rng.integers(0, 256, (45, 77, 3), dtype=np.uint8), (3, 3), 0)
  encode = dict(encode)
  if encode.pop("gray", False):
    data = _jpeg(pixels[:, :, 0])
  elif "cv2_sampling" in encode:
    sampling = getattr(cv2, f"IMWRITE_JPEG_SAMPLING_FACTOR_{encode['cv2_sampling']}")
    params = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling]
    data = cv2.imencode(".jpg", pixels, params)[1].tobytes()
  else:
    data = _jpeg(pixels, quality=90, **encode)
  whole = images.decode(data, 3)
  windows = [(0, 0, 45, 77), (3, 16, 20, 32), (1, 15, 44, 62), (44, 76, 1, 1), (7, 33, 9, 5)]
  for top, left, height, width in windows:
    crop = jpeg_region.decode_rgb(data, (top, left, height, width))
    np.testing.assert_array_equal(crop, whole[top : top + height, left : left + width])


def test_train_image_writes_into_out(folder):
  data = _read(folder["baseline.jpg"][0])
  for channels in (1, 3):
    batch = np.zeros((3, 16, 16, channels), np.uint8)
    for seed in range(4):  # Flipped and not.
      expected = images.train_image(
          data, np.random.default_rng(seed), image_size=16, area_min=0.08, channels=channels
      )
      out = batch[1]
      got = images.train_image(
          data,
          np.random.default_rng(seed),
          image_size=16,
          area_min=0.08,
          channels=channels,
          out=out,
      )
      assert got is out
      np.testing.assert_array_equal(batch[1], expected)
      assert not batch[0].any() and not batch[2].any()


def test_train_image_whole_image_fallback_and_flip():
  # A square image with area_min=1 admits only aspect 1: almost every attempt
  # fails, so the crop is the whole image, mirrored or not.
  pixels = np.random.default_rng(1).integers(0, 256, (12, 12, 3), dtype=np.uint8)
  data = _png(pixels)
  whole = images.resize_bilinear(pixels, 6, 6)
  seen = set()
  for seed in range(16):
    out = images.train_image(
        data, np.random.default_rng(seed), image_size=6, area_min=1.0, channels=3
    )
    if np.array_equal(out, whole):
      seen.add("plain")
    else:
      np.testing.assert_array_equal(out, whole[:, ::-1])
      seen.add("flipped")
  assert seen == {"plain", "flipped"}


def test_random_window_follows_the_inception_distribution():
  rng = np.random.default_rng(0)
  height, width, area_min = 375, 500, 0.08
  windows = np.array([images.random_window(height, width, rng, area_min) for _ in range(2000)])
  top, left, h, w = windows.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  cropped = (h < height) | (w < width)
  area = h * w / (height * width)
  aspect = w / h
  # Rounding h and w to pixels moves area and aspect a little past the ranges.
  assert (area[cropped] > area_min * 0.97).all()
  assert (aspect[cropped] > 0.74).all() and (aspect[cropped] < 1.35).all()
  # Uniform in [0.08, 1], less the large crops whose side would not fit.
  assert 0.42 < area.mean() < 0.47


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"just some text, named .jpg", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "not an image"),
    ],
)
def test_unreadable_bytes_raise_decode_error(data, reason):
  with pytest.raises(images.DecodeError, match=reason):
    images.decode(data, 3)


@pytest.mark.parametrize("name", ["baseline.jpg", "progressive.jpg", "rgb.png", "rgb.tif"])
def test_truncated_files_raise_decode_error(folder, name):
  data = _read(folder[name][0])
  for fn in (
      lambda d: images.decode(d, 3),
      lambda d: images.eval_image(d, image_size=8, crop_fraction=1.0, channels=3),
      lambda d: images.train_image(
          d, np.random.default_rng(0), image_size=8, area_min=0.08, channels=3
      ),
  ):
    with pytest.raises(images.DecodeError):
      fn(data[: len(data) // 2])


def test_floating_point_images_are_refused(tmp_path):
  Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "f.tif")
  with pytest.raises(images.DecodeError, match="floating-point"):
    images.decode(_read(tmp_path / "f.tif"), 3)
