"""The artifact folder is loaded in Keras's safe mode: a model file that would run code from the file
(a Lambda layer's pickled function) is refused by every reader, evaluate, predict and Serve alike."""

from __future__ import annotations

import pandas as pd
import pytest

from digits_ray.config import TrainConfig
from digits_ray.inference.predictor import Predictor
from digits_ray.models import artifact


def lambda_model():
    """A model that reads digits like ours, with a Lambda layer (arbitrary Python) in its middle."""
    from digits_ray.keras_api import keras

    pixels = keras.Input((28, 28), dtype="uint8", name="pixels")
    scaled = keras.layers.Rescaling(1 / 255)(pixels)
    flat = keras.layers.Flatten()(keras.layers.Lambda(lambda t: t * 2.0 - 1.0, name="center")(scaled))
    return keras.Model(pixels, keras.layers.Dense(10, activation="softmax", name="logits")(flat))


def test_a_keras_file_with_a_lambda_layer_is_refused_by_safe_mode(tmp_path):
    from digits_ray.keras_api import keras

    metadata = {"model": "dense", "model_params": {}, "train_config": TrainConfig().to_dict(), "data_md5": {},
                "versions": {}, "training_seconds": 0.0,
                "validation": {"best_epoch": 1, "val_accuracy": 0.5, "val_loss": 1.0}}
    folder = artifact.write_artifact(tmp_path / "lambda", lambda_model(), metadata, pd.DataFrame({"epoch": [1]}))
    with pytest.raises(artifact.ArtifactError, match="could not be loaded.*safe_mode"):
        artifact.load_model(folder)
    with pytest.raises(artifact.ArtifactError, match="could not be loaded.*safe_mode"):
        Predictor.from_artifact(folder)  # what evaluate, predict and Serve load through
    # The file itself is sound: only safe mode stands between it and its Lambda's code.
    loaded = keras.models.load_model(folder / artifact.MODEL_FILE, safe_mode=False)
    assert any(type(layer).__name__ == "Lambda" for layer in loaded.layers)
