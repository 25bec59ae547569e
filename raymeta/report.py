"""Result tables (pandas -> Parquet via pyarrow, and Markdown) and plots (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def write_table(
    df: pd.DataFrame, out_dir: str | Path, stem: str = "results", markdown: str | None = None
) -> tuple[Path, Path]:
    """Write ``df`` as ``<stem>.parquet`` (pyarrow) and ``<stem>.md`` (``markdown`` if given,
    else :func:`to_markdown` of ``df``); returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parquet, md = out_dir / f"{stem}.parquet", out_dir / f"{stem}.md"
    df.to_parquet(parquet, engine="pyarrow", index=False)
    md.write_text((to_markdown(df) if markdown is None else markdown) + "\n")
    return parquet, md


def to_markdown(df: pd.DataFrame) -> str:
    """Markdown table with accuracies as percentages and times in seconds; columns already in
    percent or points (named ``... (%)``, ``... (points)``) with two decimals."""
    shown, names = df.copy(), {}
    for col in shown.columns:
        if "_acc" in col or col.startswith("acc_"):
            shown[col] = shown[col].map(lambda v: f"{100 * v:.2f}" if v == v else "-")
            names[col] = f"{col} (%)"
        elif col.endswith((" (%)", " (points)")):
            shown[col] = shown[col].map(lambda v: f"{v:.2f}" if v == v else "-")
        elif shown[col].dtype.kind == "f":
            shown[col] = shown[col].map(lambda v: f"{v:.4g}" if v == v else "-")
        elif shown[col].dtype.kind == "O":
            shown[col] = shown[col].map(lambda v: "-" if v is None or v != v else v)
    return shown.rename(columns=names).to_markdown(index=False)


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
    histories: dict[str, list[dict]], path: str | Path, key: str = "test_acc", title: str = ""
) -> Path:
    """One line per method: ``key`` (a fraction) in percent against the 1-based epoch."""
    fig, ax = _figure()
    for label, history in histories.items():
        ax.plot(
            [h["epoch"] for h in history], [100 * h[key] for h in history], marker="o", label=label
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel=f"{key.replace('_', ' ')} (%)", title=title or f"{key} per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    fig.clf()
    return Path(path)


SHOT_METRICS = {"overall": "top1_acc", "many": "many_acc", "medium": "medium_acc", "few": "few_acc"}


def summarise(
    df: pd.DataFrame, by: list[str], metrics: dict[str, str] | None = None
) -> pd.DataFrame:
    """Mean and sample standard deviation over seeds (the rows of each ``by`` group); NaN
    values (a dead run's accuracies, a shot group with no class) are left out.

    Args:
        df: one row per run, with the ``metrics`` columns (fractions) and optionally ``dead``
            (bool: the dead-run guard stopped the run).
        by: the grouping columns (e.g. target, imbalance factor, method), kept in order of
            first appearance.
        metrics: display name -> column (default :data:`SHOT_METRICS`: overall top-1 and
            many / medium / few-shot accuracy).

    Returns:
        One row per group: the ``by`` columns, ``seeds`` (runs in the group), ``dead`` (its
        dead runs, when ``df`` has the column) and ``acc_{name}_mean`` / ``acc_{name}_std``
        (fractions over the live runs; std is NaN for one).
    """
    metrics = metrics or SHOT_METRICS
    groups = df.groupby(by, sort=False, dropna=False)
    out = groups.size().rename("seeds").to_frame()
    if "dead" in df:
        out["dead"] = groups["dead"].sum().astype(int)
    for name, col in metrics.items():
        out[f"acc_{name}_mean"] = groups[col].mean()
        out[f"acc_{name}_std"] = groups[col].std(ddof=1)
    return out.reset_index()


def summary_markdown(
    summary: pd.DataFrame, sections: list[str], label: str = "method", title=None
) -> str:
    """Markdown tables of :func:`summarise`'s output, one per value of the ``sections``
    columns: a row per ``label``, a column per metric as ``mean ± std`` in percent; where a
    table has dead runs, a ``dead`` column (``1 of 3``: dead runs of the row's seeds, left out
    of its means).

    Args:
        title: ``section values -> heading`` (default: the values joined by ", ").
    """
    names = [c.removeprefix("acc_").removesuffix("_mean") for c in summary if c.endswith("_mean")]
    parts = []
    for key, part in summary.groupby(sections, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        heading = title(*key) if title else ", ".join(str(k) for k in key)
        rows = {label: part[label].tolist()}
        for n in names:
            pairs = zip(part[f"acc_{n}_mean"], part[f"acc_{n}_std"], strict=True)
            rows[n] = [_mean_std(m, s) for m, s in pairs]
        counts = sorted(set(part["seeds"]))
        seeds = ", ".join(str(v) for v in counts) + (" seed" if counts == [1] else " seeds")
        if "dead" in part and part["dead"].any():
            rows["dead"] = [f"{d} of {n}" for d, n in zip(part["dead"], part["seeds"], strict=True)]
            seeds += ", dead runs left out"
        table = pd.DataFrame(rows).to_markdown(index=False)
        parts.append(f"#### {heading} (top-1 %, mean ± std over {seeds})\n\n{table}")
    return "\n\n".join(parts)


def _mean_std(mean: float, std: float) -> str:
    if mean != mean:
        return ""
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std == std else "")


def plot_per_class(
    panels: dict[str, dict[str, list[float]]],
    xlabels: dict[str, list[str]],
    path: str | Path,
    title: str = "per-class test accuracy",
) -> Path:
    """Per-class accuracy curves: one panel per task (3 per row), one line per method (the
    same colour in every panel).

    Args:
        panels: panel title -> method -> accuracy (fraction) per class position, head first.
        xlabels: panel title -> the tick label of every class position.
        path: PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for lines in panels.values() for m in lines))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    n = len(panels)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(5.5 * cols + 2, 4.2 * rows),
        dpi=110,
        squeeze=False,
        layout="constrained",
    )
    for ax, (name, lines) in zip(list(axes.flat)[:n], panels.items(), strict=True):
        for method, accs in lines.items():
            ax.plot(
                range(len(accs)),
                [100 * a for a in accs],
                marker="o",
                ms=3,
                color=colours[method],
                label=method,
            )
        ax.set_xticks(range(len(xlabels[name])), xlabels[name], rotation=60, fontsize=7)
        ax.set(title=name, ylabel="test accuracy (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colours[m], marker="o", ms=3) for m in methods]
    fig.legend(handles, methods, loc="outside right upper", fontsize=8)  # off the tail classes
    fig.suptitle(title)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
