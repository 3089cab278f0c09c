"""Reporting every epoch to Ray (Train or Tune) with a checkpoint a restarted run can resume from."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

from digits_ray.keras_api import keras
from digits_ray.train import checkpoint as ckpt

# publish(metrics of the epoch, folder holding its checkpoint): ray.train.report or ray.tune.report.
Publish = Callable[[dict[str, Any], str], None]
BEST_METRIC = "best_val_accuracy"


class ReportEachEpoch(keras.callbacks.Callback):
    """The epoch's row joins the run's state, a checkpoint (model + state) is written, then published
    with ``best_val_accuracy``, the best so far (what a searcher should learn from a stopped trial).

    Under MultiWorkerMirroredStrategy every worker saves (the strategy expects it); ``publish``
    decides which copy Ray keeps.
    """

    def __init__(self, state: ckpt.RunState, publish: Publish):
        super().__init__()
        self.state, self.publish = state, publish

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
        self.state.history.append(row)
        best = max(float(epoch_row["val_accuracy"]) for epoch_row in self.state.history)
        with tempfile.TemporaryDirectory(prefix="digits-ckpt-") as folder:
            ckpt.write(folder, self.model, self.state)
            self.publish({**row, BEST_METRIC: best}, folder)
