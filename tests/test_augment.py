"""Vectorized augmentation: valid images, ink kept inside the frame, reproducible randomness."""

import numpy as np
import pytest

from digits_ray.config import AugmentConfig
from digits_ray.data.augment import KERNELS, augment, uniform
from digits_ray.data.mnist import load_split

# (config, how far the median ink mass may move: extreme ranges must shrink most digits to fit)
CONFIGS = [(AugmentConfig(), 0.1), (AugmentConfig(elastic_alpha=2.0), 0.1),
           (AugmentConfig(rotation_deg=30, shift=0.3, zoom=0.3, elastic_alpha=3.0), 0.45)]


@pytest.fixture(scope="module")
def digits(small_mnist):
    train = load_split("train", small_mnist)
    return train.images[:2000], np.arange(2000)


@pytest.mark.parametrize("cfg, median_shift", CONFIGS, ids=["default", "elastic", "extreme"])
def test_shape_dtype_and_ink_inside_the_frame(digits, cfg, median_shift):
    images, index = digits
    for epoch in range(3):
        out = augment(images, index, epoch, seed=0, cfg=cfg)
        assert out.shape == images.shape and out.dtype == np.uint8
        # No ink on the outermost ring: nothing was pushed out of (or clipped at) the frame.
        assert out[:, [0, -1], :].max() == 0 and out[:, :, [0, -1]].max() == 0
        # The digit is still there: typical ink mass is kept; large digits may be shrunk to fit.
        ratio = out.reshape(len(out), -1).sum(1) / images.reshape(len(images), -1).sum(1)
        assert abs(np.median(ratio) - 1) < median_shift
        assert ratio.min() > 0.25 and ratio.max() < (1 + cfg.zoom) ** 2 * 1.25


def test_images_actually_change(digits):
    images, index = digits
    out = augment(images, index, 0, 0, AugmentConfig())
    changed = (out != images).reshape(len(images), -1).any(1)
    assert changed.mean() > 0.99


@pytest.mark.parametrize("cfg", [AugmentConfig(), AugmentConfig(elastic_alpha=2.0)], ids=["tf", "numpy+elastic"])
def test_same_seed_and_epoch_same_images_whatever_the_batching(digits, cfg):
    images, index = digits
    whole = augment(images, index, 4, 7, cfg)
    pieces = np.concatenate([augment(images[i:i + 300], index[i:i + 300], 4, 7, cfg) for i in range(0, 2000, 300)])
    np.testing.assert_array_equal(whole, pieces)


@pytest.mark.parametrize("cfg", [AugmentConfig(), AugmentConfig(rotation_deg=40, shift=0.2, zoom=0.3)],
                         ids=["default", "wide"])
def test_tf_kernel_matches_the_numpy_sampler(digits, cfg):
    """Same parameters, same pixel convention and rounding: at most float round-off apart."""
    images, index = digits
    fast = augment(images, index, 2, 5, cfg, kernel="tf").astype(int)
    reference = augment(images, index, 2, 5, cfg, kernel="numpy").astype(int)
    assert np.abs(fast - reference).max() <= 1
    assert (fast != reference).mean() < 1e-3


def test_other_epoch_or_seed_other_images(digits):
    images, index = digits
    cfg = AugmentConfig()
    base = augment(images, index, 0, 0, cfg)
    for other in (augment(images, index, 1, 0, cfg), augment(images, index, 0, 1, cfg)):
        assert (other != base).reshape(len(base), -1).any(1).mean() > 0.99


def test_counter_based_uniforms():
    u = uniform(3, 2, np.arange(50_000), 4)
    assert u.shape == (50_000, 4) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.02


@pytest.mark.parametrize("kernel", KERNELS)
def test_identity_when_every_range_is_zero(digits, kernel):
    images, index = digits
    out = augment(images, index, 0, 0, AugmentConfig(rotation_deg=0, shift=0, zoom=0, margin=0), kernel=kernel)
    np.testing.assert_array_equal(out, images)


def test_bad_input_and_options():
    with pytest.raises(ValueError, match="uint8 images of shape"):
        augment(np.zeros((2, 28, 28), np.float32), np.arange(2), 0, 0, AugmentConfig())
    with pytest.raises(ValueError, match="one index per image"):
        augment(np.zeros((2, 28, 28), np.uint8), np.arange(3), 0, 0, AugmentConfig())
    with pytest.raises(ValueError, match="kernel='opencv'"):
        augment(np.zeros((2, 28, 28), np.uint8), np.arange(2), 0, 0, AugmentConfig(), kernel="opencv")
    with pytest.raises(ValueError, match="'numpy' with elastic"):
        augment(np.zeros((2, 28, 28), np.uint8), np.arange(2), 0, 0, AugmentConfig(elastic_alpha=1.0), kernel="tf")
    with pytest.raises(ValueError, match="shift=0.7"):
        AugmentConfig(shift=0.7)
