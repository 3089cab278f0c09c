"""The search space, define-by-run: Optuna asks for each hyperparameter only where it applies.

A trial's config is flat (``model``, ``log2_batch_size``, ``learning_rate``, ``schedule``,
``warmup_epochs``, ``augment``, and ``p_<name>`` / ``aug_<name>`` for model and augmentation options),
so Tune's trial table and the report show every value; ``train_config`` turns it into a ``TrainConfig``
(whose ``batch_size`` is ``2 ** log2_batch_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from digits_ray.config import TrainConfig
from digits_ray.errors import ConfigError
from digits_ray.models.zoo import MODELS, model_params

MODEL_PREFIX, AUGMENT_PREFIX = "p_", "aug_"
CNN_MODELS = ("cnn_basic", "cnn_nobn", "cnn_bn")


@dataclass(frozen=True)
class SpaceConfig:
    """The ranges searched; the defaults cover the seed projects' choices and what MNIST rewards."""

    models: tuple[str, ...] = tuple(MODELS)
    min_batch: int = 32  # global batch, searched on a log scale in powers of two
    max_batch: int = 2048
    min_lr: float = 1e-4  # peak LR for the global batch, log-uniform
    max_lr: float = 3e-2
    schedules: tuple[str, ...] = ("cosine", "constant", "plateau")
    augment_choices: tuple[str, ...] = ("off", "on")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown or not self.models:
            raise ConfigError(f"unknown model(s) {unknown} to search; the zoo has: {', '.join(MODELS)}")
        if not (1 <= self.min_batch <= self.max_batch) or self.min_batch & (self.min_batch - 1) \
                or self.max_batch & (self.max_batch - 1):
            raise ConfigError(f"batch range must be powers of two, min <= max; got {self.min_batch}..{self.max_batch}")
        if not 0 < self.min_lr <= self.max_lr:
            raise ConfigError(f"LR range must be 0 < min <= max; got {self.min_lr}..{self.max_lr}")


def define_space(trial: Any, space: SpaceConfig) -> None:
    """Optuna's define-by-run space: conditional hyperparameters per architecture and augmentation.

    A name shared by several architectures has one range for all (Optuna refuses a categorical
    whose choices change between trials).
    """
    model = trial.suggest_categorical("model", list(space.models))
    trial.suggest_float("p_dropout", 0.0, 0.6)  # every architecture has a dropout before its head
    if model == "dense":
        trial.suggest_categorical("p_hidden", [64, 128, 256, 512])
    elif model in CNN_MODELS:
        trial.suggest_categorical("p_base_filters", [16, 32, 48])
        trial.suggest_categorical("p_dense", [64, 128, 256, 512])
        trial.suggest_float("p_conv_dropout", 0.0, 0.4)
        trial.suggest_categorical("p_pool_after_each", [False, True])
        if model == "cnn_bn":
            trial.suggest_float("p_bn_momentum", 0.8, 0.99)
    else:  # cnn_deep
        trial.suggest_categorical("p_base_width", [16, 32, 48])
        trial.suggest_categorical("p_dense", [64, 128, 256, 512])
        trial.suggest_float("p_conv_dropout", 0.0, 0.4)
        trial.suggest_float("p_l2", 1e-6, 1e-3, log=True)
        trial.suggest_float("p_bn_momentum", 0.8, 0.99)
    low, high = space.min_batch.bit_length() - 1, space.max_batch.bit_length() - 1
    trial.suggest_int("log2_batch_size", low, high)
    trial.suggest_float("learning_rate", space.min_lr, space.max_lr, log=True)
    if trial.suggest_categorical("schedule", list(space.schedules)) == "cosine":
        trial.suggest_float("warmup_epochs", 0.0, 0.5)
    if trial.suggest_categorical("augment", list(space.augment_choices)) == "on":
        trial.suggest_float("aug_rotation_deg", 0.0, 20.0)
        trial.suggest_float("aug_shift", 0.0, 0.15)
        trial.suggest_float("aug_zoom", 0.0, 0.2)
        trial.suggest_categorical("aug_elastic_alpha", [0.0, 1.0, 2.0])


def model_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """The zoo hyperparameters a flat trial config names (widths derived from their base)."""
    params = {k[len(MODEL_PREFIX):]: v for k, v in config.items() if k.startswith(MODEL_PREFIX)}
    if "base_filters" in params:
        base = params.pop("base_filters")
        params["filters"] = (base, 2 * base)
    if "base_width" in params:
        base = params.pop("base_width")
        params["widths"] = (base, 2 * base, 4 * base)
    return params


def train_config(config: dict[str, Any], base: TrainConfig) -> TrainConfig:
    """A trial's ``TrainConfig``: ``base`` (epochs, seed, validation split, ...) with the sampled values."""
    batch = config.get("batch_size") or 2 ** int(config["log2_batch_size"])
    augment = None
    if config.get("augment") == "on":
        augment = {k[len(AUGMENT_PREFIX):]: v for k, v in config.items() if k.startswith(AUGMENT_PREFIX)}
    cfg = TrainConfig(**{
        **base.to_dict(),
        "model": config["model"],
        "batch_size": batch,
        "learning_rate": float(config["learning_rate"]),
        "schedule": config.get("schedule", base.schedule),
        "warmup_epochs": float(config.get("warmup_epochs", 0.0)) if config.get("schedule") == "cosine" else 0.0,
        "model_params": model_overrides(config),
        "augment": augment,
    })
    model_params(cfg.model, cfg.model_params)  # every sampled value is a valid hyperparameter
    return cfg
