"""The model registry: a folder of published entries and an index that says which one is served.

    ~/digits-ray/models/          (``--registry``, or $DIGITS_REGISTRY, else $DIGITS_HOME/models: paths.py)
      index.json                  {"best", "pinned", "entries": {ENTRY: summary}, "history": [...]}
      ENTRY/                      an artifact folder (the winner), plus what produced it:
        search/                   trials table (CSV + Markdown), plots, search.json
        tflite/                   float32 and int8 models, tflite.json (accuracy, size, drop)
        ensemble/                 an artifact folder: the top-k trials averaged

Which entry is served: the pinned one (``promote``), else the best (the highest validation accuracy,
never the test accuracy: the test set only reports; on a tie the newer one). A publish never replaces
a pinned entry; it only changes the best. ``rollback`` serves again the entry that was served before the
last change, so two rollbacks in a row come back. ``history`` records every change of the served entry:
what, when and who.

An entry is built whole in a hidden staging folder and renamed into place. Every change of the index
happens under one lock (``.lock``, flock), which also picks a free entry name, so writers in parallel
(two searches, a search and a promotion) never lose each other's changes. A failed or interrupted
export leaves no half entry and never changes what is served.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from digits_ray.errors import DigitsError
from digits_ray.models import artifact
from digits_ray.paths import REGISTRY_ENV, registry_default  # noqa: F401  (REGISTRY_ENV: callers name it here)

MODEL_ENV = "DIGITS_MODEL"  # a model folder that batch prediction and Serve read instead of the registry's choice
INDEX_FILE = "index.json"
FORMAT = "digits-ray-registry/1"
SEARCH_DIR, TFLITE_DIR, ENSEMBLE_DIR = "search", "tflite", "ensemble"


class RegistryError(DigitsError):
    pass


def registry_path(path: Path | str | None = None) -> Path:
    return Path(path).expanduser() if path else registry_default()


def read_index(registry: Path | str | None = None) -> dict[str, Any]:
    index = registry_path(registry) / INDEX_FILE
    if not index.is_file():
        return {"format": FORMAT, "best": None, "pinned": None, "entries": {}, "history": []}
    data = json.loads(index.read_text())
    data.setdefault("pinned", None)  # indexes written before pinning existed
    data.setdefault("history", [])
    return data


def served_name(index: dict[str, Any]) -> str | None:
    """The entry an index serves: the pinned one, else the best."""
    return index.get("pinned") or index.get("best")


def served_entry(registry: Path | str | None = None) -> Path:
    """The folder of the entry the registry serves: what Serve and batch prediction load by default."""
    folder = registry_path(registry)
    name = served_name(read_index(folder))
    if not name:
        raise RegistryError(f"the registry {folder} has no published model yet; run jobs/tune.py, or name a "
                            f"model folder")
    return folder / name


def best_entry(registry: Path | str | None = None) -> Path:
    """The folder of the best entry by validation accuracy, pinned or not."""
    folder = registry_path(registry)
    best = read_index(folder).get("best")
    if not best:
        raise RegistryError(f"the registry {folder} has no published model yet; run jobs/tune.py, or name a "
                            f"model folder")
    return folder / best


def resolve_model(model: Path | str, registry: Path | str | None = None) -> Path:
    """A model folder, or the name of an entry of ``registry``, as an absolute artifact folder."""
    given = Path(model).expanduser()
    candidates = [given] if given.is_absolute() or given.exists() else [given, registry_path(registry) / given]
    for folder in candidates:
        if artifact.is_artifact(folder):
            return folder.resolve()
    raise RegistryError(f"{model} is neither a model folder (model.keras and metadata.json in it) nor an entry "
                        f"of the registry {registry_path(registry).resolve()}; its entries: "
                        f"{', '.join(sorted(read_index(registry)['entries'])) or 'none yet'}")


def model_to_serve(folder: Path | str | None = None) -> Path:
    """The model folder to predict with: ``folder``, else $DIGITS_MODEL, else the registry's served entry."""
    chosen = folder or os.environ.get(MODEL_ENV)
    return resolve_model(chosen) if chosen else served_entry().resolve()


@contextmanager
def _locked(folder: Path) -> Iterator[dict[str, Any]]:
    """The index, under the registry's lock; written back atomically when the block ends without error."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            index = read_index(folder)
            yield index
            artifact.write_json_atomic(folder / INDEX_FILE, index)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _record(index: dict[str, Any], event: str, entry: str, served_before: str | None) -> None:
    """Append to the history when the served entry changes (and for every promotion and rollback)."""
    served = served_name(index)
    if event in ("promote", "rollback", "unpin") or served != served_before:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (some containers)
            user = str(os.getuid())
        index["history"].append({"at": _now(), "event": event, "entry": entry, "served": served,
                                 "previous": served_before, "by": f"{user}@{socket.gethostname()}"})


def entry_name(prefix: str) -> str:
    return f"{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{prefix}"


def _free_name(folder: Path, name: str, index: dict[str, Any]) -> str:
    """``name``, or ``name-2``, ``name-3``...: the first not taken (called under the lock)."""
    candidate, n = name, 1
    while candidate in index["entries"] or (folder / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def publish(registry: Path | str | None, name: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Build an entry with ``build(staging_folder) -> summary`` and publish it; returns its folder.

    The summary (it must hold ``val_accuracy``) goes into the index, which then names the best entry.
    ``name`` gets a suffix when another writer took it first. A pinned entry stays served.
    """
    folder = registry_path(registry)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".staging", dir=folder))
    try:
        summary = build(staging)
        if not artifact.is_artifact(staging) or "val_accuracy" not in summary:
            raise ValueError(f"a registry entry must be an artifact folder with a val_accuracy; got {staging}")
        with _locked(folder) as index:
            name = _free_name(folder, name, index)
            os.replace(staging, folder / name)
            served_before = served_name(index)
            index["entries"][name] = {**summary, "published": _now()}
            best = index.get("best")
            if best not in index["entries"] or summary["val_accuracy"] >= index["entries"][best]["val_accuracy"]:
                index["best"] = name
            _record(index, "publish", name, served_before)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / name


def promote(registry: Path | str | None, name: str) -> dict[str, Any]:
    """Pin ``name``: it is served whatever is published after it, until another promotion or a rollback."""
    folder = registry_path(registry)
    with _locked(folder) as index:
        if name not in index["entries"]:
            raise RegistryError(f"{name!r} is not an entry of {folder.resolve()}; entries: "
                                f"{', '.join(sorted(index['entries'])) or 'none yet'}")
        served_before = served_name(index)
        index["pinned"] = name
        _record(index, "promote", name, served_before)
        return index["history"][-1]


def unpin(registry: Path | str | None) -> dict[str, Any]:
    """Serve the best entry again, and follow it as new entries are published."""
    folder = registry_path(registry)
    with _locked(folder) as index:
        if not index["pinned"]:
            raise RegistryError(f"nothing is pinned in {folder.resolve()}: it already serves its best entry")
        served_before = served_name(index)
        index["pinned"] = None
        _record(index, "unpin", index["best"], served_before)
        return index["history"][-1]


def rollback(registry: Path | str | None) -> dict[str, Any]:
    """Serve (pinned) the entry that was served before the last change of the served entry."""
    folder = registry_path(registry)
    with _locked(folder) as index:
        current = served_name(index)
        previous = next((event["previous"] for event in reversed(index["history"])
                         if event["served"] == current and event["previous"] not in (None, current)), None)
        if previous is None:
            raise RegistryError(f"{folder.resolve()} has served no other entry before {current}: nothing to roll "
                                f"back to")
        if previous not in index["entries"]:
            raise RegistryError(f"the entry served before, {previous}, is no longer in {folder.resolve()}")
        index["pinned"] = previous
        _record(index, "rollback", previous, current)
        return index["history"][-1]


def entries_table(registry: Path | str | None = None) -> list[dict[str, Any]]:
    """One row per entry, oldest first: its figures and whether it is served, pinned or best."""
    index = read_index(registry)
    served = served_name(index)
    rows = []
    for name, summary in sorted(index["entries"].items(), key=lambda item: item[1].get("published", "")):
        marks = [mark for mark, on in (("served", name == served), ("pinned", name == index["pinned"]),
                                       ("best", name == index["best"])) if on]
        rows.append({"entry": name, "model": summary.get("model"), "val_accuracy": summary.get("val_accuracy"),
                     "test_accuracy": summary.get("test_accuracy"), "published": summary.get("published"),
                     "status": ",".join(marks)})
    return rows
