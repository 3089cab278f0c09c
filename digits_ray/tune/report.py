"""The search report: trials table (CSV + Markdown) and plots, written into a registry entry.

The batch-size plot answers the seed projects' batch-size study with measured data: every trial's
best validation accuracy against its global batch, per architecture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from digits_ray import plots

TABLE_COLUMNS = ("trial_id", "model", "batch_size", "learning_rate", "schedule", "augment", "val_accuracy",
                 "val_loss", "best_epoch", "epochs_run", "training_seconds", "error")


def markdown(table: pd.DataFrame) -> str:
    shown = table[[c for c in TABLE_COLUMNS if c in table]].copy()
    shown["learning_rate"] = shown["learning_rate"].map("{:.2e}".format)
    shown["val_accuracy"] = shown["val_accuracy"].map("{:.2%}".format)
    shown["val_loss"] = shown["val_loss"].map("{:.4f}".format)
    shown["training_seconds"] = shown["training_seconds"].map("{:.0f}".format)
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _scatter(table: pd.DataFrame, column: str, path: Path, title: str, xlabel: str, base: int) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    full = table["epochs_run"] >= table["epochs_run"].max()
    for i, (model, group) in enumerate(table.groupby("model")):
        done = full[group.index]
        ax.scatter(group[column][done], group["val_accuracy"][done], color=f"C{i}", label=model, alpha=0.85)
        ax.scatter(group[column][~done], group["val_accuracy"][~done], facecolors="none", edgecolors=f"C{i}",
                   alpha=0.85)
    ax.scatter([], [], facecolors="none", edgecolors="gray", label="stopped early (ASHA or the budget)")
    ax.set_xscale("log", base=base)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("best validation accuracy")
    ax.set_title(title)
    low = table["val_accuracy"].quantile(0.1) if len(table) > 3 else table["val_accuracy"].min()
    ax.set_ylim(max(0.0, low - 0.01), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plots.save(fig, path)


def trial_curves(histories: dict[str, pd.DataFrame], models: dict[str, str], path: Path) -> Path:
    """Every trial's validation accuracy per epoch; a curve that ends early is a trial ASHA stopped."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {m: f"C{i}" for i, m in enumerate(sorted(set(models.values())))}
    for trial_id, history in histories.items():
        color = colors[models[trial_id]]
        ax.plot(history["epoch"], history["val_accuracy"], color=color, alpha=0.6, lw=1)
        ax.scatter(history["epoch"].iloc[-1:], history["val_accuracy"].iloc[-1:], color=color, s=12)
    for model, color in colors.items():
        ax.plot([], [], color=color, label=model)
    values = np.concatenate([h["val_accuracy"].to_numpy() for h in histories.values()]) if histories else [0.9]
    bottom = max(0.0, float(np.quantile(values, 0.1)) - 0.01)  # the top matters; say what falls below
    ax.set_ylim(bottom, 1.0)
    below = sum(float(h["val_accuracy"].max()) < bottom for h in histories.values())
    if below:
        ax.text(0.01, 0.02, f"{below} trial(s) below {bottom:.0%} not shown", transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Every trial's validation curve (a dot ends each trial: early ends are ASHA's stops)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return plots.save(fig, path)


def write(table: pd.DataFrame, histories: dict[str, pd.DataFrame], out: Path) -> list[str]:
    """Trials table and the search plots into ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "trials.csv", index=False)
    (out / "trials.md").write_text(markdown(table))
    _scatter(table, "batch_size", out / "val_accuracy_vs_batch_size.png",
             "Validation accuracy vs global batch size", "global batch size", 2)
    _scatter(table, "learning_rate", out / "val_accuracy_vs_learning_rate.png",
             "Validation accuracy vs peak learning rate", "peak learning rate", 10)
    best = table.groupby("model")["val_accuracy"].max().sort_values(ascending=False)
    plots.bar_chart(list(best.index), list(best.values), out / "best_per_architecture.png",
                    "Best validation accuracy per architecture", "validation accuracy", value_format="{:.2%}")
    trial_curves(histories, dict(zip(table["trial_id"], table["model"])), out / "trial_curves.png")
    return sorted(p.name for p in out.iterdir())

