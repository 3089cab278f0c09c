"""The model artifact folder: the one format that training writes and evaluation, Tune and Serve read.

    <dir>/
      model.keras       the model in Keras's native format (weights, architecture, optimizer state)
      metadata.json     what produced it, what it reads (``input``) and how well it does (``REQUIRED_METADATA``, then
                        ``TEST_METADATA`` from the one test evaluation, ``ABSTAIN_FIELD``: the abstain rule
                        fitted on the validation split, see ``abstain.py``)
      history.csv       one row per epoch: loss, accuracy, val_loss, val_accuracy, lr, seconds, ended_at
      report/           plots and report.json, written by ``digits_ray evaluate``

Folders are written whole into a temporary sibling and renamed into place, so a reader never sees a
half-written artifact. A crash leaves the previous artifact in place, or, in the instant between the two
renames that replace it, beside it as ``.NAME.old``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from digits_ray.errors import DigitsError
from digits_ray.schema import INPUT_CONTRACT

FORMAT = "digits-ray-model/1"
MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
HISTORY_FILE = "history.csv"
REPORT_DIR = "report"
REQUIRED_METADATA = (
    "format",
    "model",
    "model_params",
    "train_config",
    "data_md5",
    "versions",
    "training_seconds",
    "validation",
)
# Written by the entry point that keeps a model, after its one test evaluation.
TEST_METADATA = ("test_accuracy", "test_loss")
# The "not a digit" rule (``abstain.AbstainRule.to_dict()``); every writer since it exists adds it.
ABSTAIN_FIELD = "abstain"


class ArtifactError(DigitsError):
    """A folder that is not an artifact, or one that must not be replaced."""


def library_versions() -> dict[str, str]:
    import numpy
    import ray

    import digits_ray
    from digits_ray.keras_api import keras, tf  # TensorFlow through its one import point (quiet start)

    return {
        "digits_ray": digits_ray.__version__,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "tf_keras": keras.__version__,
        "ray": ray.__version__,
        "numpy": numpy.__version__,
    }


def write_json_atomic(path: Path, payload: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_artifact(folder: Path) -> bool:
    return (folder / METADATA_FILE).is_file() and (folder / MODEL_FILE).is_file()


def check_writable(out_dir: Path | str) -> None:
    """Refuse, before any training, a destination that holds something other than an artifact."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (not is_artifact(out_dir) and any(out_dir.iterdir()))):
        raise ArtifactError(f"{out_dir} exists and is not a model artifact; refusing to replace its contents")


def write_artifact(out_dir: Path | str, model, metadata: dict[str, Any], history: pd.DataFrame) -> Path:
    """Write a complete artifact folder atomically; replaces an older artifact, never other files."""
    out_dir = Path(out_dir)
    missing = [k for k in REQUIRED_METADATA if k not in metadata and k != "format"]
    if missing:
        raise ValueError(f"metadata lacks required field(s) {missing}")  # a bug in the caller
    check_writable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    from digits_ray.keras_api import save_model

    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_model(model, staging / MODEL_FILE)
        history.to_csv(staging / HISTORY_FILE, index=False)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        stamped = {"format": FORMAT, "created": created, "input": INPUT_CONTRACT}
        write_json_atomic(staging / METADATA_FILE, {**stamped, **metadata})
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def read_metadata(folder: Path | str) -> dict[str, Any]:
    folder = Path(folder)
    if not is_artifact(folder):
        raise ArtifactError(
            f"{folder} is not a model artifact: expected {MODEL_FILE} and {METADATA_FILE} in it "
            f"(made by `python -m digits_ray train --out {folder}` or jobs/train.py)"
        )
    metadata = json.loads((folder / METADATA_FILE).read_text())
    if metadata.get("format") != FORMAT:
        raise ArtifactError(f"{folder}: format {metadata.get('format')!r} is not {FORMAT!r}")
    return metadata


def update_metadata(folder: Path | str, updates: dict[str, Any]) -> dict[str, Any]:
    folder = Path(folder)
    metadata = {**read_metadata(folder), **updates}
    write_json_atomic(folder / METADATA_FILE, metadata)
    return metadata


def read_history(folder: Path | str) -> pd.DataFrame:
    return pd.read_csv(Path(folder) / HISTORY_FILE)


def load_model(folder: Path | str, compile: bool = False):
    """Load the model with Keras's safe mode on: no arbitrary code from the file runs."""
    from digits_ray.keras_api import keras

    read_metadata(folder)
    try:
        return keras.models.load_model(Path(folder) / MODEL_FILE, compile=compile, safe_mode=True)
    except (OSError, ValueError) as err:  # a corrupt or foreign file, or code that safe mode refuses to run
        raise ArtifactError(f"{Path(folder) / MODEL_FILE} could not be loaded: {err}") from err
