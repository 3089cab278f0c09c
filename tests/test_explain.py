"""Explanations: the maps lie on the stroke, the contract holds, ensembles and models without a convolution
are explained, and concurrent callers get the same maps."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from digits_ray.data.mnist import load_split
from digits_ray.inference.explain import DEFAULT_EXPLAIN_METHOD, EXPLAIN_METHODS, ExplainError, Explanation
from digits_ray.inference.images import INK_THRESHOLD
from digits_ray.inference.predictor import Predictor, PredictorError
from digits_ray.models import artifact, parts

DIGITS = 100  # test digits measured


def dilated(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels in every direction (a square structuring element)."""
    padded = np.pad(mask, radius)
    grown = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            grown |= padded[dy: dy + mask.shape[0], dx: dx + mask.shape[1]]
    return grown


def near_ink(image: np.ndarray) -> np.ndarray:
    """The digit's ink (as images.py defines ink), and the 2 pixels around it."""
    return dilated(image > INK_THRESHOLD * 255, 2)


@pytest.fixture(scope="module")
def predictor(digit_model) -> Predictor:
    return Predictor.from_artifact(digit_model)


@pytest.fixture(scope="module")
def digits(small_mnist) -> np.ndarray:
    return load_split("test", small_mnist).images[:DIGITS]


# Measured on the `digit_model` fixture (the small CNN) over the first 100 test digits of the small subset:
# mean share of the map's mass within 2 px of the ink: gradcam 0.755, saliency 0.686, smoothgrad 0.607.
# The ink and its 2-px border cover 0.40 of the frame on average (what a map spread evenly would score).
# Grad-CAM's original weighting (each map times its mean gradient) gave about 0.60, and 15% empty maps.
# (cnn_bn trained 2 epochs on full MNIST, 1,000 test digits: gradcam 0.877, saliency 0.592, smoothgrad 0.528.)
@pytest.mark.parametrize(("method", "bound"), [("gradcam", 0.68), ("saliency", 0.62), ("smoothgrad", 0.54)])
def test_most_of_the_map_lies_on_or_next_to_the_ink(predictor, digits, method, bound):
    shares, area = [], []
    for image in digits:
        explanation = predictor.explain(image, None, method)
        assert explanation.method == method and explanation.note is None
        region = near_ink(image)
        shares.append(explanation.map[region].sum() / explanation.map.sum())
        area.append(region.mean())
    assert np.mean(shares) >= bound, f"{method}: {np.mean(shares):.3f} of the mass near the ink"
    assert np.mean(area) <= bound - 0.1  # the bound asks far more than a map spread evenly would give


def test_the_explain_contract(predictor, digits):
    image = digits[0]
    assert DEFAULT_EXPLAIN_METHOD == "gradcam" and {"gradcam", "saliency"} <= set(EXPLAIN_METHODS)
    predicted = predictor.predict(image[None])[0]["digit"]
    for method in EXPLAIN_METHODS:
        explanation = predictor.explain(image, None, method)
        assert isinstance(explanation, Explanation) and explanation.method == method
        assert explanation.map.shape == (28, 28) and explanation.map.dtype == np.float32
        assert explanation.map.min() >= 0 and explanation.map.max() == pytest.approx(1.0)
        # digit=None explains the predicted digit
        np.testing.assert_array_equal(explanation.map, predictor.explain(image, predicted, method).map)
    with pytest.raises(dataclasses.FrozenInstanceError):
        explanation.method = "other"
    other = (predicted + 1) % 10
    assert not np.allclose(predictor.explain(image, other, "gradcam").map, explanation.map)
    with pytest.raises(ExplainError, match="unknown explanation method 'lime'; accepted: gradcam, saliency"):
        predictor.explain(image, None, "lime")
    with pytest.raises(ExplainError, match="digit must be an integer from 0 to 9"):
        predictor.explain(image, 10, "saliency")
    with pytest.raises(PredictorError, match=r"one uint8 image of shape \(28, 28\)"):
        predictor.explain(image.astype(np.float32), None, "saliency")
    np.testing.assert_array_equal(predictor.saliency(image), predictor.explain(image, None, "saliency").map)


def test_concurrent_callers_get_the_same_maps(digit_model, digits):
    """Serve explains from a thread pool: the first calls build the sub-models at the same time."""
    fresh = Predictor.from_artifact(digit_model)
    jobs = [(digits[i % 4], method) for i in range(16) for method in ("gradcam", "saliency")]
    with ThreadPoolExecutor(8) as pool:
        maps = list(pool.map(lambda job: fresh.explain(job[0], None, job[1]).map, jobs))
    for (image, method), got in zip(jobs, maps):
        np.testing.assert_allclose(got, fresh.explain(image, None, method).map, atol=1e-6)


def test_a_model_without_a_convolution_gets_saliency_and_says_so(digits):
    from digits_ray.models.zoo import build_model

    dense = Predictor(build_model("dense", {"hidden": 16}))
    explanation = dense.explain(digits[0], 3, "gradcam")
    assert explanation.method == "saliency" and "no convolution" in explanation.note
    np.testing.assert_array_equal(explanation.map, dense.explain(digits[0], 3, "saliency").map)


def test_an_ensemble_is_explained_through_its_members_logits(digit_model, predictor, digits, tmp_path):
    import pandas as pd

    from digits_ray.models.ensemble import build_ensemble

    twins = build_ensemble([artifact.load_model(digit_model), artifact.load_model(digit_model)])
    ensemble = Predictor(twins)
    for method in ("gradcam", "saliency"):  # two copies of one model: the model's own map
        np.testing.assert_allclose(ensemble.explain(digits[1], None, method).map,
                                   predictor.explain(digits[1], None, method).map, atol=1e-5)
    from digits_ray.models.zoo import build_model

    mixed = build_ensemble([artifact.load_model(digit_model), build_model("dense", {"hidden": 16})])
    artifact.write_artifact(tmp_path / "mixed", mixed, {**artifact.read_metadata(digit_model), "model": "ensemble"},
                            pd.DataFrame({"member": [0, 1]}))
    explanation = Predictor.from_artifact(tmp_path / "mixed").explain(digits[1], None, "gradcam")
    assert explanation.method == "saliency" and "member_1_dense has no convolution" in explanation.note


def test_where_the_last_convolution_looks():
    """Cell i of the last feature map is centred on pixel offset + step * i (valid 3x3 convs, 2x2 pools)."""
    from digits_ray.models.zoo import build_model

    # cnn_bn: conv 28 -> 26 (centre +1), conv 26 -> 24 (+1 more); the pool comes after the last conv.
    name, grid = parts.last_convolution(build_model("cnn_bn"))
    assert grid == parts.Grid((2.0, 2.0), (1.0, 1.0), (24, 24)) and name.startswith("re_lu")
    # pool_after_each: conv (+1) 26, pool (+0.5, x2) 13, conv (+1 cell = +2 px) 11: centres 3.5, 5.5, ... 23.5
    _, grid = parts.last_convolution(build_model("cnn_bn", {"pool_after_each": True}))
    assert grid == parts.Grid((3.5, 3.5), (2.0, 2.0), (11, 11))
    # cnn_deep: "same" convs keep centres; two pools come before its last conv: offsets 0.5 then 1.5, steps 2, 4
    _, grid = parts.last_convolution(build_model("cnn_deep"))
    assert grid == parts.Grid((1.5, 1.5), (4.0, 4.0), (7, 7))
    assert parts.last_convolution(build_model("dense")) is None
