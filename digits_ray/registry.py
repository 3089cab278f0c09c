"""The model registry: a folder of published entries and an index that names the current best.

    models/                       (``--registry``, or $DIGITS_REGISTRY)
      index.json                  {"best": ENTRY, "entries": {ENTRY: summary}}
      ENTRY/                      an artifact folder (the winner), plus what produced it:
        search/                   trials table (CSV + Markdown), plots, search.json
        tflite/                   float32 and int8 models, tflite.json (accuracy, size, drop)
        ensemble/                 an artifact folder: the top-k trials averaged

An entry is built whole in a hidden staging folder and renamed into place; the index is replaced
atomically after that, under a lock. A failed or interrupted export leaves no half entry and never
changes "best". The best entry is the one with the highest validation accuracy (never the test
accuracy: the test set only reports); on a tie the newer one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from digits_ray import artifact
from digits_ray.errors import DigitsError

REGISTRY_ENV = "DIGITS_REGISTRY"
MODEL_ENV = "DIGITS_MODEL"  # a model folder that batch prediction and Serve read instead of the registry's best
DEFAULT_REGISTRY = Path("models")
INDEX_FILE = "index.json"
FORMAT = "digits-ray-registry/1"
SEARCH_DIR, TFLITE_DIR, ENSEMBLE_DIR = "search", "tflite", "ensemble"


class RegistryError(DigitsError):
    pass


def registry_path(path: Path | str | None = None) -> Path:
    return Path(path or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY).expanduser()


def read_index(registry: Path | str | None = None) -> dict[str, Any]:
    index = registry_path(registry) / INDEX_FILE
    if not index.is_file():
        return {"format": FORMAT, "best": None, "entries": {}}
    return json.loads(index.read_text())


def best_entry(registry: Path | str | None = None) -> Path:
    """The folder of the current best entry: what Serve loads when it is given no model."""
    folder = registry_path(registry)
    best = read_index(folder).get("best")
    if not best:
        raise RegistryError(f"the registry {folder} has no published model yet; run jobs/tune.py, or name a "
                            f"model folder")
    return folder / best


def model_to_serve(folder: Path | str | None = None) -> Path:
    """The model folder to predict with: ``folder``, else $DIGITS_MODEL, else the registry's best entry."""
    chosen = folder or os.environ.get(MODEL_ENV)
    return (Path(chosen).expanduser() if chosen else best_entry()).resolve()


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def entry_name(prefix: str) -> str:
    return f"{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{prefix}"


def publish(registry: Path | str | None, name: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Build an entry with ``build(staging_folder) -> summary`` and publish it; returns its folder.

    The summary (it must hold ``val_accuracy``) goes into the index, which then names the best entry.
    """
    folder = registry_path(registry)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    if target.exists():
        raise RegistryError(f"{target} already exists; entries are never overwritten")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".staging", dir=folder))
    try:
        summary = build(staging)
        if not artifact.is_artifact(staging) or "val_accuracy" not in summary:
            raise ValueError(f"a registry entry must be an artifact folder with a val_accuracy; got {staging}")
        with _locked(folder):
            os.replace(staging, target)
            index = read_index(folder)
            index["entries"][name] = {**summary, "published": datetime.now(UTC).isoformat(timespec="seconds")}
            best = index.get("best")
            if best not in index["entries"] or summary["val_accuracy"] >= index["entries"][best]["val_accuracy"]:
                index["best"] = name
            artifact.write_json_atomic(folder / INDEX_FILE, index)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
