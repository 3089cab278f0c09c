"""Helpers shared by the bench scripts: where results go, how they are saved and printed."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from digits_ray.models.artifact import library_versions, write_json_atomic  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            **library_versions()}


def save(name: str, payload: dict[str, Any]) -> Path:
    """Write bench/results/NAME.json (atomically) with the command and machine it came from."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    write_json_atomic(path, {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **payload,
    })
    return path


def save_text(name: str, text: str) -> Path:
    """Write bench/results/NAME atomically (a reader never sees half a report)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    partial = RESULTS / f".{name}.tmp"
    partial.write_text(text)
    os.replace(partial, path)
    return path


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """``columns``: (key, header) pairs; floats printed as they come (format them before)."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)
