"""Real images in, MNIST's 28x28 frame out: decoding with bounds, and MNIST's own preprocessing.

MNIST digits are white ink on black, scaled so the ink's bounding box fits 20x20 (aspect kept, anti-aliased),
then placed in a 28x28 frame with the ink's centre of mass at the centre. A model trained on them reads other
images well only after the same steps, so every image from a file, an upload or the drawing page goes through
``to_mnist_frame``. Images that are already 28x28 are taken to be in that frame and only get grayscale and
polarity fixed, so MNIST's own digits (and the pixels the page shows back) pass through unchanged.
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np

from digits_ray.errors import DigitsError
from digits_ray.schema import IMAGE_SIZE

FIT_BOX = 20  # MNIST scales the ink's bounding box to fit this square
INK_THRESHOLD = 0.2  # a pixel is ink when brighter than this share of the brightest ink
DEFAULT_MAX_PIXELS = 4096 * 4096  # declared width x height above this is refused before decoding
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # Pillow decoders we open (PPM: also PGM/PBM)
FORMAT_NAMES = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WebP", "PGM/PPM")


class ImageError(DigitsError):
    """An input that is not a usable digit image; the message says what was wrong and what is accepted."""


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS


def declared_pixels(data: bytes) -> int:
    """Width x height from the image header alone (nothing decoded); 0 when it is not an image."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data), formats=FORMATS).size
        return width * height
    except Exception:  # noqa: BLE001  (anything unreadable is refused later, by decode_gray, with its reason)
        return 0


def decode_gray(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """An image file -> float32 grayscale in [0, 255], upright (EXIF), transparency composited on white.

    The declared size is checked from the header before any pixel is decoded, so a small file that
    claims enormous dimensions (a decompression bomb) costs nothing. Pillow's decoders raise many
    kinds of exceptions on corrupt data (OSError, SyntaxError, ValueError, IndexError, struct.error,
    ...): all of them mean "this is not a usable image", so all become an ImageError here.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError("empty image: send the bytes of a PNG, JPEG or other image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageError(f"image declares {width}x{height} pixels; at most {limits.max_pixels:,} "
                                 f"pixels are accepted")
            image.load()  # the first frame of an animation or a multi-page file
            ImageOps.exif_transpose(image, in_place=True)
            gray = _to_gray(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not an image: send a {', '.join(FORMAT_NAMES)} file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"image too large to decode safely ({err}); at most {limits.max_pixels:,} pixels") from None
    except Exception as err:  # noqa: BLE001  (see the docstring)
        raise ImageError(f"the image could not be decoded ({type(err).__name__}: {err}); send a complete, "
                         f"valid image file") from None
    return gray


def _to_gray(image) -> np.ndarray:
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit: scale the range, do not clip it
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        return (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    if image.mode in ("P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.float32)


def _background(gray: np.ndarray) -> float:
    """The median of the border pixels: above mid-gray means dark ink on paper or a canvas."""
    return float(np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])))


def _ink(gray: np.ndarray) -> np.ndarray:
    """Ink brightness >= 0 on a 0 background: dark-on-light images are inverted, the background removed."""
    background = _background(gray)
    ink = background - gray if background > 127.5 else gray - background
    return np.clip(ink, 0, None)


def to_mnist_frame(gray: np.ndarray) -> np.ndarray:
    """Grayscale float image (any size) -> uint8 (28, 28), MNIST-style; see the module docstring."""
    if gray.ndim != 2 or gray.size == 0:
        raise ImageError(f"expected a 2-D grayscale image, got shape {gray.shape}")
    if gray.shape == (IMAGE_SIZE, IMAGE_SIZE):
        framed = 255.0 - gray if _background(gray) > 127.5 else gray
        return np.clip(np.rint(framed), 0, 255).astype(np.uint8)
    ink = _ink(gray)
    peak = float(ink.max())
    if peak < 8:  # nothing but background (a blank canvas, an empty page)
        raise ImageError("no digit found: the image is blank (one uniform color); draw or photograph a digit")
    inked = ink > INK_THRESHOLD * peak
    rows, cols = np.flatnonzero(inked.any(axis=1)), np.flatnonzero(inked.any(axis=0))
    crop = ink[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1] * (255.0 / peak)
    return _centre(_fit(crop))


def _fit(crop: np.ndarray) -> np.ndarray:
    """Scale so the longer side is FIT_BOX pixels, keeping the aspect ratio (anti-aliased)."""
    from PIL import Image

    height, width = crop.shape
    scale = FIT_BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(crop.astype(np.float32), mode="F").resize(size, Image.Resampling.LANCZOS))


def _centre(box: np.ndarray) -> np.ndarray:
    """Place ``box`` in a 28x28 frame with its centre of mass at the centre (kept inside the frame)."""
    box = np.clip(box, 0, 255)
    height, width = box.shape
    total = float(box.sum())
    ys, xs = np.indices(box.shape)
    com_y = float((ys * box).sum() / total) if total else (height - 1) / 2
    com_x = float((xs * box).sum() / total) if total else (width - 1) / 2
    centre = IMAGE_SIZE / 2  # where MNIST's digits have theirs: (14.0, 14.0) on average over the test set
    top = min(max(math.floor(centre - com_y + 0.5), 0), IMAGE_SIZE - height)
    left = min(max(math.floor(centre - com_x + 0.5), 0), IMAGE_SIZE - width)
    frame = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    frame[top: top + height, left: left + width] = box
    return np.rint(frame).astype(np.uint8)


def image_to_mnist(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Encoded image bytes -> the uint8 (28, 28) a model reads."""
    return to_mnist_frame(decode_gray(data, limits))


def pixels_to_mnist(pixels: object) -> np.ndarray:
    """A 28x28 nested list of numbers in [0, 255] (JSON) -> uint8 (28, 28), without any resampling."""
    wanted = f"pixels must be a {IMAGE_SIZE}x{IMAGE_SIZE} array of numbers in [0, 255]"
    try:
        array = np.asarray(pixels)
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise ImageError(wanted) from None
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ImageError(f"{wanted}; got shape {list(array.shape)}")
    if array.dtype.kind not in "iuf":  # not booleans, strings, objects (ragged rows, huge integers)
        raise ImageError(f"{wanted}; got {'booleans' if array.dtype.kind == 'b' else 'non-numbers'}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ImageError("pixels must be finite numbers in [0, 255]; got NaN or infinity")
    if array.min() < 0 or array.max() > 255:
        raise ImageError(f"pixels must be in [0, 255]; got values from {array.min():g} to {array.max():g}")
    return to_mnist_frame(array.astype(np.float32))


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 grayscale (H, W) or RGB (H, W, 3) -> PNG."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(out, format="PNG")
    return out.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def saliency_overlay(image: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """The digit in gray with the saliency (0..1) in red on top: uint8 (28, 28, 3)."""
    gray = image.astype(np.float32) * 0.5
    heat = np.clip(saliency, 0, 1) * 255
    rgb = np.stack([np.maximum(gray, heat), gray * (1 - saliency * 0.5), gray * (1 - saliency * 0.5)], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
