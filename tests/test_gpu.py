"""GPU checks: mixed precision and GPU training. CPU-only machines (CI) skip them, saying why."""

import numpy as np
import pytest

from digits_ray.keras_api import keras, tf
from digits_ray.models.zoo import build_model
from digits_ray.train import recipe

HAS_GPU = bool(tf.config.list_physical_devices("GPU"))
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no GPU visible to TensorFlow (CPU-only machine); "
                                                   "run `pytest -m gpu` on a GPU machine")


def test_auto_precision_is_float32_on_cpu():
    if HAS_GPU:
        pytest.skip("this machine has a GPU; the CPU default is checked on CPU-only machines")
    try:
        assert recipe.set_precision("auto") == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.gpu
@needs_gpu
def test_mixed_precision_trains_on_gpu_with_float32_outputs():
    try:
        assert recipe.set_precision("auto") == "mixed_float16"
        model = build_model("cnn_bn")
        assert model.get_layer("logits").compute_dtype == "float16"
        model.compile("adam", "sparse_categorical_crossentropy")
        x = np.random.default_rng(0).integers(0, 256, (256, 28, 28), dtype=np.uint8)
        y = np.arange(256) % 10
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        assert model.predict(x[:4], verbose=0).dtype == np.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
