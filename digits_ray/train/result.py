"""What fitting returns, whichever runner did it, and how it becomes an artifact.

Fitting sees the training and validation splits only. The test set is evaluated by the entry point
that keeps the model (``evaluate.test_evaluation``), once, and its figures are passed in here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from digits_ray.config import TrainConfig
from digits_ray.data.split import TrainValData
from digits_ray.models import artifact
from digits_ray.models.zoo import model_params
from digits_ray.train.recipe import best_epoch


@dataclass
class FitResult:
    model: Any  # holding the weights of the best validation epoch
    cfg: TrainConfig
    history: pd.DataFrame  # one row per epoch: loss, accuracy, val_loss, val_accuracy, lr, seconds, ended_at
    training_seconds: float  # inside epochs; set-up and Ray's start-up are not counted
    data_md5: dict[str, str]  # the training files it was fitted on
    split_sizes: dict[str, int]  # {"train": ..., "validation": ...}
    trained_with: dict[str, Any] = field(default_factory=dict)  # runner, workers, per-worker batch, ...
    # The validation split (images, labels; references, not copies): what the abstain rule is fitted on.
    validation: tuple[Any, Any] | None = None

    @classmethod
    def from_history(cls, model: Any, cfg: TrainConfig, rows: list[dict[str, Any]], data: TrainValData,
                     trained_with: dict[str, Any]) -> FitResult:
        history = pd.DataFrame(rows)
        if "epoch" not in history:
            history.insert(0, "epoch", range(1, len(history) + 1))
        return cls(model, cfg, history, float(history["seconds"].sum()), data.md5,
                   {"train": len(data.y_train), "validation": len(data.y_val)}, trained_with, (data.x_val, data.y_val))

    @property
    def best(self) -> pd.Series:
        return self.history.iloc[best_epoch(self.history.to_dict("records"))]

    def metadata(self, test: dict[str, Any] | None = None, abstain: dict[str, Any] | None = None) -> dict[str, Any]:
        """The artifact's metadata; ``test``: the one test evaluation's figures, when it was run; ``abstain``:
        the abstain rule fitted on the validation split."""
        best = self.best
        images_seen = self.split_sizes["train"] * len(self.history)
        test = test or {}
        return {
            "model": self.cfg.model,
            "model_params": dataclasses.asdict(model_params(self.cfg.model, self.cfg.model_params)),
            "train_config": self.cfg.to_dict(),
            "data_md5": {**self.data_md5, **test.get("data_md5", {})},
            "split_sizes": {**self.split_sizes, **({"test": test["test_count"]} if test else {})},
            "versions": artifact.library_versions(),
            "training_seconds": round(self.training_seconds, 2),
            "train_images_per_second": round(images_seen / self.training_seconds, 1),
            "epochs_run": len(self.history),
            "validation": {
                "best_epoch": int(best["epoch"]),
                "val_accuracy": float(best["val_accuracy"]),
                "val_loss": float(best["val_loss"]),
            },
            "trained_with": self.trained_with,
            **{k: test[k] for k in ("test_accuracy", "test_loss") if k in test},
            **({artifact.ABSTAIN_FIELD: abstain} if abstain is not None else {}),
        }

    def write_artifact(self, out_dir: Path | str, test: dict[str, Any] | None, abstain: dict[str, Any]
                       ) -> dict[str, Any]:
        """The artifact, with its one test evaluation's figures and its abstain rule (both required of a
        kept model: ``evaluate.keep`` and the Tune publish step give them)."""
        metadata = self.metadata(test, abstain)
        artifact.write_artifact(out_dir, self.model, metadata, self.history)
        return metadata
