"""Long-tailed studies on Ray Train and MLflow: MFM, its baselines, registration, transfer.

The ``mfm`` section of a pipeline (:class:`~raymeta.config.LongTailStudyConfig`; also built
by ``raymeta mfm train|transfer``) runs, inside the pipeline's parent MLflow run:

1. **Grid.** Every method on the long-tailed task for every imbalance factor and seed, under
   the one training loop (:func:`raymeta.train.loop.train` with a
   :class:`~raymeta.train.rules.MethodRule`) and the same budget (epochs, batch, schedule).
   The runs go through :func:`~raymeta.train.ray_train.fit_runs`: one ``TorchTrainer`` worker
   group trains them one after the other (Ray Train's start-up, 10-18 s here, is paid once per
   group; ``max_concurrent`` groups run at once on a larger cluster), with a checkpoint every
   epoch and resume after a failure. Each run is a nested MLflow run: task, method and schedule
   params, the exact class counts (param ``class_counts`` and artifact ``split.json``),
   per-epoch metrics from rank 0 (overall, many / medium / few-shot and per-class test
   accuracy), its wall time.
2. **Registry.** The modulator network of one ``mfm_network`` run (``register_*``; default the
   first imbalance factor and seed) is logged with ``mlflow.pytorch`` in that run and
   registered as ``registered_model`` with ``alias``
   (:func:`raymeta.tracking.log_meta_learner`).
3. **Transfer.** For every transfer target the registered modulator is loaded by
   ``models:/NAME@ALIAS`` (the version is recorded), attached frozen to a new classifier
   trained with no meta set, beside the target's baselines.
4. **Report.** ``mfm_runs.parquet``/``.md`` (one row per run, with per-class accuracies and
   class counts), ``mfm_summary.parquet``/``.md`` (mean and std over seeds of overall, many,
   medium and few-shot top-1) and ``mfm_per_class.png`` (per-class accuracy, head to tail), in
   ``output_dir`` and as artifacts of the parent run.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from raymeta.config import (
    LongTailMethodConfig,
    LongTailStudyConfig,
    LongTailTaskConfig,
    MethodConfig,
)
from raymeta.errors import ConfigError


@dataclass
class LongTailRun:
    """One (target, imbalance factor, seed, method) run of a study."""

    job: str  # "grid" or "transfer"
    target: str  # the task's display name
    task: LongTailTaskConfig
    method: LongTailMethodConfig
    counts: list[int]
    class_order: list[int]
    class_names: tuple[str, ...]
    modulator: dict | None = None  # transfer: {"config", "state"} of the registered modulator
    modulator_version: str | None = None
    run_id: str | None = None

    @property
    def label(self) -> str:
        return f"{self.method.label} | {self.target} IF={self.task.imbalance_factor:g} s{self.task.seed}"


def _target_name(task: LongTailTaskConfig) -> str:
    return f"{task.dataset}-LT"


def plan_runs(
    cfg: LongTailStudyConfig, num_workers: int
) -> tuple[list[LongTailRun], dict[int, list]]:
    """The grid's runs, with every data-dependent value checked in the driver.

    Returns:
        ``(runs, transfer_plans)``; ``transfer_plans[i]`` is the list of (task, seeds) of
        transfer target ``i`` (built later, once the modulator is registered).

    Raises:
        ConfigError, DataNotFoundError: a value does not fit the data (one line naming it).
    """
    runs = []
    for factor in cfg.factors:
        for seed in cfg.seeds:
            task = cfg.task.model_copy(update={"imbalance_factor": factor, "seed": seed})
            runs += _runs_for(task, cfg.methods, cfg.schedule, num_workers, "grid", "")
    plans = {}
    for i, t in enumerate(cfg.transfer):
        tasks = [t.task.model_copy(update={"seed": s}) for s in (t.seeds or cfg.seeds)]
        methods = [LongTailMethodConfig(method="mfm_network", model_uri="check")] + t.baselines
        for task in tasks:
            _runs_for(task, methods, cfg.schedule, num_workers, "transfer", t.name)
        plans[i] = tasks
    return runs, plans


def _runs_for(task, methods, schedule: MethodConfig, num_workers, job, target):
    from raymeta.data.batches import steps_per_epoch
    from raymeta.train.loop import check_batches, longtail_splits

    ds, split = longtail_splits(task)
    meta_batches = [m.meta_batch_size for m in methods if m.needs_meta]
    check_batches(len(split.train), task.batch_size, num_workers, max(meta_batches, default=None))
    if meta_batches and max(meta_batches) > len(split.meta):
        raise ConfigError(
            f"meta_batch_size={max(meta_batches)} is larger than the meta set "
            f"({len(split.meta)} images = meta_per_class x classes); accepted: <= {len(split.meta)}"
        )
    n_steps = steps_per_epoch(len(split.train), task.batch_size // num_workers, num_workers)
    _check_schedule(schedule, task.epochs, n_steps)
    for method in methods:
        _check_method(method, task, ds, split.counts)
    return [
        LongTailRun(
            job,
            target or _target_name(task),
            task,
            m,
            split.counts,
            split.class_order,
            ds.class_names,
        )
        for m in methods
    ]


def _check_schedule(schedule: MethodConfig, epochs: int, n_steps: int) -> None:
    from raymeta.schedules import HandSchedule

    HandSchedule(schedule.schedule, schedule.lr, epochs * n_steps, n_steps, **schedule.params)


def _check_method(method: LongTailMethodConfig, task, ds, counts) -> None:
    """Build the method once on a throw-away model: unknown params fail here, in the driver."""
    import torch

    from raymeta.meta.methods import build_method
    from raymeta.models import build_model
    from raymeta.models.modulation import ModulatorNet

    torch.manual_seed(0)
    model = build_model(task.model, ds.in_channels, ds.num_classes, ds.image_size)
    modulation = ModulatorNet() if method.model_uri else None
    try:
        build_method(
            method.method,
            counts,
            model,
            input_shape=(ds.in_channels, ds.image_size, ds.image_size),
            epochs=task.epochs,
            modulation=modulation,
            **method.params,
        )
    except ConfigError as exc:
        raise ConfigError(f"method {method.label!r}: {exc}") from None


def _job(run: LongTailRun, schedule: MethodConfig) -> dict[str, Any]:
    return {
        "kind": "longtail",
        "method": run.method.method,
        "params": dict(run.method.params),
        "meta_batch_size": run.method.meta_batch_size,
        "schedule": schedule.model_dump(include={"schedule", "lr", "params"}),
        "modulator": run.modulator,
    }


def _start_mlflow_runs(runs: list[LongTailRun], schedule: MethodConfig, num_workers: int):
    """A nested MLflow run per run (under the active run), with params and ``split.json``."""
    import mlflow
    from mlflow import MlflowClient

    from raymeta.tracking import flatten

    parent = mlflow.active_run()
    client = MlflowClient()
    for run in runs:
        tags = {"mlflow.parentRunId": parent.info.run_id, "job": run.job, "target": run.target}
        created = client.create_run(parent.info.experiment_id, run_name=run.label, tags=tags)
        run.run_id = created.info.run_id
        params = (
            flatten(run.task.model_dump(), "task.")
            | flatten(run.method.model_dump(), "method.")
            | flatten(schedule.model_dump(), "schedule.")
            | {
                "label": run.method.label,
                "class_counts": "/".join(map(str, run.counts)),
                "class_order": "/".join(map(str, run.class_order)),
                "num_workers": num_workers,
            }
        )
        if run.modulator_version is not None:
            params["modulator_version"] = run.modulator_version
        client.log_batch(
            run.run_id,
            params=[mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()],
        )
        split = {
            "class_counts": run.counts,
            "class_order": run.class_order,
            "class_names": list(run.class_names),
            "imbalance_factor": run.task.imbalance_factor,
            "profile": run.task.profile,
            "meta_per_class": run.task.meta_per_class,
        }
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "split.json").write_text(json.dumps(split, indent=1))
            client.log_artifact(run.run_id, str(Path(d) / "split.json"))


def _fit(runs: list[LongTailRun], cfg: LongTailStudyConfig, ctx, num_workers: int, name: str):
    """Train ``runs`` in ``max_concurrent`` worker groups; returns their results in order."""
    import ray

    from raymeta.train.ray_train import fit_runs

    specs = [
        {
            "task": r.task.model_dump(),
            "job": _job(r, cfg.schedule),
            "label": r.label,
            "mlflow": {"uri": ctx.tracking_uri, "run_id": r.run_id},
            "keep_model": False,
        }
        for r in runs
    ]
    options = {
        "num_workers": num_workers,
        "use_gpu": ctx.ray.use_gpu,
        "storage_path": ctx.storage_path,
        "max_failures": ctx.ray.max_failures,
    }
    groups = min(cfg.max_concurrent or 1, len(specs))
    if groups == 1:
        return fit_runs(specs, name=name, **options)
    chunks = [list(range(g, len(specs), groups)) for g in range(groups)]
    launch = ray.remote(num_cpus=0)(fit_runs)
    refs = [
        launch.remote([specs[i] for i in chunk], name=f"{name}-{g}", **options)
        for g, chunk in enumerate(chunks)
    ]
    results: list = [None] * len(specs)
    for chunk, out in zip(chunks, ray.get(refs), strict=True):
        for i, result in zip(chunk, out, strict=True):
            results[i] = result
    return results


def _row(run: LongTailRun, result) -> dict[str, Any]:
    last = result.history[-1]
    num_classes = len(run.counts)
    per_class = [last.get(f"test_acc_class_{c}", float("nan")) for c in range(num_classes)]
    return {
        "job": run.job,
        "target": run.target,
        "dataset": run.task.dataset,
        "model": run.task.model,
        "imbalance_factor": run.task.imbalance_factor,
        "profile": run.task.profile,
        "class_order": run.task.class_order,
        "seed": run.task.seed,
        "method": run.method.label,
        "top1_acc": last["test_acc"],
        "many_acc": last["test_many_acc"],
        "medium_acc": last["test_medium_acc"],
        "few_acc": last["test_few_acc"],
        "epochs": run.task.epochs,
        "wall_time_s": result.wall_time_s,
        "class_counts": "/".join(map(str, run.counts)),
        "per_class_acc": per_class,
        "class_rank_order": list(run.class_order),
        "modulator_version": run.modulator_version,
        "mlflow_run_id": run.run_id,
    }


def _finish_mlflow_runs(runs: list[LongTailRun], results) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for run, result in zip(runs, results, strict=True):
        client.log_metric(run.run_id, "wall_time_s", result.wall_time_s)
        client.set_terminated(run.run_id)


def _register(cfg: LongTailStudyConfig, runs: list[LongTailRun], results) -> tuple[str, str]:
    """Log and register the modulator of the chosen ``mfm_network`` run; returns
    ``(model_uri, version)``."""
    import mlflow

    from raymeta.models.modulation import ModulatorNet
    from raymeta.tracking import log_meta_learner

    method = cfg.registered_method
    factor = cfg.register_imbalance_factor or cfg.factors[0]
    seed = cfg.seeds[0] if cfg.register_seed is None else cfg.register_seed
    (run, result) = next(
        (r, res)
        for r, res in zip(runs, results, strict=True)
        if r.method is method and r.task.imbalance_factor == factor and r.task.seed == seed
    )
    modulator = ModulatorNet(hidden=method.params.get("hidden", 16))
    modulator.load_state_dict({k: v.cpu() for k, v in result.rule_state["modulation"].items()})
    source = (
        f"MFM meta-trained on {run.target} IF={factor:g} ({run.task.profile}, "
        f"{run.task.class_order}), {run.task.model}, seed {seed}, run {run.run_id}"
    )
    modulator.source = source
    with mlflow.start_run(run_id=run.run_id, nested=True):
        version = log_meta_learner(
            modulator,
            cfg.registered_model,
            cfg.alias,
            name="modulator",
            metadata={"source": source, "top1_acc": result.history[-1]["test_acc"]},
        )
    return f"models:/{cfg.registered_model}@{cfg.alias}", version


def _transfer_runs(cfg: LongTailStudyConfig, plans, default_uri: str | None) -> list[LongTailRun]:
    from raymeta.tracking import load_meta_learner
    from raymeta.train.loop import longtail_splits

    runs = []
    for i, t in enumerate(cfg.transfer):
        uri = t.model_uri or default_uri
        modulator, version = load_meta_learner(uri, kind="modulator")
        frozen = LongTailMethodConfig(method="mfm_network", model_uri=uri)
        payload = {"config": modulator.config(), "state": modulator.state_dict()}
        for task in plans[i]:
            ds, split = longtail_splits(task)
            for method in [frozen, *t.baselines]:
                runs.append(
                    LongTailRun(
                        "transfer",
                        t.name,
                        task,
                        method,
                        split.counts,
                        split.class_order,
                        ds.class_names,
                        modulator=payload if method is frozen else None,
                        modulator_version=version if method is frozen else None,
                    )
                )
    return runs


def _per_class_panels(df: pd.DataFrame):
    """Mean per-class accuracy over seeds by class *rank* (head first), per (target, IF)."""
    panels, xlabels = {}, {}
    for (target, factor), part in df.groupby(["target", "imbalance_factor"], sort=False):
        name = f"{target} IF {factor:g}"
        first = part.iloc[0]
        counts = [int(c) for c in first["class_counts"].split("/")]
        ranks = sorted(range(len(counts)), key=lambda c: -counts[c])
        xlabels[name] = [f"#{i} (n={counts[c]})" for i, c in enumerate(ranks)]
        panels[name] = {}
        for method, runs in part.groupby("method", sort=False):
            by_rank = []
            for _, row in runs.iterrows():
                order = list(row["class_rank_order"])  # order[i] = class of rank i
                by_rank.append([row["per_class_acc"][c] for c in order])
            panels[name][method] = [sum(v) / len(v) for v in zip(*by_rank, strict=True)]
    return panels, xlabels


def check_study(cfg: LongTailStudyConfig, default_workers: int) -> None:
    """Validate the study's data-dependent values in the driver (before Ray starts)."""
    plan_runs(cfg, cfg.num_workers or default_workers)


def run_longtail_study(cfg: LongTailStudyConfig, ctx) -> pd.DataFrame:
    """Run the study (module docstring) inside the active (parent) MLflow run.

    Args:
        cfg: the ``mfm`` section.
        ctx: the pipeline's :class:`~raymeta.pipeline.Context` (Ray settings, tracking URI,
            output folder).

    Returns:
        The summary table (mean and std over seeds per target, imbalance factor and method).

    Raises:
        ConfigError, DataNotFoundError: a bad value (checked before any training).
    """
    import mlflow

    from raymeta.report import (
        plot_per_class,
        summarise,
        summary_markdown,
        to_markdown,
        write_table,
    )

    num_workers = cfg.num_workers or ctx.ray.num_workers
    t0 = time.perf_counter()
    runs, plans = plan_runs(cfg, num_workers)
    results = []
    default_uri = None
    if runs:
        _start_mlflow_runs(runs, cfg.schedule, num_workers)
        results = _fit(runs, cfg, ctx, num_workers, "mfm-grid")
        _finish_mlflow_runs(runs, results)
        if cfg.registered_method is not None:
            default_uri, version = _register(cfg, runs, results)
            mlflow.set_tag("registered_modulator", f"{default_uri} (version {version})")
            exe = sys.argv[0] if Path(sys.argv[0]).name == "raymeta" else "raymeta"
            print(
                f"registered {cfg.registered_model} version {version} (alias {cfg.alias}); "
                f"transfer it with: {exe} mfm transfer --model-uri {default_uri} "
                "[--dataset digits --imbalance-factor 10 ...] (see --help for the defaults)"
            )
        else:
            print("no mfm_network run in this study: no modulator registered")
    t_runs = _transfer_runs(cfg, plans, default_uri)
    if t_runs:
        _start_mlflow_runs(t_runs, cfg.schedule, num_workers)
        t_results = _fit(t_runs, cfg, ctx, num_workers, "mfm-transfer")
        _finish_mlflow_runs(t_runs, t_results)
        runs, results = runs + t_runs, results + t_results
    df = pd.DataFrame([_row(r, res) for r, res in zip(runs, results, strict=True)])
    out = ctx.output_dir
    keys = ["job", "target", "imbalance_factor", "method"]
    summary = summarise(df, keys)
    md = summary_markdown(
        summary,
        ["job", "target", "imbalance_factor"],
        title=lambda job, target, factor: f"{job}: {target}, IF {factor:g}",
    )
    shown = df.drop(columns=["per_class_acc", "class_rank_order", "mlflow_run_id"])
    paths = [
        *write_table(df, out, "mfm_runs", markdown=to_markdown(shown)),
        *write_table(summary, out, "mfm_summary", markdown=md),
        plot_per_class(*_per_class_panels(df), out / "mfm_per_class.png"),
    ]
    for path in paths:
        mlflow.log_artifact(str(path))
    mlflow.log_metric("mfm_study_wall_time_s", time.perf_counter() - t0)
    print("\n" + md + "\n")
    return summary


def run_study_pipeline(cfg, ctx, experiment_id: str) -> pd.DataFrame:
    """The ``mfm`` section of pipeline ``cfg`` in its own parent run ``pipeline/{name}``
    (params: the whole section); returns the summary table."""
    import mlflow

    from raymeta.tracking import flatten

    t0 = time.perf_counter()
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"pipeline/{cfg.name}") as parent:
        mlflow.log_params(
            {k: str(v)[:6000] for k, v in flatten(cfg.model_dump(include={"name", "mfm"})).items()}
        )
        summary = run_longtail_study(cfg.mfm, ctx)
        mlflow.log_metric("pipeline_wall_time_s", time.perf_counter() - t0)
    print(f"results: mfm_*.parquet, mfm_*.md and mfm_per_class.png in {ctx.output_dir}")
    print(f"MLflow parent run {parent.info.run_id} in {ctx.tracking_uri}")
    return summary
