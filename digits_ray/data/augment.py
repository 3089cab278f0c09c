"""Random affine (rotation, shift, zoom) and elastic augmentation, vectorized over a whole batch.

Randomness is counter-based: every image's parameters are a hash of (seed, epoch, image index), so
the same seed and epoch give the same images however the data is split into blocks, batches or
workers, and every epoch sees fresh ones.

Every transform keeps the label valid (no flips) and the digit inside the frame: the shift is
clipped per image so the transformed ink bounding box stays at least ``margin`` pixels from the edge.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from digits_ray.config import AugmentConfig
from digits_ray.schema import IMAGE_SIZE

_CENTER = (IMAGE_SIZE - 1) / 2
_GRID_Y, _GRID_X = (g.ravel().astype(np.float32) - _CENTER for g in np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE])
_PAD = IMAGE_SIZE + 2  # images are sampled from a copy with a 1-pixel zero border


# --- Counter-based random numbers -------------------------------------------------------------

_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective scramble of 64-bit integers (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, epoch: int, index: np.ndarray, streams: int) -> np.ndarray:
    """(len(index), streams) floats in [0, 1), a pure function of (seed, epoch, index, stream)."""
    with np.errstate(over="ignore"):  # wrapping 64-bit arithmetic is the point of the hash
        key = _mix(_mix(np.uint64(seed & (2**64 - 1))) ^ np.uint64(epoch))
        counters = index.astype(np.uint64)[:, None] * np.uint64(streams) + np.arange(streams, dtype=np.uint64)
        bits = _mix(key ^ _mix(counters))
    return (bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


# --- The transforms ----------------------------------------------------------------------------


def _ink_extent(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image, the ink bounding box (x0, x1, y0, y1) in centered pixel coordinates."""
    rows, cols = images.any(axis=2), images.any(axis=1)
    empty = ~rows.any(axis=1)
    y0, y1 = rows.argmax(axis=1), IMAGE_SIZE - 1 - rows[:, ::-1].argmax(axis=1)
    x0, x1 = cols.argmax(axis=1), IMAGE_SIZE - 1 - cols[:, ::-1].argmax(axis=1)
    box = [np.where(empty, _CENTER, v).astype(np.float32) - _CENTER for v in (x0, x1, y0, y1)]
    return box[0], box[1], box[2], box[3]


def _safe_shift(lo_edge: np.ndarray, hi_edge: np.ndarray, wanted: np.ndarray, margin: float) -> np.ndarray:
    """Clip ``wanted`` so [lo_edge, hi_edge] + shift stays inside the frame less ``margin``."""
    lo = -_CENTER + margin - lo_edge
    hi = np.maximum(_CENTER - margin - hi_edge, lo)  # equal only when the box exactly fills the room
    return np.clip(wanted, lo, hi)


def _elastic_field(u: np.ndarray, grid: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random displacements: a coarse random grid, bilinearly upsampled to 28x28."""
    n = len(u)
    coarse = (u.reshape(n, 2, grid, grid) * 2 - 1) * alpha
    pos = np.linspace(0, grid - 1, IMAGE_SIZE)
    lo = np.minimum(pos.astype(int), grid - 2)
    frac = (pos - lo).astype(np.float32)
    upsample = np.zeros((IMAGE_SIZE, grid), dtype=np.float32)  # linear interpolation as a matrix
    upsample[np.arange(IMAGE_SIZE), lo] = 1 - frac
    upsample[np.arange(IMAGE_SIZE), lo + 1] = frac
    field = np.einsum("ig,nkgh,jh->nkij", upsample, coarse, upsample, optimize=True)
    return field[:, 0].reshape(n, -1), field[:, 1].reshape(n, -1)


CHUNK_IMAGES = 256  # images warped at a time by numpy: keeps the (chunk, 784) float temporaries in cache
Kernel = Literal["tf", "numpy"]
KERNELS: tuple[str, ...] = get_args(Kernel)


def augment(
    images: np.ndarray,
    index: np.ndarray,
    epoch: int,
    seed: int,
    cfg: AugmentConfig,
    kernel: Kernel | None = None,
) -> np.ndarray:
    """Augment a batch of uint8 (N, 28, 28) images; ``index`` gives each image's dataset position.

    The random parameters are always computed here, in numpy. The resampling runs in TensorFlow's
    compiled ``ImageProjectiveTransformV3`` (the kernel behind Keras' RandomRotation; its speed
    against the numpy sampler is in bench/README.md) unless elastic distortion is on, which needs a
    per-pixel displacement field that only the numpy sampler takes. ``kernel`` forces one of them.
    """
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    elastic = cfg.elastic_alpha > 0
    kernel = kernel or cfg.kernel
    if kernel not in KERNELS or (kernel == "tf" and elastic):
        raise ValueError(
            f"kernel={kernel!r} is not accepted here; accepted: {KERNELS} (only 'numpy' with elastic_alpha > 0)"
        )
    index = np.asarray(index)
    if len(index) != len(images):
        raise ValueError(f"need one index per image: got {len(index)} for {len(images)} images")
    u = uniform(seed, epoch, index, 4 + (2 * cfg.elastic_grid**2 if elastic else 0))
    a, b, tx, ty = _inverse_affine(images, u, cfg)
    if kernel == "tf":
        return _warp_tf(images, a, b, tx, ty)
    out = np.empty_like(images)
    for start in range(0, len(images), CHUNK_IMAGES):
        part = slice(start, start + CHUNK_IMAGES)
        # Inverse map every output pixel to its source: x = R(-angle)(x' - t) / s.
        ox = _GRID_X[None, :] - tx[part, None]
        oy = _GRID_Y[None, :] - ty[part, None]
        src_x = a[part, None] * ox + b[part, None] * oy
        src_y = a[part, None] * oy - b[part, None] * ox
        if elastic:
            dx, dy = _elastic_field(u[part, 4:], cfg.elastic_grid, cfg.elastic_alpha)
            src_x += dx
            src_y += dy
        out[part] = _bilinear(images[part], src_x + (_CENTER + 1), src_y + (_CENTER + 1))
    return out


def _inverse_affine(
    images: np.ndarray, u: np.ndarray, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image (a, b, tx, ty): the source of output pixel x' is [[a, b], [-b, a]] (x' - t)."""
    angle = np.deg2rad((u[:, 0] * 2 - 1) * cfg.rotation_deg)
    scale = 1 + (u[:, 1] * 2 - 1) * cfg.zoom
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale

    # Forward map of the ink box corners (x' = s R x), then shifts that keep it in the frame.
    x0, x1, y0, y1 = _ink_extent(images)
    cx = np.stack([x0, x1, x0, x1], 1)
    cy = np.stack([y0, y0, y1, y1], 1)
    fx = cos[:, None] * cx - sin[:, None] * cy
    fy = sin[:, None] * cx + cos[:, None] * cy
    margin = cfg.margin + cfg.elastic_alpha
    # A digit that would not fit after zoom and rotation is scaled down just enough to fit.
    room = 2 * (_CENTER - margin)
    spread = np.maximum(fx.max(1) - fx.min(1), fy.max(1) - fy.min(1))
    shrink = np.minimum(1.0, room / np.maximum(spread, 1e-6)).astype(np.float32)
    cos, sin, scale = cos * shrink, sin * shrink, scale * shrink
    fx, fy = fx * shrink[:, None], fy * shrink[:, None]
    max_shift = cfg.shift * IMAGE_SIZE
    tx = _safe_shift(fx.min(1), fx.max(1), (u[:, 2] * 2 - 1) * max_shift, margin)
    ty = _safe_shift(fy.min(1), fy.max(1), (u[:, 3] * 2 - 1) * max_shift, margin)
    inv = 1 / scale**2
    return (cos * inv).astype(np.float32), (sin * inv).astype(np.float32), tx, ty


def limit_kernel_threads(threads: int) -> None:
    """Give the TensorFlow kernel ``threads`` threads: call once, in a fresh process, before any warp.

    A Ray Data actor holding a fraction of a CPU must not spread over every core of the node.
    """
    from digits_ray.keras_api import tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def _warp_tf(images: np.ndarray, a: np.ndarray, b: np.ndarray, tx: np.ndarray, ty: np.ndarray) -> np.ndarray:
    """Bilinear warp in TensorFlow's kernel, with the same pixel-centre convention as ``_bilinear``.

    The kernel maps output pixel (x, y) to input (a0 x + a1 y + a2, b0 x + b1 y + b2) in pixel
    indices; ours works in coordinates centred on the image, hence the offsets. It reads outside
    pixels as ``fill_value`` (our zero border) and its cast to uint8 truncates: lifting every input
    and the fill by 0.5 turns that truncation into rounding, like the numpy sampler's.
    """
    from digits_ray.keras_api import tf

    c = np.float32(_CENTER)
    transforms = np.stack(
        [a, b, c - a * (c + tx) - b * (c + ty), -b, a, c - a * (c + ty) + b * (c + tx),
         np.zeros_like(a), np.zeros_like(a)], axis=1,
    ).astype(np.float32)
    lifted = images[..., None].astype(np.float32)
    lifted += 0.5
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=lifted, transforms=transforms, output_shape=[IMAGE_SIZE, IMAGE_SIZE],
        fill_value=0.5, interpolation="BILINEAR", fill_mode="CONSTANT",
    )
    return tf.cast(warped, tf.uint8).numpy()[..., 0]


def _bilinear(images: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample (N, 784) source coordinates (in padded-image pixels) from zero-padded images.

    Each pixel's 2x2 neighbourhood is packed into one uint32, so one gather fetches all four
    bilinear taps: the gathers, not the arithmetic, are what cost time here.
    """
    n = len(images)
    padded = np.zeros((n, _PAD, _PAD), dtype=np.uint8)
    padded[:, 1:-1, 1:-1] = images
    quads = np.empty((n, _PAD - 1, _PAD - 1, 4), dtype=np.uint8)
    quads[..., 0] = padded[:, :-1, :-1]
    quads[..., 1] = padded[:, :-1, 1:]
    quads[..., 2] = padded[:, 1:, :-1]
    quads[..., 3] = padded[:, 1:, 1:]
    np.clip(x, 0, _PAD - 1.001, out=x)  # outside the image lands on the zero border
    np.clip(y, 0, _PAD - 1.001, out=y)
    xi, yi = x.astype(np.int32), y.astype(np.int32)
    fx, fy = x - xi, y - yi
    offsets = (np.arange(n, dtype=np.int32) * (_PAD - 1) ** 2)[:, None]
    taps = np.take(quads.view(np.uint32).reshape(-1), yi * (_PAD - 1) + xi + offsets)
    taps = taps.view(np.uint8).reshape(n, -1, 4).astype(np.float32)
    top = taps[..., 0] + (taps[..., 1] - taps[..., 0]) * fx
    bottom = taps[..., 2] + (taps[..., 3] - taps[..., 2]) * fx
    out = top + (bottom - top) * fy
    return np.rint(out).astype(np.uint8).reshape(n, IMAGE_SIZE, IMAGE_SIZE)
