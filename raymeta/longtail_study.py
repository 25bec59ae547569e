"""The long-tail study on Ray Train and MLflow: MFM, its baselines, registration, transfer (not
to be confused with the transfer study of learned LR schedules, :mod:`raymeta.tune.study`).

The ``longtail`` section of a pipeline (old name ``mfm``;
:class:`~raymeta.config.LongTailStudyConfig`; also built by ``raymeta mfm train|transfer``)
runs, inside the pipeline's parent MLflow run:

1. **Grid.** Every method on the long-tailed task for every profile (``exp``, ``step``),
   imbalance factor and seed, under
   the one training loop (:func:`raymeta.train.loop.train` with a
   :class:`~raymeta.train.rules.MethodRule`) and the same budget (epochs, batch, schedule).
   The runs go through :func:`~raymeta.train.ray_train.fit_runs`: one ``TorchTrainer`` worker
   group trains them one after the other (Ray Train's start-up, 10-18 s here, is paid once per
   group; ``max_concurrent`` groups run at once on a larger cluster), with a checkpoint every
   epoch and resume after a failure. A run stopped as dead (the dead-run guard,
   :mod:`raymeta.train.guard`: a non-finite or growing loss, no progress after its patience)
   is a **dead row**: its reason
   is printed once, its MLflow run ends FAILED with the tag ``dead_reason`` (and the metric
   ``dead_run`` 1), its accuracies are NaN, and the study goes on with the other runs; any
   other error still ends the study. Each run is a nested MLflow run under the active (stage)
   run, named ``longtail/<method>/<target> <profile> IF=<factor>/seed<k>``
   (e.g. ``longtail/CE/digits-LT exp IF=10/seed0``; ``longtail-transfer/...``
   for a transfer run) with the flat tags of every training run (``stage``, ``method``,
   ``family`` = the LR schedule, ``seed``, ``task``) and ``target``: its run spec as params, the exact class counts (param ``class_counts`` and artifact ``split.json``),
   per-epoch metrics from rank 0 (overall, many / medium / few-shot and per-class test
   accuracy), its wall time.
2. **Registry.** The modulator network of one ``mfm_network`` run (``register_*``; default the
   first profile, imbalance factor and seed) is logged with ``mlflow.pytorch`` in that run and
   registered as ``registered_model`` with ``alias``
   (:func:`raymeta.tracking.log_meta_learner`). When that run is dead nothing is registered:
   the tables are written, the transfer is skipped and the study ends with one line
   (:class:`~raymeta.errors.DeadRunError`).
3. **Transfer.** For every transfer target the registered modulator is loaded in the driver by
   ``models:/NAME@ALIAS`` (the version is recorded), sent to the workers beside the run spec
   and attached frozen to a new classifier
   trained with no meta set, beside the target's baselines.
4. **Report.** ``mfm_runs.parquet``/``.md`` (one row per run, with per-class accuracies and
   class counts, ``dead`` and ``dead_reason``), ``mfm_summary.parquet``/``.md`` (per stage,
   target, profile, imbalance factor and method: mean and std over the live seeds of overall,
   many, medium and few-shot top-1, and ``dead``, the number of dead seeds) and
   ``mfm_per_class.png`` (per-class accuracy of the live runs, head to tail, a panel per
   target, profile and imbalance factor; none when every run is dead), in ``output_dir`` and as artifacts of the active (stage) run,
   ``longtail`` in a pipeline.
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

from raymeta.config import LongTailMethodConfig, LongTailStudyConfig, LongTailTaskConfig
from raymeta.errors import ConfigError, DeadRunError, RegistrationError
from raymeta.session import Session, nested_run
from raymeta.spec import LongTailRun, longtail_run


@dataclass
class PlannedRun:
    """One (target, profile, imbalance factor, seed, method) run of the long-tail study: its run spec
    and what the study records about it.

    Attributes:
        stage: ``grid`` (the study's own task) or ``transfer`` (a transfer target).
        target: the task's display name.
        method: the study's method entry (the registered ``mfm_network`` is found by identity).
        modulator, modulator_version: a transfer run's registered modulator network (loaded in
            the driver, sent beside the spec) and its registry version.
        run_id: the run's MLflow run, once created.
    """

    stage: str
    target: str
    spec: LongTailRun
    method: LongTailMethodConfig
    counts: list[int]
    class_order: list[int]
    class_names: tuple[str, ...]
    modulator: Any = None
    modulator_version: str | None = None
    run_id: str | None = None

    @property
    def task(self) -> LongTailTaskConfig:
        return self.spec.task


def _target_name(task: LongTailTaskConfig) -> str:
    return f"{task.dataset}-LT"


def _where(target: str, task: LongTailTaskConfig) -> str:
    """The group a run belongs to, in run names and labels: ``digits-LT exp IF=10``."""
    return f"{target} {task.profile} IF={task.imbalance_factor:g}"


def _label(method: LongTailMethodConfig, target: str, task: LongTailTaskConfig) -> str:
    return f"{method.label} | {_where(target, task)} s{task.seed}"


def plan_runs(
    cfg: LongTailStudyConfig, num_workers: int
) -> tuple[list[PlannedRun], dict[int, list[LongTailTaskConfig]]]:
    """The grid's runs, with every data-dependent value checked in the driver (each run is
    assembled once on the CPU, the transfer runs with a stand-in modulator network).

    Returns:
        ``(runs, transfer_plans)``; ``transfer_plans[i]`` is the list of tasks (one per seed)
        of transfer target ``i`` (whose runs are planned once the modulator is registered).

    Raises:
        ConfigError, DataNotFoundError: a value does not fit the data (one line naming it).
    """
    runs = []
    for profile in cfg.grid_profiles:
        for factor in cfg.factors:
            for seed in cfg.seeds:
                update = {"profile": profile, "imbalance_factor": factor, "seed": seed}
                task = cfg.task.model_copy(update=update)
                runs += _runs_for(cfg, task, cfg.methods, num_workers, "grid", _target_name(task))
    plans = {}
    for i, t in enumerate(cfg.transfer):
        tasks = [t.task.model_copy(update={"seed": s}) for s in (t.seeds or cfg.seeds)]
        frozen = LongTailMethodConfig(method="mfm_network", model_uri=t.model_uri or cfg.model_uri)
        for task in tasks:
            _runs_for(cfg, task, [frozen, *t.baselines], num_workers, "transfer", t.name)
        plans[i] = tasks
    return runs, plans


def _runs_for(cfg, task, methods, num_workers: int, stage: str, target: str) -> list[PlannedRun]:
    from raymeta.models.modulation import ModulatorNet
    from raymeta.train.build import build_run
    from raymeta.train.loop import Workers, check_batches, load_task_data, longtail_splits

    ds, split = longtail_splits(task)
    meta_batches = [m.meta_batch_size for m in methods if m.needs_meta]
    check_batches(len(split.train), task.batch_size, num_workers, max(meta_batches, default=None))
    if meta_batches and max(meta_batches) > len(split.meta):
        raise ConfigError(
            f"meta_batch_size={max(meta_batches)} is larger than the meta set "
            f"({len(split.meta)} images = meta_per_class x classes); accepted: <= {len(split.meta)}"
        )
    data = load_task_data(task)
    planned = []
    for method in methods:
        spec = longtail_run(method, task, cfg.schedule, _label(method, target, task))
        stand_in = ModulatorNet() if method.model_uri else None
        try:  # unknown method or schedule params fail here, in the driver
            build_run(spec, "cpu", Workers(0, num_workers), meta_learner=stand_in, data=data)
        except ConfigError as exc:
            raise ConfigError(f"method {method.label!r}: {exc}") from None
        planned.append(
            PlannedRun(stage, target, spec, method, split.counts, split.class_order, ds.class_names)
        )
    return planned


MLFLOW_STAGES = {"grid": "longtail", "transfer": "longtail-transfer"}  # the runs' stage tags


def _start_mlflow_runs(runs: list[PlannedRun], num_workers: int):
    """A nested MLflow run per run (under the active run), with tags, params and
    ``split.json`` (module docstring)."""
    import mlflow
    from mlflow import MlflowClient

    from raymeta.tracking import as_params, run_tags

    parent = mlflow.active_run()
    client = MlflowClient()
    for run in runs:
        stage, method = MLFLOW_STAGES[run.stage], run.method.label
        tags = {"mlflow.parentRunId": parent.info.run_id, "target": run.target}
        tags |= run_tags(run.spec, stage, method)
        name = f"{stage}/{method}/{_where(run.target, run.task)}/seed{run.task.seed}"
        created = client.create_run(parent.info.experiment_id, run_name=name, tags=tags)
        run.run_id = created.info.run_id
        params = as_params(run.spec.model_dump(mode="json")) | {
            "class_counts": "/".join(map(str, run.counts)),
            "class_order": "/".join(map(str, run.class_order)),
            "num_workers": str(num_workers),
        }
        if run.modulator_version is not None:
            params["modulator_version"] = run.modulator_version
        client.log_batch(
            run.run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()]
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


def _fit(runs: list[PlannedRun], cfg: LongTailStudyConfig, session: Session, num_workers, name):
    """Train ``runs`` in ``max_concurrent`` worker groups; returns their results in order."""
    import ray

    from raymeta.train.ray_train import RunRequest, fit_runs

    requests = [
        RunRequest(
            r.spec, r.modulator, mlflow_run_id=r.run_id, keep_model=False, dead_run_is_result=True
        )
        for r in runs
    ]
    options = {
        "num_workers": num_workers,
        "use_gpu": session.ray.use_gpu,
        "storage_path": session.storage_path,
        "max_failures": session.ray.max_failures,
        "tracking_uri": session.tracking_uri,
    }
    groups = min(cfg.max_concurrent or 1, len(requests))
    if groups == 1:
        return fit_runs(requests, name=name, **options)
    chunks = [list(range(g, len(requests), groups)) for g in range(groups)]
    launch = ray.remote(num_cpus=0)(fit_runs)
    refs = [
        launch.remote([requests[i] for i in chunk], name=f"{name}-{g}", **options)
        for g, chunk in enumerate(chunks)
    ]
    results: list = [None] * len(requests)
    for chunk, out in zip(chunks, ray.get(refs), strict=True):
        for i, result in zip(chunk, out, strict=True):
            results[i] = result
    return results


def _row(run: PlannedRun, result) -> dict[str, Any]:
    """The ``mfm_runs`` row of a finished run; a dead run's accuracies are NaN."""
    dead = result.dead_reason is not None
    last = {} if dead else result.history[-1]
    nan = float("nan")
    per_class = [last.get(f"test_acc_class_{c}", nan) for c in range(len(run.counts))]
    return {
        "stage": run.stage,
        "target": run.target,
        "dataset": run.task.dataset,
        "model": run.task.model,
        "imbalance_factor": run.task.imbalance_factor,
        "profile": run.task.profile,
        "class_order": run.task.class_order,
        "seed": run.task.seed,
        "method": run.method.label,
        "top1_acc": last.get("test_acc", nan),
        "many_acc": last.get("test_many_acc", nan),
        "medium_acc": last.get("test_medium_acc", nan),
        "few_acc": last.get("test_few_acc", nan),
        "epochs": run.task.epochs,
        "wall_time_s": result.wall_time_s,
        "class_counts": "/".join(map(str, run.counts)),
        "per_class_acc": per_class,
        "class_rank_order": list(run.class_order),
        "modulator_version": run.modulator_version,
        "dead": dead,
        "dead_reason": result.dead_reason,
        "mlflow_run_id": run.run_id,
    }


def _finish_runs(runs: list[PlannedRun], results) -> None:
    """End the runs' MLflow runs (FINISHED; a dead run FAILED with the tag ``dead_reason``)
    and print each dead run's reason, once."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for run, result in zip(runs, results, strict=True):
        client.log_metric(run.run_id, "wall_time_s", result.wall_time_s)
        if result.dead_reason is None:
            client.set_terminated(run.run_id)
            continue
        print(f"[{run.spec.label}] dead run, recorded as a dead row: {result.dead_reason}")
        client.set_tag(run.run_id, "dead_reason", result.dead_reason)
        client.set_terminated(run.run_id, status="FAILED")


def _register(
    cfg: LongTailStudyConfig, runs: list[PlannedRun], results, keep: Path
) -> tuple[str, str]:
    """Log and register the modulator of the chosen ``mfm_network`` run (a copy is kept in
    ``keep``); returns ``(model_uri, version)``.

    Raises:
        DeadRunError: the chosen run is dead (nothing is registered).
        RegistrationError: the store failed to register it.
    """

    from raymeta.meta.methods import METHODS
    from raymeta.models.modulation import ModulatorNet
    from raymeta.tracking import register_meta_learner

    method = cfg.registered_method
    profile = cfg.register_profile or cfg.grid_profiles[0]
    factor = cfg.register_imbalance_factor or cfg.factors[0]
    seed = cfg.seeds[0] if cfg.register_seed is None else cfg.register_seed
    (run, result) = next(
        (r, res)
        for r, res in zip(runs, results, strict=True)
        if r.method is method
        and (r.task.profile, r.task.imbalance_factor, r.task.seed) == (profile, factor, seed)
    )
    if result.dead_reason is not None:
        raise DeadRunError(
            f"{cfg.registered_model} was not registered: its run {run.spec.label!r} is dead "
            "(reason above), so the transfer was skipped; accepted: register_profile, "
            "register_imbalance_factor and register_seed of a live mfm_network run"
        )
    defaults = METHODS["mfm_network"].defaults
    config = {k: method.params.get(k, defaults[k]) for k in ModulatorNet().config()}
    modulator = ModulatorNet(**config)
    modulator.load_state_dict({k: v.cpu() for k, v in result.rule_state["modulation"].items()})
    source = (
        f"MFM meta-trained on {_where(run.target, run.task)} ({run.task.class_order}), "
        f"{run.task.model}, seed {seed}, run {run.run_id}"
    )
    modulator.source = source
    last = result.history[-1]
    metadata = {
        "task": f"{_where(run.target, run.task)} {run.task.model}",
        "top1_acc": last["test_acc"],
        "few_acc": last["test_few_acc"],
    }
    with nested_run(run_id=run.run_id, was_finished=True):  # the run ended FINISHED
        version = register_meta_learner(
            modulator, cfg.registered_model, cfg.alias, keep, name="modulator", metadata=metadata
        )
    return cfg.model_uri, version


def _transfer_runs(cfg: LongTailStudyConfig, plans, session: Session) -> list[PlannedRun]:
    from raymeta.train.loop import longtail_splits

    runs = []
    for i, t in enumerate(cfg.transfer):
        uri = t.model_uri or cfg.model_uri
        modulator, version = session.meta_learner(uri, "modulator")
        frozen = LongTailMethodConfig(method="mfm_network", model_uri=uri)
        for task in plans[i]:
            ds, split = longtail_splits(task)
            for method in [frozen, *t.baselines]:
                spec = longtail_run(method, task, cfg.schedule, _label(method, t.name, task))
                runs.append(
                    PlannedRun(
                        "transfer",
                        t.name,
                        spec,
                        method,
                        split.counts,
                        split.class_order,
                        ds.class_names,
                        modulator=modulator if method is frozen else None,
                        modulator_version=version if method is frozen else None,
                    )
                )
    return runs


def _per_class_panels(df: pd.DataFrame):
    """Mean per-class accuracy over the live seeds by class *rank* (head first), per (target,
    profile, IF); a method whose every seed is dead has no line."""
    panels, xlabels = {}, {}
    groups = df.groupby(["target", "profile", "imbalance_factor"], sort=False)
    for (target, profile, factor), part in groups:
        name = f"{target} {profile} IF {factor:g}"
        first = part.iloc[0]
        counts = [int(c) for c in first["class_counts"].split("/")]
        ranks = sorted(range(len(counts)), key=lambda c: -counts[c])
        xlabels[name] = [f"#{i} (n={counts[c]})" for i, c in enumerate(ranks)]
        panels[name] = {}
        for method, runs in part[~part["dead"]].groupby("method", sort=False):
            by_rank = []
            for _, row in runs.iterrows():
                order = list(row["class_rank_order"])  # order[i] = class of rank i
                by_rank.append([row["per_class_acc"][c] for c in order])
            panels[name][method] = [sum(v) / len(v) for v in zip(*by_rank, strict=True)]
    return panels, xlabels


def check_longtail_study(cfg: LongTailStudyConfig, default_workers: int) -> None:
    """Validate the long-tail study's data-dependent values in the driver (before Ray starts).

    Raises:
        ConfigError, DataNotFoundError: a value does not fit the data (one line naming it).
    """
    plan_runs(cfg, cfg.num_workers or default_workers)


def run_longtail_study(cfg: LongTailStudyConfig, session: Session) -> pd.DataFrame:
    """Run the long-tail study (module docstring) inside the active (parent) MLflow run.

    Args:
        cfg: the ``longtail`` section.
        session: the command's :class:`~raymeta.session.Session` (Ray settings, tracking,
            output folder, registered modulators).

    Returns:
        The summary table (mean and std over seeds per stage, target, profile, imbalance
        factor and method).

    Raises:
        ConfigError, DataNotFoundError: a bad value (checked before any training).
        DeadRunError: the run whose modulator is registered is dead (after the tables are
            written; nothing is registered, no transfer runs).
        RegistrationError: the store failed to register the modulator (after the tables).
    """
    import mlflow

    from raymeta.report import (
        plot_per_class,
        summarise,
        summary_markdown,
        to_markdown,
        write_table,
    )
    from raymeta.tracking import log_results

    num_workers = cfg.num_workers or session.ray.num_workers
    t0 = time.perf_counter()
    runs, plans = plan_runs(cfg, num_workers)
    results, failure = [], None
    if runs:
        _start_mlflow_runs(runs, num_workers)
        results = _fit(runs, cfg, session, num_workers, "longtail-grid")
        _finish_runs(runs, results)
        if cfg.registered_method is None:
            print("no mfm_network run in this study: no modulator registered")
        else:
            try:
                uri, version = _register(cfg, runs, results, session.output_dir / "modulator")
            except (DeadRunError, RegistrationError) as exc:  # report the runs first, then fail
                failure = exc
            else:
                mlflow.set_tag("registered_modulator", f"{uri} (version {version})")
                exe = sys.argv[0] if Path(sys.argv[0]).name == "raymeta" else "raymeta"
                print(
                    f"registered {cfg.registered_model} version {version} (alias {cfg.alias}); "
                    f"transfer it with: {exe} mfm transfer --model-uri {uri} "
                    "[--dataset digits --imbalance-factor 10 ...] (see --help for the defaults)"
                )
    t_runs = _transfer_runs(cfg, plans, session) if failure is None else []
    if t_runs:
        _start_mlflow_runs(t_runs, num_workers)
        t_results = _fit(t_runs, cfg, session, num_workers, "longtail-transfer")
        _finish_runs(t_runs, t_results)
        runs, results = runs + t_runs, results + t_results
    df = pd.DataFrame([_row(r, res) for r, res in zip(runs, results, strict=True)])
    out = session.output_dir
    sections = ["stage", "target", "profile", "imbalance_factor"]
    summary = summarise(df, [*sections, "method"])
    md = summary_markdown(
        summary,
        sections,
        title=lambda stage, target, profile, factor: (
            f"{stage}: {target}, {profile} profile, IF {factor:g}"
        ),
    )
    hidden = ["per_class_acc", "class_rank_order", "dead_reason", "mlflow_run_id"]
    shown = df.drop(columns=hidden)
    paths = [
        *write_table(df, out, "mfm_runs", markdown=to_markdown(shown)),
        *write_table(summary, out, "mfm_summary", markdown=md),
    ]
    if not df["dead"].all():
        paths.append(plot_per_class(*_per_class_panels(df), out / "mfm_per_class.png"))
    log_results(paths)
    print("\n" + md + "\n")
    print(f"results: {', '.join(p.name for p in paths)} in {out}")
    if failure is not None:
        raise failure
    mlflow.log_metric("longtail_study_wall_time_s", time.perf_counter() - t0)
    return summary
