"""The model zoo: named Keras builders with documented, typed hyperparameters.

Every model takes raw uint8 pixels, shape (28, 28), and scales them itself, so training, serving and
export all feed exactly the same thing. Every model ends in a float32 softmax, which keeps the output
numerically safe under mixed precision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from digits_ray.errors import ConfigError
from digits_ray.schema import IMAGE_SIZE, NUM_CLASSES

if TYPE_CHECKING:
    from digits_ray.keras_api import keras


def _keras() -> Any:
    """Keras, imported when a model is built: the zoo's names and hyperparameters (command-line choices,
    search spaces, config checks) must not wait for TensorFlow to load."""
    from digits_ray.keras_api import keras

    return keras


@dataclass(frozen=True)
class DenseParams:
    hidden: int = 128  # units of the single hidden ReLU layer
    dropout: float = 0.2


@dataclass(frozen=True)
class CnnParams:
    filters: tuple[int, int] = (32, 64)  # the two 3x3 convolutions
    dense: int = 128  # units of the hidden dense layer
    conv_dropout: float = 0.25  # after max-pooling
    dropout: float = 0.5  # after the dense layer
    batch_norm: bool = False  # BN after each convolution and the dense layer (before ReLU)
    pool_after_each: bool = False  # max-pool after every conv (about 4x fewer MACs) instead of once
    # BN moving-average momentum. 0.9 (PyTorch's default) catches up within tens of steps, so a 1-2
    # epoch run (a Tune trial judged early, a few steps per epoch) validates with real statistics.
    bn_momentum: float = 0.9


@dataclass(frozen=True)
class CnnDeepParams:
    widths: tuple[int, int, int] = (32, 64, 128)  # filters of the three blocks of two 3x3 convs
    dense: int = 256
    conv_dropout: float = 0.25  # after each block's max-pooling
    dropout: float = 0.5  # after the dense layer
    l2: float = 1e-4  # L2 weight decay on the dense layer's kernel
    bn_momentum: float = 0.9  # as CnnParams


def _inputs() -> tuple[Any, Any]:
    """uint8 (28, 28) in; float (28, 28, 1) in [0, 1] out."""
    keras = _keras()
    layers = keras.layers
    raw = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE), dtype="uint8", name="pixels")
    x = layers.Rescaling(1.0 / 255, name="scale")(raw)
    return raw, layers.Reshape((IMAGE_SIZE, IMAGE_SIZE, 1), name="channel")(x)


def _head(x: Any) -> Any:
    keras = _keras()
    layers = keras.layers
    x = layers.Dense(NUM_CLASSES, name="logits")(x)
    return layers.Activation("softmax", dtype="float32", name="probabilities")(x)


def _conv_bn_relu(x: Any, filters: int, batch_norm: bool, bn_momentum: float, padding: str = "valid") -> Any:
    keras = _keras()
    layers = keras.layers
    x = layers.Conv2D(filters, 3, padding=padding, use_bias=not batch_norm)(x)
    if batch_norm:
        x = layers.BatchNormalization(momentum=bn_momentum)(x)
    return layers.ReLU()(x)


def build_dense(p: DenseParams) -> keras.Model:
    keras = _keras()
    layers = keras.layers
    raw, x = _inputs()
    x = layers.Flatten()(x)
    x = layers.Dense(p.hidden, activation="relu")(x)
    x = layers.Dropout(p.dropout)(x)
    return keras.Model(raw, _head(x), name="dense")


def build_cnn(p: CnnParams, name: str) -> keras.Model:
    keras = _keras()
    layers = keras.layers
    raw, x = _inputs()
    for filters in p.filters:
        x = _conv_bn_relu(x, filters, p.batch_norm, p.bn_momentum)
        if p.pool_after_each:
            x = layers.MaxPooling2D()(x)
    if not p.pool_after_each:
        x = layers.MaxPooling2D()(x)
    x = layers.Dropout(p.conv_dropout)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(p.dense, use_bias=not p.batch_norm)(x)
    if p.batch_norm:
        x = layers.BatchNormalization(momentum=p.bn_momentum)(x)
    x = layers.ReLU()(x)
    x = layers.Dropout(p.dropout)(x)
    return keras.Model(raw, _head(x), name=name)


def build_cnn_deep(p: CnnDeepParams) -> keras.Model:
    keras = _keras()
    layers = keras.layers
    raw, x = _inputs()
    for width in p.widths:
        x = _conv_bn_relu(x, width, batch_norm=True, bn_momentum=p.bn_momentum, padding="same")
        x = _conv_bn_relu(x, width, batch_norm=True, bn_momentum=p.bn_momentum, padding="same")
        x = layers.MaxPooling2D()(x)
        x = layers.Dropout(p.conv_dropout)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(p.dense, activation="relu", kernel_regularizer=keras.regularizers.L2(p.l2))(x)
    x = layers.Dropout(p.dropout)(x)
    return keras.Model(raw, _head(x), name="cnn_deep")


@dataclass(frozen=True)
class ModelSpec:
    params: type
    build: Callable[[Any], keras.Model]
    summary: str
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of params' defaults


MODELS: dict[str, ModelSpec] = {
    "dense": ModelSpec(DenseParams, build_dense, "1 hidden layer of 128 ReLU units, dropout 0.2"),
    "cnn_basic": ModelSpec(
        CnnParams, lambda p: build_cnn(p, "cnn_basic"), "Conv32, Conv64, max-pool, Dense128, dropout 0.5"
    ),
    "cnn_nobn": ModelSpec(
        CnnParams, lambda p: build_cnn(p, "cnn_nobn"), "cnn_bn's twin without batch normalization"
    ),
    "cnn_bn": ModelSpec(
        CnnParams,
        lambda p: build_cnn(p, "cnn_bn"),
        "Conv32, Conv64, Dense128, each with batch normalization",
        {"batch_norm": True},
    ),
    "cnn_deep": ModelSpec(
        CnnDeepParams, build_cnn_deep, "3 blocks of 2 convs (32-64-128) with BN, pool, dropout; Dense256 + L2"
    ),
}


def model_params(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The full, validated hyperparameters of a zoo model: its defaults updated by ``overrides``."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; the zoo has: {', '.join(MODELS)}")
    spec = MODELS[name]
    values = {**spec.defaults, **(overrides or {})}
    fields = {f.name: f for f in dataclasses.fields(spec.params)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"model {name!r} has no hyperparameter(s) {unknown}; accepted: {sorted(fields)}")
    for key, value in values.items():
        if isinstance(value, list):  # JSON and CLI give lists where the dataclass has tuples
            values[key] = tuple(value)
    momentum = values.get("bn_momentum")
    if momentum is not None and not 0 <= momentum < 1:
        raise ConfigError(f"bn_momentum must be in [0, 1), got {momentum}")
    return spec.params(**values)


def build_model(name: str, overrides: dict[str, Any] | None = None) -> keras.Model:
    params = model_params(name, overrides)  # raises a clear error for an unknown name first
    return MODELS[name].build(params)
