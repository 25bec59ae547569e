"""The transfer suite (the ``suite`` section; ``benchmarks/transfer_suite.py``): the benchmark a
learned LR schedule must win to earn its place.

On every task of the suite, a full schedule comparison (:class:`raymeta.tune.compare.Comparison`)
runs in its own folder ``output_dir/<task name>``: the frozen learned schedule (MLR-SNet (Test),
no search on the task), the searched hand-designed families (Ray Tune + Optuna, momentum
searched) and, when the search names them, the online schedule learners (PBT, PB2), each
re-trained with ``seeds`` seeds on train + validation and tested on the test split.

Per task the verdict compares the learned row with the best searched family, *chosen by the
family's best validation accuracy in its search* (choosing it by test accuracy would select on
the test split): ``win`` when the learned mean test accuracy is at least the family's,
``within`` when it trails by at most ``tolerance``, ``loss`` otherwise. The suite meets its
target with at least ``wins_target`` wins and no loss. The online rows (PBT, PB2) are shown
for reference only: they are not part of the verdict (the target compares the frozen learned
schedule with the best searched hand-designed family).

The verdict table (``transfer_suite.{parquet,md}``, also printed) gives accuracies in percent
(columns ``... (%)``) and the difference in points (``diff (points)``); a standard deviation
over one seed is missing there and ``n/a (1 seed)`` in the per-task lines.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from raymeta.config import PipelineConfig, TransferSuiteConfig
from raymeta.console import stage
from raymeta.report import to_markdown, write_table
from raymeta.session import Session

#: rows of a comparison that are not searched hand-designed families
ONLINE_ROWS = ("PBT", "PB2")


def task_verdict(table: pd.DataFrame, learned: str, tolerance: float) -> dict[str, Any]:
    """The verdict of one comparison table (:meth:`Comparison.run`'s: one row per method).

    Args:
        table: columns ``method``, ``test_acc_mean``, ``test_acc_std``, ``search_trials``,
            ``search_compute_s``, ``best_val_acc`` (None/NaN for unsearched rows).
        learned: the learned row's ``method``.
        tolerance: allowed shortfall (fraction, 0.003 = 0.3 points) for ``within``.

    Returns:
        learned and best-family accuracies (mean, std), the family's name (selected by
        ``best_val_acc``), ``diff`` (learned - family, fraction), the family's search trials
        and compute, the online rows' accuracies, and ``verdict``.

    Raises:
        ValueError: the table has no learned row or no searched family.
    """
    rows = table.set_index("method")
    if learned not in rows.index:
        raise ValueError(f"the comparison has no row {learned!r}")
    searched = rows[rows["best_val_acc"].notna() & ~rows.index.isin(ONLINE_ROWS)]
    if searched.empty:
        raise ValueError("the comparison has no searched family")
    family = searched["best_val_acc"].astype(float).idxmax()
    mine, best = rows.loc[learned], rows.loc[family]
    diff = float(mine["test_acc_mean"] - best["test_acc_mean"])
    verdict = "win" if diff >= 0 else ("within" if -diff <= tolerance else "loss")
    out = {
        "learned_mean": mine["test_acc_mean"],
        "learned_std": mine["test_acc_std"],
        "family": family,
        "family_mean": best["test_acc_mean"],
        "family_std": best["test_acc_std"],
        "diff": diff,
        "family_trials": int(best["search_trials"]),
        "family_compute_s": float(best["search_compute_s"]),
        "verdict": verdict,
    }
    for name in ONLINE_ROWS:
        if name in rows.index:
            out[f"{name.lower()}_mean"] = rows.loc[name, "test_acc_mean"]
            out[f"{name.lower()}_std"] = rows.loc[name, "test_acc_std"]
            out[f"{name.lower()}_compute_s"] = float(rows.loc[name, "search_compute_s"])
    return out


def suite_verdict(verdicts: pd.DataFrame, suite: TransferSuiteConfig) -> str:
    """One line: the suite's target met or not, with the counts and the worst gap."""
    wins = int((verdicts["verdict"] == "win").sum())
    losses = int((verdicts["verdict"] == "loss").sum())
    met = wins >= suite.wins_target and losses == 0
    worst = verdicts["diff"].min()
    return (
        f"target {'MET' if met else 'NOT MET'}: learned schedule wins {wins} of {len(verdicts)} "
        f"tasks (needed {suite.wins_target}), {losses} beyond {100 * suite.tolerance:.1f} points "
        f"behind; worst difference {100 * worst:+.2f} points"
    )


def run_transfer_suite(cfg: PipelineConfig, session: Session) -> pd.DataFrame:
    """Run (or resume) every task's comparison of ``cfg.suite`` in ``session`` and return the
    verdicts (one row per task, :func:`task_verdict`'s keys, accuracies as fractions; written
    in percent as ``transfer_suite.{parquet,md}`` in the output folder, :func:`verdict_table`).
    Each task's comparison keeps its own folder (``output_dir/<task>``, with its resume state)
    and its MLflow run ``compare/<task>``, nested under the active (pipeline) run."""
    from raymeta.tune.compare import Comparison

    suite = cfg.suite
    rows = []
    for task in suite.tasks:
        stage(f"transfer suite: task {task.name}")
        sub_cfg = cfg.model_copy(update={"compare": suite.compare(task)})
        sub = dataclasses.replace(
            session,
            name=f"{session.name}/{task.name}",
            output_dir=session.output_dir / task.name,
            scope=task.name,
        )
        sub.output_dir.mkdir(parents=True, exist_ok=True)
        table = Comparison(sub_cfg).run(sub)
        rows.append(
            {"task": task.name, **task_verdict(table, suite.learned.label, suite.tolerance)}
        )
    verdicts = pd.DataFrame(rows)
    shown = verdict_table(verdicts, suite.seeds)
    write_table(shown, session.output_dir, "transfer_suite")
    print("\n" + to_markdown(shown) + "\n")
    for row in verdicts.itertuples():
        print(task_line(row._asdict(), suite.seeds))
    if suite.smoke:
        print(SMOKE_LINE)
    print(suite_verdict(verdicts, suite))
    return verdicts


SMOKE_LINE = "smoke run: tiny budgets, the numbers mean nothing"


def verdict_table(verdicts: pd.DataFrame, seeds: int) -> pd.DataFrame:
    """The verdicts as written and printed: means and standard deviations (columns
    ``*_mean``, ``*_std``: fractions) in percent as ``<column> (%)``, ``diff`` in points as
    ``diff (points)``, the other columns as they are. With one seed the standard deviations
    are missing (NaN), not 0."""
    shown = {}
    for col, values in verdicts.items():
        if col.endswith(("_mean", "_std")):
            missing = col.endswith("_std") and seeds == 1
            shown[f"{col} (%)"] = float("nan") if missing else 100 * values.astype(float)
        elif col == "diff":
            shown["diff (points)"] = 100 * values
        else:
            shown[col] = values
    return pd.DataFrame(shown)


def task_line(v: dict[str, Any], seeds: int) -> str:
    """One task's verdict as a line: both rows' mean +- std over ``seeds`` seeds (%; with one
    seed ``n/a (1 seed)``), the difference, the family's search cost, the online rows (for
    reference: not in the verdict) and the verdict."""

    def pct(mean, std):
        spread = "n/a (1 seed)" if seeds == 1 else f"+- {100 * std:.2f}"
        return f"{100 * mean:.2f} {spread}"

    online = "".join(
        f", {name} {pct(v[f'{name.lower()}_mean'], v[f'{name.lower()}_std'])} (reference)"
        for name in ONLINE_ROWS
        if f"{name.lower()}_mean" in v
    )
    return (
        f"{v['task']}: learned {pct(v['learned_mean'], v['learned_std'])} vs {v['family']} "
        f"{pct(v['family_mean'], v['family_std'])} ({100 * v['diff']:+.2f} points; search "
        f"{v['family_trials']} trials, {v['family_compute_s']:.0f} CPU-s){online} -> "
        f"{v['verdict']}"
    )
