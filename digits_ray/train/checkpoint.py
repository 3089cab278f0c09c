"""Training checkpoints: what a Ray Train worker or a Tune trial saves every epoch, and reads back.

    <checkpoint>/
      model.keras   the model with its optimizer state (the step count, so the LR schedule continues)
      state.json    the run so far: per-epoch history and the epoch each attempt started at

A checkpoint is not an artifact (``models/artifact.py``): it is a run's resumable state, written by workers
into Ray's storage. The driver turns the best one into an artifact.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_FILE = "model.keras"
STATE_FILE = "state.json"


@dataclass
class RunState:
    """What a resumed run needs besides the model: the epochs trained, and each attempt's start."""

    history: list[dict[str, float]] = field(default_factory=list)
    attempt_starts: list[int] = field(default_factory=list)

    @property
    def epochs_done(self) -> int:
        return len(self.history)


def is_checkpoint(folder: Path | str) -> bool:
    return (Path(folder) / STATE_FILE).is_file() and (Path(folder) / MODEL_FILE).is_file()


def write(folder: Path | str, model: Any, state: RunState) -> None:
    """Save into ``folder`` (a fresh temporary folder that Ray then copies into its storage)."""
    from digits_ray.keras_api import save_model

    save_model(model, Path(folder) / MODEL_FILE)
    (Path(folder) / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))


def _state_in(folder: Path | str) -> RunState:
    return RunState(**json.loads((Path(folder) / STATE_FILE).read_text()))


def _model_in(folder: Path | str) -> Any:
    from digits_ray.keras_api import keras

    return keras.models.load_model(Path(folder) / MODEL_FILE, safe_mode=True)


def read_state(checkpoint) -> RunState:
    """The state alone: small, so a worker reads it before TensorFlow sets up (the model comes later)."""
    with checkpoint.as_directory() as folder:
        return _state_in(folder)


def load_model(checkpoint) -> Any:
    """The model with its optimizer state (call inside a strategy scope when training goes on)."""
    with checkpoint.as_directory() as folder:
        return _model_in(folder)


def load(checkpoint) -> tuple[Any, RunState]:
    """Model and state with one download when the storage is remote."""
    with checkpoint.as_directory() as folder:
        return _model_in(folder), _state_in(folder)
