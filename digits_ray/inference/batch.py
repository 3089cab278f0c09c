"""Batch prediction of image files to a CSV: a few files in this process, a folder through Ray Data.

A folder is read with ``ray.data.read_binary_files`` and predicted by ``map_batches`` on an autoscaling
actor pool, each actor holding one ``Predictor``: the same command handles a million files on a
cluster. A file that cannot be read as a digit gets a row with its error, never disappears. A model
with an abstain rule adds the columns ``abstain`` ("not a digit") and ``abstain_score``.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from digits_ray.inference.images import ImageError, image_to_mnist
from digits_ray.inference.predictor import Predictor
from digits_ray.models import abstain, artifact

COLUMNS = ("file", "digit", "confidence", "top3", "error")
ABSTAIN_COLUMNS = ("abstain", "abstain_score")  # after "top3", where the model has an abstain rule
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "gif", "bmp", "tif", "tiff", "webp", "pgm", "ppm")
ROWS_PER_BATCH = 256


def top3_text(top3: list[dict[str, Any]]) -> str:
    """``7:0.9981 1:0.0012 9:0.0003``: the three likeliest digits with their probabilities."""
    return " ".join(f"{t['digit']}:{t['probability']:.4f}" for t in top3)


def columns(model_dir: Path | str) -> tuple[str, ...]:
    """The CSV's columns for this model: the abstain columns where its artifact has a rule."""
    if abstain.rule_in(artifact.read_metadata(model_dir)) is None:
        return COLUMNS
    return (*COLUMNS[:4], *ABSTAIN_COLUMNS, *COLUMNS[4:])


def predict_bytes(predictor: Predictor, names: Sequence[str],
                  payloads: Sequence[bytes | ImageError]) -> list[dict[str, Any]]:
    """One CSV row per file, in the given order; unreadable files get their error and no digit."""
    images, readable, rows = [], [], []
    empty = {column: None for column in ABSTAIN_COLUMNS} if predictor.abstain_rule is not None else {}
    for name, data in zip(names, payloads):
        row = {"file": name, "digit": None, "confidence": None, "top3": "", **empty, "error": ""}
        try:
            if isinstance(data, ImageError):
                raise data
            images.append(image_to_mnist(data))
            readable.append(row)
        except ImageError as err:
            row["error"] = str(err)
        rows.append(row)
    for row, prediction in zip(readable, predictor.predict(np.stack(images)) if images else []):
        row.update(digit=prediction["digit"], confidence=round(prediction["confidence"], 6),
                   top3=top3_text(prediction["top3"]))
        if "abstain" in prediction:
            row.update(abstain=prediction["abstain"], abstain_score=round(prediction["abstain_score"], 4))
    return rows


class PredictFiles:
    """Ray Data actor: loads the predictor once, then turns batches of file bytes into CSV rows."""

    def __init__(self, model_dir: str, tf_threads: int) -> None:
        from digits_ray.keras_api import limit_threads

        limit_threads(tf_threads)
        self.predictor = Predictor.from_artifact(model_dir)
        self.columns = columns(model_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        rows = predict_bytes(self.predictor, [str(p) for p in batch["path"]], list(batch["bytes"]))
        return {column: [row[column] for row in rows] for column in self.columns}


def write_rows(out: Path, rows: Iterable[dict[str, Any]], fields: Sequence[str] = COLUMNS) -> int:
    """Stream rows (with the columns ``fields``) into ``out`` atomically (a temporary sibling renamed at the
    end); returns the count."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields))
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
                count += 1
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _read(path: Path) -> bytes | ImageError:
    try:
        return path.read_bytes()
    except OSError as err:
        return ImageError(f"cannot read the file: {err.strerror}")


def predict_paths(model_dir: Path, paths: Sequence[Path]) -> list[dict[str, Any]]:
    """A few files, in this process (no Ray)."""
    predictor = Predictor.from_artifact(model_dir)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(paths), ROWS_PER_BATCH):
        chunk = paths[start: start + ROWS_PER_BATCH]
        rows.extend(predict_bytes(predictor, [str(p) for p in chunk], [_read(p) for p in chunk]))
    return rows


def has_images(folder: Path) -> bool:
    """Whether ``folder`` holds a file ``predict_folder`` reads; stops at the first one."""
    return any(p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file() for p in folder.rglob("*"))


def predict_folder(model_dir: Path, folder: Path, max_actors: int | None = None,
                   cpus_per_actor: float = 1.0) -> Iterator[dict[str, Any]]:
    """Every image file under ``folder`` (recursively, by extension), through Ray Data; rows in path order."""
    import ray

    from digits_ray.data.ray_backend import quiet_data_progress

    quiet_data_progress()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = max_actors or max(1, int(cluster_cpus // cpus_per_actor))
    files = ray.data.read_binary_files(str(folder), include_paths=True, file_extensions=list(IMAGE_EXTENSIONS))
    rows = files.map_batches(
        PredictFiles,
        fn_constructor_kwargs={"model_dir": str(model_dir), "tf_threads": max(1, int(cpus_per_actor))},
        batch_size=ROWS_PER_BATCH,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=cpus_per_actor,
    )
    for batch in rows.iter_batches(batch_size=ROWS_PER_BATCH, batch_format="pandas"):
        for record in batch.to_dict("records"):
            yield {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in record.items()}
