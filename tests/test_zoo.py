"""Every zoo model takes raw uint8 pixels and returns class probabilities."""

import numpy as np
import pytest

from digits_ray.models.zoo import MODELS, build_model, model_params


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_takes_uint8_and_returns_probabilities(name):
    model = build_model(name)
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    probs = model.predict(pixels, verbose=0)
    assert probs.shape == (3, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert model.inputs[0].dtype == "uint8"


def test_bn_twins_differ_only_in_batch_normalization():
    def kinds(name):
        return [type(layer).__name__ for layer in build_model(name).layers]

    with_bn, without = kinds("cnn_bn"), kinds("cnn_nobn")
    assert with_bn.count("BatchNormalization") == 3 and "BatchNormalization" not in without
    assert [k for k in with_bn if k != "BatchNormalization"] == without


def test_cnn_deep_structure():
    model = build_model("cnn_deep", {"l2": 1e-3})
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [32, 32, 64, 64, 128, 128]
    dense = model.get_layer(index=len(model.layers) - 4)
    assert dense.units == 256 and dense.kernel_regularizer.l2 == pytest.approx(1e-3)


def test_hyperparameter_overrides_and_errors():
    assert model_params("cnn_basic", {"filters": [16, 32]}).filters == (16, 32)
    bn = [layer for layer in build_model("cnn_bn", {"bn_momentum": 0.9}).layers
          if type(layer).__name__ == "BatchNormalization"]
    assert len(bn) == 3 and all(layer.momentum == 0.9 for layer in bn)
    with pytest.raises(ValueError, match=r"bn_momentum must be in \[0, 1\), got 1.5"):
        model_params("cnn_bn", {"bn_momentum": 1.5})
    assert model_params("cnn_bn").batch_norm is True
    with pytest.raises(ValueError, match="unknown model 'resnet'.*dense, cnn_basic"):
        build_model("resnet")
    accepted = r"accepted: \['bn_momentum', 'conv_dropout', 'dense', 'dropout', 'l2', 'widths'\]"
    with pytest.raises(ValueError, match=r"no hyperparameter\(s\) \['width'\]; " + accepted):
        model_params("cnn_deep", {"width": 3})
