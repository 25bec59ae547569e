"""Transfer studies at scale (``raymeta study FILE [--resume]``, ``raymeta report DIR``); not to
be confused with the long-tail study (:mod:`raymeta.longtail_study`).

A study applies learned and hand-designed schedules to a grid of tasks: the product of its
``axes`` (any :class:`~raymeta.config.TaskConfig` field: dataset, model, batch size, epochs,
label noise, seed, ...) and its ``methods``, plus hand-listed ``extra_tasks`` (e.g. the text
task), minus ``exclude`` rules. It runs as **one** Ray Tune experiment (a grid, one trial per
task, ``max_concurrent`` at once with per-task resources) and appends one Parquet row per
finished task to a dataset at ``results`` (a local path or any pyarrow filesystem URI such as
``s3://bucket/study``). ``--resume`` restores the experiment: finished tasks are not run again
(a task whose row exists is also skipped). MLflow: the run ``study`` (under the pipeline's
run), a nested run per task, ``study/<method>/<setting>/seed<k>``, with the flat tags of every
training run (``stage`` = ``study``, ``method``, ``family``, ``seed``, ``task``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from raymeta.config import MethodConfig, PipelineConfig, TaskConfig, TransferStudyConfig, parse
from raymeta.errors import ConfigError
from raymeta.session import Session
from raymeta.spec import LearnedRun, method_run
from raymeta.tune.common import TrialRun

TASK_LOG = "task_starts.jsonl"
STATE_FILE = "study_state.json"
AXIS_COLUMNS = ("dataset", "model", "batch_size", "epochs", "noise_type", "noise_rate", "seed")


def expand(study: TransferStudyConfig) -> list[dict[str, Any]]:
    """The study's tasks: ``{"id", "task": TaskConfig dict, "method": MethodConfig dict}``.

    Raises:
        ConfigError: an axis value or an exclusion names an unknown key or gives a task
            that fails validation (the message names the axis values).
    """
    fields = set(TaskConfig.model_fields)
    for key in study.axes:
        if key not in fields:
            raise ConfigError(
                f"study.axes.{key}: unknown axis; accepted: {', '.join(sorted(fields))}"
            )
    for i, rule in enumerate(study.exclude):
        unknown = set(rule) - fields - {"method"}
        if unknown:
            raise ConfigError(f"study.exclude[{i}]: unknown key(s) {sorted(unknown)}")
    combos = [
        dict(zip(study.axes, values, strict=True))
        for values in itertools.product(*study.axes.values())
    ]
    combos += [dict(extra) for extra in study.extra_tasks]
    tasks = []
    for combo in combos:
        where = "study task " + ", ".join(f"{k}={v}" for k, v in combo.items())
        task = parse(TaskConfig, {**study.base_task.model_dump(), **combo}, where)
        for method in study.methods:
            if _excluded(study.exclude, task, method):
                continue
            key = json.dumps(
                [task.model_dump(mode="json"), method.model_dump(mode="json")], sort_keys=True
            )
            tasks.append(
                {
                    "id": hashlib.sha1(key.encode()).hexdigest()[:12],
                    "task": task.model_dump(mode="json"),
                    "method": method.model_dump(mode="json"),
                }
            )
    if not tasks:
        raise ConfigError("the study expands to no task (check axes, methods and exclude)")
    return tasks


def _excluded(rules: list[dict[str, Any]], task: TaskConfig, method: MethodConfig) -> bool:
    """Whether a rule matches: every key equal (a dict value, e.g. ``label_noise``, matches
    when its items are a subset of the task's)."""
    values = {**task.model_dump(mode="json"), "method": method.label}

    def match(key, wanted):
        have = values.get(key)
        if isinstance(wanted, dict) and isinstance(have, dict):
            return all(have.get(k) == v for k, v in wanted.items())
        return have == wanted

    return any(all(match(k, v) for k, v in rule.items()) for rule in rules)


def results_location(uri: str):
    """``(pyarrow filesystem, path)`` of a results location (local path or URI)."""
    from pyarrow import fs

    if "://" not in uri:
        Path(uri).mkdir(parents=True, exist_ok=True)
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    filesystem, path = fs.FileSystem.from_uri(uri)
    filesystem.create_dir(path, recursive=True)
    return filesystem, path


def read_results(uri: str) -> pd.DataFrame:
    """All rows of a study's Parquet dataset (one row per finished task), sorted by task id.
    Rows of different task kinds have different metric columns (accuracy vs perplexity): the
    schemas are unified, missing values become NaN, no column is dropped."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import fs

    filesystem, path = results_location(uri)
    files = sorted(
        f.path
        for f in filesystem.get_file_info(fs.FileSelector(path))
        if f.path.endswith(".parquet")
    )
    if not files:
        return pd.DataFrame()
    tables = [pq.read_table(f, filesystem=filesystem) for f in files]
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


def _row(entry: dict, metrics: dict, wall: float, version: str | None) -> dict[str, Any]:
    task, method = entry["task"], entry["method"]
    noise = task.get("label_noise") or {}
    row = {
        "task_id": entry["id"],
        "dataset": task["dataset"],
        "model": task["model"],
        "batch_size": task["batch_size"],
        "epochs": task["epochs"],
        "noise_type": noise.get("type", "none"),
        "noise_rate": float(noise.get("rate", 0.0)),
        "seed": task["seed"],
        "method": method["name"] or method["schedule"],
        "meta_learner_version": version,
        "wall_time_s": wall,
    }
    for key in ("test_acc", "test_loss", "val_acc", "test_ppl", "test_bpc", "val_ppl"):
        if key in metrics:
            row[key] = float(metrics[key])
    return row


def _study_run(config: dict, number: int) -> TrialRun:
    """The MLflow run of a study task: ``study/<method>/<setting>/seed<k>``, where the setting
    is ``dataset/model/b<batch size>/<epochs>ep``, plus the label noise if any."""
    entry = config["entry"]
    task = TaskConfig(**entry["task"])
    method = MethodConfig(**entry["method"])
    spec = method_run(method, task)
    setting = f"{task.dataset}/{task.model}/b{task.batch_size}/{task.epochs}ep"
    if task.label_noise is not None:
        setting += f"/{task.label_noise.type}{task.label_noise.rate:g}"
    name = f"study/{method.label}/{setting}/seed{task.seed}"
    return TrialRun.of(spec, "study", method.label, name=name)


def _study_trainable(config: dict, meta_learners: dict[str, tuple[Any, str | None]]) -> None:
    """One transfer-study task: train it, report every epoch, append its Parquet row.

    ``config["entry"]``: an entry of :func:`expand`; ``meta_learners``: the registered
    meta-learners of the study by URI, with their versions (loaded in the driver)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from ray import tune

    from raymeta.tune.common import train_trial

    torch.set_num_threads(config["threads"])
    entry = config["entry"]
    filesystem, path = results_location(config["results"])
    target = f"{path}/{entry['id']}.parquet"
    if filesystem.get_file_info(target).type.name == "File":  # finished before an interruption
        tune.report(pq.read_table(target, filesystem=filesystem).to_pylist()[0])
        return
    with open(config["log"], "a") as f:  # one line per training start (the resume test reads it)
        f.write(json.dumps({"task": entry["id"]}) + "\n")
    task = TaskConfig(**entry["task"])
    spec = method_run(MethodConfig(**entry["method"]), task)
    meta_learner, version = None, None
    if isinstance(spec, LearnedRun):
        meta_learner, version = meta_learners[spec.model_uri]
    last: dict[str, Any] = {}
    t0 = time.perf_counter()

    def report(metrics):
        last.update(metrics)
        if metrics["epoch"] < task.epochs:
            tune.report(metrics)

    train_trial(spec, report, meta_learner=meta_learner, use_gpu=config["use_gpu"])
    row = _row(entry, last, time.perf_counter() - t0, version)
    if task.label_noise is not None:  # the corruption actually applied (seeded, reproducible)
        from raymeta.train.loop import noisy_labels, task_splits

        ds, sp = task_splits(task)
        row["noise_flipped_fraction"] = noisy_labels(task, ds.train_y[sp.train], ds.num_classes)[
            1
        ].flipped_fraction
    pq.write_table(pa.Table.from_pylist([row]), target, filesystem=filesystem)
    tune.report({**{k: v for k, v in last.items() if k != "lrs"}, **row})


def check_transfer_study(study: TransferStudyConfig) -> list[dict[str, Any]]:
    """Expand the study and check every task's data in the driver; returns the tasks.

    Raises:
        ConfigError, DataNotFoundError: one line naming the value.
    """
    from raymeta.train.loop import check_task

    tasks = expand(study)
    for entry in tasks:
        check_task(TaskConfig(**entry["task"]))
    return tasks


def run_transfer_study(cfg: PipelineConfig, session: Session) -> pd.DataFrame:
    """Run (or, in a resumed session, resume) ``cfg.study`` in ``session`` under its run
    ``study`` (nested in the pipeline's run) as one Ray Tune experiment; returns the results table (one row per task).
    A resumed experiment does not run finished tasks again (a task whose row exists is also
    skipped)."""
    import mlflow
    from ray import tune

    from raymeta.train.device import trial_resources, trial_uses_gpu
    from raymeta.tune.common import make_tuner, trial_dirname, working_dir

    study = cfg.study
    tasks = expand(study)
    out = session.output_dir
    results = study.results or str(out / "results")
    results = results if "://" in results else str(Path(results).resolve())
    meta_learners = {uri: session.meta_learner(uri, kind) for uri, kind in study.loads().items()}
    params = {"tasks": len(tasks), "axes": json.dumps(study.axes), "results": results}
    with session.parent_run("study", params=params, state_file=STATE_FILE) as parent:
        res = study.resources
        tuner = make_tuner(
            "study",
            tune.with_parameters(_study_trainable, meta_learners=meta_learners),
            tune_dir=session.tune_dir,
            resume=session.resume,
            param_space={
                "entry": tune.grid_search(tasks),
                "results": results,
                "threads": max(1, int(res.cpus_per_task)),
                "use_gpu": trial_uses_gpu(res.gpus_per_task),
                "log": str(out / TASK_LOG),
            },
            tune_config=tune.TuneConfig(
                reuse_actors=True,  # trials share resources: skip an actor start per trial
                max_concurrent_trials=study.max_concurrent,
                trial_dirname_creator=trial_dirname,
            ),
            resources=trial_resources(res.cpus_per_task, res.gpus_per_task),
            tracking_uri=session.tracking_uri,
            experiment_id=session.experiment_id,
            parent_run_id=parent.run_id,
            describe=_study_run,
            total=len(tasks),
        )
        with working_dir(out):
            grid = tuner.fit()
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} study task(s) failed; first: {errors[0]}")
        table = read_results(results)
        for path in write_report(table, out):
            mlflow.log_artifact(str(path))
    print(f"{len(table)} task rows in {results}; report: {out / 'report.md'}")
    return table


def write_report(table: pd.DataFrame, out: Path) -> list[Path]:
    """Pivot tables (Markdown) and plots (PNG) of a study's results into ``out``: image
    classification tasks by test accuracy (%), language-model tasks by test perplexity, each
    as one pivot over all settings plus one marginal table and bar chart per varied axis."""
    from raymeta.report import _figure, write_table

    out.mkdir(parents=True, exist_ok=True)
    paths = list(write_table(table, out, "study_results"))
    sections = [f"# Transfer study: {len(table)} tasks\n", "Means over seeds.\n"]
    text = table["test_ppl"].notna() if "test_ppl" in table else pd.Series(False, index=table.index)
    for rows, metric, label, scale in (
        (table[~text], "test_acc", "image classification: test accuracy (%)", 100.0),
        (table[text], "test_ppl", "language modelling: test perplexity (lower is better)", 1.0),
    ):
        if rows.empty:
            continue
        rows = rows.assign(**{metric: rows[metric] * scale})
        axes = [c for c in AXIS_COLUMNS if c != "seed" and rows[c].nunique() > 1]
        index = axes or ["dataset", "model"]
        pivot = rows.pivot_table(index=index, columns="method", values=metric, aggfunc="mean")
        sections += [
            f"## {label}\n",
            pivot.reset_index().to_markdown(index=False, floatfmt=".2f"),
            "",
        ]
        for axis in axes:
            marginal = rows.pivot_table(index=axis, columns="method", values=metric, aggfunc="mean")
            sections += [
                f"### By {axis}\n",
                marginal.reset_index().to_markdown(index=False, floatfmt=".2f"),
                "",
            ]
            fig, ax = _figure()
            marginal.plot.bar(ax=ax, rot=0)
            ax.set(ylabel=metric, title=f"{label} by {axis}")
            ax.grid(alpha=0.3, axis="y")
            fig.tight_layout()
            png = out / f"by_{axis}.png"
            fig.savefig(png)
            fig.clf()
            paths.append(png)
    md = out / "report.md"
    md.write_text("\n".join(sections) + "\n")
    return [*paths, md]
