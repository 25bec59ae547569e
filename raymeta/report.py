"""Result tables (pandas -> Parquet via pyarrow, and Markdown) and plots (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def write_table(df: pd.DataFrame, out_dir: str | Path, stem: str = "results") -> tuple[Path, Path]:
    """Write ``df`` as ``<stem>.parquet`` (pyarrow) and ``<stem>.md``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parquet, md = out_dir / f"{stem}.parquet", out_dir / f"{stem}.md"
    df.to_parquet(parquet, engine="pyarrow", index=False)
    md.write_text(to_markdown(df) + "\n")
    return parquet, md


def to_markdown(df: pd.DataFrame) -> str:
    """Markdown table with accuracies as percentages and times in seconds."""
    shown = df.copy()
    for col in shown.columns:
        if col.endswith("_acc") or col.startswith("acc_"):
            shown[col] = shown[col].map(lambda v: f"{100 * v:.2f}" if v == v else "")
        elif shown[col].dtype.kind == "f":
            shown[col] = shown[col].map(lambda v: f"{v:.4g}" if v == v else "")
    return shown.to_markdown(index=False)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4), dpi=110)


def plot_lr_curves(
    curves: dict[str, tuple[list[float], int]], path: str | Path, title: str = ""
) -> Path:
    """One line per method: LR against epoch.

    Args:
        curves: label -> (per-step LRs, steps per epoch).
        path: PNG to write.
    """
    fig, ax = _figure()
    for label, (lrs, spe) in curves.items():
        ax.plot([i / spe for i in range(len(lrs))], lrs, label=label, lw=1.2)
    ax.set(xlabel="epoch", ylabel="learning rate", title=title or "learning-rate schedules")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    fig.clf()
    return Path(path)


def plot_accuracy_curves(
    histories: dict[str, list[dict]], path: str | Path, key: str = "test_acc"
) -> Path:
    """One line per method: ``key`` (a fraction) in percent against the 1-based epoch."""
    fig, ax = _figure()
    for label, history in histories.items():
        ax.plot(
            [h["epoch"] for h in history], [100 * h[key] for h in history], marker="o", label=label
        )
    ax.set(
        xlabel="epoch",
        ylabel=f"{key.replace('_', ' ')} (%)",
        title=f"{key.replace('_', ' ')} per epoch",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    fig.clf()
    return Path(path)
