"""Where the parts of a served model are: the zoo models inside it, their scaled input, logits and last
convolution, and where a convolution's cells sit on the 28x28 input.

A zoo model (``models/zoo.py``) reads uint8 pixels, scales them (layer ``channel`` takes the float image
in [0, 1]), and ends in a Dense ``logits`` and a softmax ``probabilities``. An ensemble (``ensemble.py``)
averages the probabilities of zoo models nested inside it. Explanations and the abstain score need the
logits, which an ensemble's output hides: they are taken from each member.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from digits_ray.schema import IMAGE_SIZE

SCALED_INPUT_LAYER = "channel"  # its input is the scaled float image (28, 28) in [0, 1]
LOGITS_LAYER = "logits"


def _is_zoo_model(model: Any) -> bool:
    names = {layer.name for layer in model.layers}
    return SCALED_INPUT_LAYER in names and LOGITS_LAYER in names


def members(model: Any) -> list[Any] | None:
    """The zoo models whose logits make ``model``'s answer: ``[model]`` for a zoo model, the members of an
    ensemble (the mean of their probabilities), or None for any other model."""
    from digits_ray.keras_api import keras

    if _is_zoo_model(model):
        return [model]
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if nested and isinstance(model.layers[-1], keras.layers.Average) and all(map(_is_zoo_model, nested)):
        return nested
    return None


@dataclass(frozen=True)
class Grid:
    """Where a feature map's cells sit on the input: cell ``i`` is centred on pixel ``offset + step * i``
    (per axis: rows, columns)."""

    offset: tuple[float, float]
    step: tuple[float, float]
    size: tuple[int, int]


# Layers that keep each cell where it is (values change, positions do not).
_IN_PLACE = ("BatchNormalization", "ReLU", "Activation", "Dropout", "SpatialDropout2D", "LeakyReLU")


def _slide(grid: Grid, layer: Any) -> Grid:
    """The grid after a convolution or pooling layer (valid or same padding, any stride)."""
    config = layer.get_config()
    kernel = config.get("kernel_size") or config["pool_size"]
    strides = config.get("strides") or kernel
    offset, step, size = [], [], []
    for axis in range(2):
        k, s, n = kernel[axis], strides[axis], grid.size[axis]
        if config["padding"] == "same":
            out = -(-n // s)
            before = max((out - 1) * s + k - n, 0) // 2
        else:
            out, before = (n - k) // s + 1, 0
        offset.append(grid.offset[axis] + grid.step[axis] * ((k - 1) / 2 - before))
        step.append(grid.step[axis] * s)
        size.append(out)
    return Grid(tuple(offset), tuple(step), tuple(size))


def last_convolution(model: Any) -> tuple[str, Grid] | None:
    """The zoo model's last convolutional feature map (after its batch norm and ReLU) and where its cells
    sit on the input; None when the model has no convolution, or a layer whose geometry is unknown here
    stands between the input and it."""
    layers = model.layers
    convs = [i for i, layer in enumerate(layers) if type(layer).__name__ == "Conv2D"]
    if not convs:
        return None
    end = convs[-1]
    while end + 1 < len(layers) and type(layers[end + 1]).__name__ in _IN_PLACE:
        end += 1
    names = [layer.name for layer in layers]
    grid = Grid((0.0, 0.0), (1.0, 1.0), (IMAGE_SIZE, IMAGE_SIZE))
    for layer in layers[names.index(SCALED_INPUT_LAYER) + 1: end + 1]:
        kind = type(layer).__name__
        if kind in ("Conv2D", "MaxPooling2D", "AveragePooling2D"):
            if tuple(layer.get_config().get("dilation_rate", (1, 1))) != (1, 1):
                return None
            grid = _slide(grid, layer)
        elif kind not in _IN_PLACE:
            return None
    if tuple(layers[end].output_shape[1:3]) != grid.size:  # a geometry this walk got wrong: do not guess
        return None
    return layers[end].name, grid
