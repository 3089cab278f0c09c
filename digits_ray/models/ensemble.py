"""An ensemble of trained models as one ordinary Keras model: the average of their probabilities.

It takes the same uint8 input and gives the same ten probabilities, so it is saved in the same
artifact format and loaded (safe mode) by evaluate and Serve like any other model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from digits_ray.schema import IMAGE_SIZE


def build_ensemble(members: Sequence[Any], name: str = "ensemble") -> Any:
    from digits_ray.keras_api import keras

    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
    pixels = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE), dtype="uint8", name="pixels")
    outputs = []
    for i, member in enumerate(members):
        member._name = f"member_{i}_{member.name}"  # nested models need distinct names to save
        outputs.append(member(pixels))
    averaged = keras.layers.Average(name="probabilities", dtype="float32")(outputs)
    return keras.Model(pixels, averaged, name=name)
