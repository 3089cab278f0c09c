"""PNG plots for reports and benchmarks; each is written atomically (temp file, then rename)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def history(frame: pd.DataFrame, path: Path) -> Path:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = frame["epoch"] if "epoch" in frame else np.arange(1, len(frame) + 1)
    for key, ax in (("loss", ax_loss), ("accuracy", ax_acc)):
        ax.plot(epochs, frame[key], marker="o", label="train")
        if f"val_{key}" in frame:
            ax.plot(epochs, frame[f"val_{key}"], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


def confusion(matrix: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    shown = ax.imshow(np.log1p(matrix), cmap="Blues")
    fig.colorbar(shown, ax=ax, label="log(1 + count)")
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                    color="white" if row == col else "black")
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({matrix.trace()}/{matrix.sum()} correct)")
    return save(fig, path)


def digit_grid(images: np.ndarray, labels: np.ndarray, probs: np.ndarray, indices: Sequence[int],
               path: Path, title: str) -> Path:
    """Up to 25 digits, each captioned with prediction, confidence and (if wrong) the truth."""
    cols = 5
    rows = max(1, -(-len(indices) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.7, rows * 1.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, indices):
        pred = int(probs[i].argmax())
        ax.imshow(images[i], cmap="gray_r")
        right = pred == labels[i]
        caption = f"{pred} ({probs[i, pred]:.0%})" + ("" if right else f"\ntrue {labels[i]}")
        ax.set_title(caption, fontsize=9, color="black" if right else "crimson")
    if not len(indices):
        axes.flat[0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.suptitle(title)
    return save(fig, path)


def bar_chart(names: Sequence[str], values: Sequence[float], path: Path, title: str, ylabel: str,
              reference: Sequence[float | None] | None = None, value_format: str = "{:.2f}") -> Path:
    """Bars for measured values; optional hollow bars beside them for published reference figures."""
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 1.3), 4))
    x = np.arange(len(names))
    width = 0.4 if reference is not None else 0.6
    bars = ax.bar(x, values, width, label="measured")
    ax.bar_label(bars, labels=[value_format.format(v) for v in values], fontsize=8)
    if reference is not None:
        ref = [np.nan if r is None else r for r in reference]
        ax.bar(x + width, ref, width, fill=False, hatch="//", label="published")
        ax.legend()
    ax.set_xticks(x + (width / 2 if reference is not None else 0), names, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    finite = [v for v in list(values) + list(reference or []) if v is not None and np.isfinite(v)]
    if finite and min(finite) > 0.9 and max(finite) <= 1.0:  # accuracies: zoom in on the top
        ax.set_ylim(min(finite) - 0.005, 1.0)
    return save(fig, path)


def augment_preview(columns: Sequence[np.ndarray], labels: np.ndarray, path: Path, cfg) -> Path:
    """Rows: digits; first column the original, then one augmented version per epoch."""
    rows, cols = len(labels), len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.15), squeeze=False)
    for c, images in enumerate(columns):
        for r in range(rows):
            ax = axes[r, c]
            ax.imshow(images[r], cmap="gray_r", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"epoch {c - 1}", fontsize=8)
    for r in range(rows):
        axes[r, 0].set_ylabel(f"label {labels[r]}", fontsize=8)
    fig.suptitle(f"rotation ±{cfg.rotation_deg:g}°, shift ±{cfg.shift:.0%}, zoom ±{cfg.zoom:.0%}, "
                 f"elastic {cfg.elastic_alpha:g} px", fontsize=9)
    return save(fig, path)
