"""Real images into MNIST's frame: MNIST digits pass unchanged, big dark-on-light ones are framed like MNIST,
and every kind of bad input is refused with a reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from digits_ray.data.mnist import load_split
from digits_ray.inference.images import (
    FIT_BOX,
    ImageError,
    ImageLimits,
    decode_gray,
    image_to_mnist,
    pixels_to_mnist,
    png_bytes,
)


def encode(array: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format=fmt)
    return out.getvalue()


def on_paper(digit: np.ndarray, size: int = 300, pad: int = 40) -> np.ndarray:
    """A 28x28 MNIST digit as dark ink on white paper, upscaled and off-centre: what a phone photo gives."""
    big = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    paper = np.full((size + 2 * pad, size + 3 * pad), 240.0)
    paper[pad: pad + size, 2 * pad: 2 * pad + size] -= big * (220 / 255)
    return np.clip(paper, 0, 255).astype(np.uint8)


def test_mnist_digits_pass_through_unchanged(small_mnist):
    test = load_split("test", small_mnist)
    for image in test.images[:200]:
        assert np.array_equal(image_to_mnist(png_bytes(image)), image)


def test_a_big_dark_on_light_digit_is_framed_like_mnist(small_mnist):
    test = load_split("test", small_mnist)
    correlations = []
    for image in test.images[:100]:
        framed = image_to_mnist(encode(on_paper(image)))
        ink = np.argwhere(framed > 0.2 * framed.max())
        height, width = ink.max(axis=0) - ink.min(axis=0) + 1
        assert max(height, width) <= FIT_BOX + 1  # the bounding box fits 20x20 (the blur may add a pixel)
        assert max(height, width) >= FIT_BOX - 1  # and fills it along its longer side
        ys, xs = np.indices(framed.shape)
        mass = framed.astype(np.float64)
        com = ((ys * mass).sum() / mass.sum(), (xs * mass).sum() / mass.sum())
        assert abs(com[0] - 14) <= 0.6 and abs(com[1] - 14) <= 0.6  # where MNIST's own digits have it
        correlations.append(np.corrcoef(framed.ravel(), image.ravel())[0, 1])
    # The same strokes as the original, white on black (a thin "1" a pixel off correlates less).
    assert np.median(correlations) > 0.75 and np.percentile(correlations, 5) > 0.4


def test_transparency_is_composited_on_white(small_mnist):
    digit = load_split("test", small_mnist).images[0]
    big = np.asarray(Image.fromarray(digit).resize((140, 140)))
    rgba = np.zeros((140, 140, 4), np.uint8)
    rgba[..., 3] = big  # black ink whose opacity is the stroke, on a transparent canvas
    from_alpha = image_to_mnist(encode(rgba, "RGBA"))
    from_gray = image_to_mnist(encode(255 - big))
    assert np.abs(from_alpha.astype(int) - from_gray.astype(int)).max() <= 2


def test_a_jpeg_photo_of_a_digit_is_read(small_mnist):
    digit = load_split("test", small_mnist).images[3]
    framed = image_to_mnist(encode(np.stack([on_paper(digit)] * 3, axis=-1), fmt="JPEG"))
    assert np.corrcoef(framed.ravel(), digit.ravel())[0, 1] > 0.6


def animated_gif(frames: int = 3) -> bytes:
    out = io.BytesIO()
    images = [Image.fromarray(np.full((40, 40), 40 * i, np.uint8)) for i in range(frames)]
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:])
    return out.getvalue()


def multipage_tiff(pages: int = 3) -> bytes:
    out = io.BytesIO()
    images = [Image.fromarray(np.full((30, 30), 60 * i, np.uint8)) for i in range(pages)]
    images[0].save(out, format="TIFF", save_all=True, append_images=images[1:])
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (a decompression bomb's signature)."""
    real = png_bytes(np.zeros((1, 1), np.uint8))
    ihdr = struct.pack(">II", width, height) + real[24:29]
    chunk = b"IHDR" + ihdr
    return real[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + real[33:]


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty image"),
    (b"GIF89a but not really", "not an image"),
    (b"hello world", "not an image"),
    (png_bytes(np.full((100, 100), 255, np.uint8))[:60], "could not be decoded"),
    (png_declaring(100_000, 100_000), "at most 16,777,216 pixels"),
    (png_declaring(5000, 5000), "5000x5000 pixels; at most"),
    (png_bytes(np.full((100, 100), 200, np.uint8)), "blank"),
    (encode(np.zeros((50, 50, 3), np.uint8), fmt="JPEG2000") if "JPEG2000" in Image.SAVE else b"\0\0\0\x0cjP  ",
     "not an image"),  # a format Pillow reads, but not one we open
])
def test_bad_images_are_refused_with_the_reason(data, message):
    with pytest.raises(ImageError, match=message):
        image_to_mnist(data)


def test_cut_animations_and_multipage_files_give_an_image_error_or_their_first_frame():
    for data in (animated_gif(), multipage_tiff()):
        for cut in range(20, len(data), 7):
            try:
                assert image_to_mnist(data[:cut]).shape == (28, 28)
            except ImageError:
                pass  # anything else (IndexError, struct.error, TypeError, ... from a decoder) fails the test


def test_sixteen_bit_images_are_scaled_not_clipped(small_mnist):
    digit = load_split("test", small_mnist).images[2]
    big = np.asarray(Image.fromarray(digit).resize((120, 120)), dtype=np.float64)
    paper = (50000 - big * (45000 / 255)).astype(np.uint16)  # dark ink on bright 16-bit paper
    framed = image_to_mnist(encode(paper))
    assert np.corrcoef(framed.ravel(), digit.ravel())[0, 1] > 0.5


def test_exif_orientation_is_applied(small_mnist):
    digit = load_split("test", small_mnist).images[4]
    paper = on_paper(digit, size=120, pad=20)
    sideways = np.ascontiguousarray(np.rot90(paper, k=1))  # stored turned left, as a phone may store it
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(sideways).save(out, format="JPEG", exif=exif)
    upright = image_to_mnist(out.getvalue())
    assert np.corrcoef(upright.ravel(), digit.ravel())[0, 1] > 0.6


def test_png_transparency_chunks_are_composited(small_mnist):
    digit = load_split("test", small_mnist).images[6]
    ink = np.asarray(Image.fromarray(digit).resize((112, 112))) > 80
    image = Image.fromarray(np.where(ink, 0, 50).astype(np.uint8))  # dark gray background, black ink
    out = io.BytesIO()
    image.save(out, format="PNG", transparency=50)  # ...and the background marked transparent
    framed = image_to_mnist(out.getvalue())
    assert np.corrcoef(framed.ravel(), digit.ravel())[0, 1] > 0.6


def test_the_pixel_limit_is_checked_before_decoding():
    with pytest.raises(ImageError, match="at most 100"):
        decode_gray(png_bytes(np.zeros((20, 20), np.uint8)), ImageLimits(max_pixels=100))
    assert decode_gray(png_bytes(np.zeros((10, 10), np.uint8)), ImageLimits(max_pixels=100)).shape == (10, 10)


@pytest.mark.parametrize(("pixels", "message"), [
    ([[0] * 28] * 27, "shape"),
    ([[0] * 28] * 28 + [[0] * 28], "shape"),
    ([["a"] * 28] * 28, "numbers"),
    ([[float("nan")] * 28] * 28, "NaN"),
    ([[300] * 28] * 28, r"\[0, 255\]"),
    ([[-1] * 28] * 28, r"\[0, 255\]"),
    ("not an array", "28x28"),
    ([[True] * 28] * 28, "booleans"),
    ([["200"] * 28] * 28, "non-numbers"),
    ([[10 ** 400] * 28] * 28, "non-numbers"),
    ([[0] * 28] * 27 + [[0] * 27], "28x28"),
])
def test_bad_pixel_arrays_are_refused(pixels, message):
    with pytest.raises(ImageError, match=message):
        pixels_to_mnist(pixels)


def test_pixel_arrays_in_mnist_form_are_kept(small_mnist):
    image = load_split("test", small_mnist).images[5]
    assert np.array_equal(pixels_to_mnist(image.tolist()), image)
    assert np.array_equal(pixels_to_mnist((255 - image).tolist()), image)  # dark on light: inverted
