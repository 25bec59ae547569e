"""Declarative workflows (``raymeta run FILE``): every section of a pipeline, in one session.

Flow: the sections' data checks in the driver -> :func:`raymeta.session.open_session` (output
folder, MLflow, registry inputs, Ray) -> every section under one parent run ``pipeline/{name}``
-> a Parquet/Markdown table and PNG plots per section in ``output_dir``.

MLflow holds one tree: the pipeline's run holds a run per stage (``meta-train``, ``transfer``,
``longtail``, ``compare``, ``study``; the suite a ``compare/<task>`` per task of the suite),
and each stage holds its runs, named ``<stage>/<method>/seed<k>`` and tagged ``stage``,
``method``, ``family``, ``seed`` and ``task`` (:func:`raymeta.tracking.run_tags`); the
comparison's stages are ``search/<family>`` (``search/pbt``, ``search/pb2`` for the online
rows) and ``final``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from raymeta.config import SECTIONS, MetaTrainConfig, PipelineConfig, TaskConfig, TransferConfig
from raymeta.console import stage
from raymeta.errors import ConfigError
from raymeta.interrupts import Interrupted
from raymeta.session import (
    PIPELINE_STATE_FILE,
    ParentRun,
    Session,
    can_resume,
    meta_train_record,
    nested_run,
    open_session,
)
from raymeta.spec import MetaTrainRun

if TYPE_CHECKING:  # pandas is imported once sections run: a bad pipeline file is refused first
    import pandas as pd

META_TRAIN_LABEL = "MLR-SNet (meta-training)"


def _result_row(
    stage_name: str,
    label: str,
    task: TaskConfig,
    history: list[dict],
    wall_time_s: float,
    version: str | None,
) -> dict:
    last = history[-1]
    return {
        "stage": stage_name,
        "method": label,
        "dataset": task.dataset,
        "model": task.model,
        "batch_size": task.batch_size,
        "epochs": task.epochs,
        "seed": task.seed,
        "test_acc": last["test_acc"],
        "test_loss": last["test_loss"],
        "best_val_acc": max(h["val_acc"] for h in history),
        "wall_time_s": wall_time_s,
        "meta_learner_version": None if version is None else str(version),
    }


def meta_train_spec(cfg: MetaTrainConfig, num_workers: int):
    """The run spec of a ``meta_train`` section on ``num_workers`` Ray Train workers, after the
    data checks of its tasks (in the driver, before Ray starts): a
    :class:`~raymeta.spec.MetaTrainRun`, or for ``tasks`` a
    :class:`~raymeta.spec.MultiTaskMetaTrainRun` (one group of workers per task; each task's
    epoch counted in optimisation steps from its data).

    Raises:
        ConfigError, DataNotFoundError: one line naming the value (and the task).
    """
    from raymeta.spec import meta_train_run, multitask_meta_train_run
    from raymeta.train.loop import check_task

    if cfg.tasks is None:
        check_task(cfg.task, num_workers, cfg.meta_batch_size)
        return meta_train_run(cfg, cfg.task, "meta-train", cfg.saved_epochs)
    group = num_workers // len(cfg.tasks)
    steps = []
    for i, task in enumerate(cfg.tasks):
        try:
            steps.append(check_task(task, group, cfg.meta_batch_size))
        except ConfigError as exc:
            raise ConfigError(f"meta_train.tasks.{i}: {exc}") from None
    return multitask_meta_train_run(cfg, cfg.tasks, "meta-train", steps, cfg.checkpoint_epochs)


def _describe_meta_train(spec, num_workers: int) -> str:
    """The stage line of a meta-training run."""
    if isinstance(spec, MetaTrainRun):
        task = spec.task
        return (
            f"meta-training MLR-SNet on {task.dataset}/{task.model} with {num_workers} Ray "
            f"Train worker(s), {task.epochs} epochs, a {spec.meta.meta_objective} meta step "
            f"every {spec.meta.meta_every} steps"
        )
    names = ", ".join(f"{t.dataset}/{t.model}" for t in spec.tasks)
    return (
        f"meta-training one MLR-SNet on {len(spec.tasks)} tasks at once ({names}) with "
        f"{num_workers // len(spec.tasks)} Ray Train worker(s) per task, {spec.total_steps} "
        f"steps ({spec.epochs} epochs of task {spec.clock}), a {spec.meta.meta_objective} meta "
        f"step every {spec.meta.meta_every} steps"
    )


def run_meta_train(cfg: MetaTrainConfig, session: Session, num_workers: int):
    """Meta-train MLR-SNet (on one task, or on several at once) in a ``TorchTrainer``, log it
    to MLflow and register it under ``cfg.registered_model`` with ``cfg.alias``. Must run
    inside an active MLflow run.

    A copy of the meta-learner is kept in ``output_dir/meta_learner``.

    Returns ``(bundle, version, fit_result, rows)``: ``rows`` are the results table's rows, one
    per task.

    Raises:
        RegistrationError: the store failed to register it (its ``rows`` are the results
            table's rows, without a version, and its ``result`` the fit result).
    """
    import mlflow

    from raymeta.errors import RegistrationError
    from raymeta.report import plot_lr_curves
    from raymeta.schedules import MLRSNetBundle
    from raymeta.tracking import as_params, log_results, register_meta_learner, run_name, run_tags
    from raymeta.train.ray_train import fit

    spec = meta_train_spec(cfg, num_workers)
    stage(_describe_meta_train(spec, num_workers))
    names = " + ".join(f"{t.dataset}/{t.model}" for t in cfg.meta_tasks)
    single = spec if isinstance(spec, MetaTrainRun) else spec.task_run(0)
    tags = run_tags(single, "meta-train", META_TRAIN_LABEL) | {"task": names}
    with nested_run(
        run_name=run_name("meta-train", META_TRAIN_LABEL, cfg.meta_tasks[0].seed), tags=tags
    ) as run:
        mlflow.log_params(
            as_params(spec.model_dump(mode="json"))
            | {"registered_model": cfg.registered_model, "alias": cfg.alias}
            | {"num_workers": num_workers}
        )
        result = fit(
            spec,
            mlflow_run_id=run.info.run_id,
            tracking_uri=session.tracking_uri,
            num_workers=num_workers,
            use_gpu=session.ray.use_gpu,
            storage_path=session.storage_path,
            max_failures=session.ray.max_failures,
        )
        epochs = sorted(result.saved_cells)
        bundle = MLRSNetBundle(
            [result.saved_cells[e] for e in epochs],
            epochs,
            cfg.hidden_size,
            cfg.mlp_hidden,
            source=f"meta-trained on {names} (run {run.info.run_id})",
        )
        if result.gamma is not None:
            mlflow.log_metric("gamma", result.gamma)
        mlflow.log_metric("wall_time_s", result.wall_time_s)
        if isinstance(spec, MetaTrainRun):  # (label, task, history, LRs, steps per epoch)
            runs = [(META_TRAIN_LABEL, cfg.task, result.history, result.lrs, None)]
        else:
            runs = [
                (f"{META_TRAIN_LABEL} task {i}", t, r["history"], r["lrs"], n)
                for i, (t, r, n) in enumerate(
                    zip(spec.tasks, result.tasks, spec.epoch_steps, strict=True)
                )
            ]
        png = session.output_dir / "meta_train_lr.png"
        curves = {name: (lrs, n or len(lrs) // task.epochs) for name, task, _, lrs, n in runs}
        plot_lr_curves(curves, png, "LR during meta-training")
        log_results([png])
        for _, _, history, _, _ in runs:  # every task's last finished epoch
            check_not_at_chance(history[-1], f"models:/{cfg.registered_model}")
        metadata = {
            "task": names,
            "test_acc": runs[0][2][-1]["test_acc"],
            "test_loss": runs[0][2][-1]["test_loss"],
        }

        def table_rows(version):
            return [
                _result_row("meta-train", name, task, history, result.wall_time_s, version)
                for name, task, history, _, _ in runs
            ]

        try:
            version = register_meta_learner(
                bundle, cfg.registered_model, cfg.alias, session.output_dir / "meta_learner",
                metadata=metadata,
            )  # fmt: skip
        except RegistrationError as exc:
            exc.rows, exc.result = table_rows(None), result  # the pipeline still reports them
            raise
    return bundle, version, result, table_rows(version)


CHANCE_MARGIN = 0.01  # test accuracy must beat the majority-class rate by this much


def check_not_at_chance(last_epoch: dict, what: str) -> None:
    """Refuse to register ``what`` from a meta-training run whose final test accuracy is within
    :data:`CHANCE_MARGIN` of chance (the majority-class rate of the test split,
    ``chance_acc``): a dead meta-learner must never reach the registry.

    Raises:
        DeadRunError: one line with both accuracies.
    """
    from raymeta.errors import DeadRunError
    from raymeta.meta.mlrsnet import MLRSNetMetaTrainer

    acc, chance = last_epoch["test_acc"], last_epoch["chance_acc"]
    if acc <= chance + CHANCE_MARGIN:
        raise DeadRunError(
            f"meta-training ended at chance level (test accuracy {acc:.2%}, chance "
            f"{chance:.2%}); {what} was not registered; change "
            f"{MLRSNetMetaTrainer.step_settings}, or train longer"
        )


def run_transfer(
    cfg: TransferConfig, session: Session, num_workers: int
) -> tuple[list[dict], dict, dict]:
    """Train ``cfg.task`` once per method (a frozen registered MLR-SNet, loaded by its
    ``model_uri`` in the driver; hand-designed schedules by family). Must run inside an active
    MLflow run.

    Returns ``(rows, lr_curves, histories)`` for the table and plots.
    """
    import mlflow

    from raymeta.spec import LearnedRun, method_run
    from raymeta.tracking import as_params, run_name, run_tags
    from raymeta.train.ray_train import fit

    rows, curves, histories = [], {}, {}
    for method in cfg.methods:
        spec = method_run(method, cfg.task, f"transfer/{method.label}")
        meta_learner, version = None, None
        if isinstance(spec, LearnedRun):
            meta_learner, version = session.meta_learner(spec.model_uri)
        stage(
            f"transfer: {method.label} on {cfg.task.dataset}/{cfg.task.model}, "
            f"batch {cfg.task.batch_size}"
        )
        with nested_run(
            run_name=run_name("transfer", method.label, cfg.task.seed),
            tags=run_tags(spec, "transfer", method.label),
        ) as run:
            mlflow.log_params(as_params(spec.model_dump(mode="json")))
            if version is not None:
                mlflow.set_tag("meta_learner_version", version)
            result = fit(
                spec,
                meta_learner=meta_learner,
                mlflow_run_id=run.info.run_id,
                tracking_uri=session.tracking_uri,
                num_workers=num_workers,
                use_gpu=session.ray.use_gpu,
                storage_path=session.storage_path,
                max_failures=session.ray.max_failures,
            )
            mlflow.log_metric("wall_time_s", result.wall_time_s)
            if result.gammas:
                mlflow.log_param("gammas", [round(g, 5) for g in result.gammas])
        rows.append(
            _result_row(
                "transfer", method.label, cfg.task, result.history, result.wall_time_s, version
            )
        )
        curves[method.label] = (result.lrs, len(result.lrs) // cfg.task.epochs)
        histories[method.label] = result.history
    return rows, curves, histories


def check_pipeline(cfg: PipelineConfig, sections: Sequence[str]) -> None:
    """Every data-dependent check of ``sections``, in the driver, before MLflow or Ray.

    Raises:
        ConfigError, DataNotFoundError: one line naming the value.
    """
    from raymeta.longtail_study import check_longtail_study
    from raymeta.train.loop import check_task
    from raymeta.tune.compare import Comparison
    from raymeta.tune.study import check_transfer_study

    if "meta_train" in sections:
        meta_train_spec(cfg.meta_train, _meta_train_workers(cfg))
    if "transfer" in sections:
        check_task(cfg.transfer.task, cfg.ray.num_workers)
    if "longtail" in sections:
        check_longtail_study(cfg.longtail, cfg.ray.num_workers)
    if "mfm_search" in sections:
        from raymeta.tune.mfm_search import check_mfm_search

        check_mfm_search(cfg.mfm_search)
    if "compare" in sections:
        Comparison(cfg).check_data()
    if "study" in sections:
        check_transfer_study(cfg.study)
    if "suite" in sections:
        for task in cfg.suite.tasks:
            Comparison(cfg.model_copy(update={"compare": cfg.suite.compare(task)})).check_data()


def _meta_train_workers(cfg: PipelineConfig) -> int:
    return cfg.meta_train_workers or cfg.ray.num_workers


def _meta_train_histories(result, rows: list[dict]) -> dict[str, list[dict]]:
    """The per-epoch metrics of a meta-training ``result`` (a ``FitResult``) by its table
    ``rows``' labels, as plotted: each task's first run of a multi-task run."""
    if result.tasks:
        return {
            row["method"]: [h for h in task["history"] if h["restarts"] == 0]
            for row, task in zip(rows, result.tasks, strict=True)
        }
    return {META_TRAIN_LABEL: result.history}


def _run_training_sections(
    cfg: PipelineConfig, sections: Sequence[str], session: Session, parent: ParentRun
) -> pd.DataFrame:
    """``meta_train``, ``transfer`` and ``longtail`` (those in ``sections``), each in its stage
    run under the pipeline run ``parent`` (:meth:`ParentRun.stage`); returns the table of the
    last of them.

    A meta-training that registered its version is recorded in the pipeline state
    (:func:`raymeta.session.meta_train_record`); a resumed session that reuses it
    (:attr:`Session.reused_meta_train`) does not meta-train again and reports the saved rows
    and histories.

    Raises:
        RegistrationError: meta-training's registration failed (after the tables are written;
            ``transfer`` and ``longtail`` do not run).
    """
    import pandas as pd

    from raymeta.errors import RegistrationError
    from raymeta.longtail_study import run_longtail_study
    from raymeta.report import plot_accuracy_curves, plot_lr_curves, to_markdown, write_table
    from raymeta.tracking import log_results

    rows, curves, histories = [], {}, {}
    table = pd.DataFrame()
    failure = None  # a failed registration: reported after the results tables are written
    if "meta_train" in sections and session.reused_meta_train is not None:
        rows += session.reused_meta_train["rows"]
        histories.update(session.reused_meta_train["histories"])
    elif "meta_train" in sections:
        try:
            with parent.stage("meta-train"):
                _, version, result, meta_rows = run_meta_train(
                    cfg.meta_train, session, _meta_train_workers(cfg)
                )
                meta_histories = _meta_train_histories(result, meta_rows)
                parent.save(meta_train=meta_train_record(cfg, version, meta_rows, meta_histories))
        except RegistrationError as exc:
            failure, meta_rows = exc, exc.rows
            meta_histories = _meta_train_histories(exc.result, meta_rows)
        rows += meta_rows
        histories.update(meta_histories)
    if "transfer" in sections and failure is None:
        with parent.stage("transfer"):
            t_rows, curves, t_hist = run_transfer(cfg.transfer, session, cfg.ray.num_workers)
        rows += t_rows
        histories.update(t_hist)
    if rows:
        table = pd.DataFrame(rows)
        out = session.output_dir
        parquet, md = write_table(table, out)
        pngs = [plot_accuracy_curves(histories, out / "accuracy_curves.png")]
        if curves:
            pngs.append(plot_lr_curves(curves, out / "lr_curves.png", "transfer: LR schedules"))
        log_results([parquet, md, *pngs])
        print("\n" + to_markdown(table) + "\n")
        print(f"results: {parquet}, {md} and PNG plots in {out}")
    if failure is not None:
        raise failure
    if "longtail" in sections:
        with parent.stage("longtail"):
            table = run_longtail_study(cfg.longtail, session)
    return table


def run_pipeline(
    cfg: PipelineConfig, sections: Sequence[str] | None = None, *, resume: bool = False
) -> pd.DataFrame:
    """Run ``sections`` of a pipeline (default: every section it has) in their order
    (:data:`raymeta.config.SECTIONS`) in one session under the parent run ``pipeline/{name}``
    (module docstring), and return the results table of the last one (each is also written to
    ``output_dir``). Every command runs through here: ``raymeta run`` with every section,
    ``raymeta compare`` with ``compare``, ``raymeta study`` with ``study``.

    Args:
        resume: reopen the parent runs and Ray Tune experiments that an interrupted command
            saved (``compare``, ``study`` and ``suite``), and reuse the version that a finished
            ``meta_train`` registered (:meth:`raymeta.session.Session.reuse_meta_learner`;
            the other sections start again).

    Raises:
        ConfigError, DataNotFoundError: a missing section or a bad value, before any training
            (one line).
        Interrupted: Ctrl+C or SIGTERM (a ``KeyboardInterrupt``), once the session is closed;
            it says whether ``--resume`` would continue the pipeline
            (:func:`raymeta.session.can_resume`).
    """
    if sections is None:
        sections = [name for name in SECTIONS if getattr(cfg, name) is not None]
    for name in sections:
        if getattr(cfg, name) is None:
            raise ConfigError(f"{cfg.name}: the pipeline has no {name!r} section")
    sections = [name for name in SECTIONS if name in sections]
    try:
        check_pipeline(cfg, sections)
        return _run_sections(cfg, sections, resume)
    except KeyboardInterrupt as exc:
        raise Interrupted(can_resume(cfg, sections)) from exc


def _run_sections(cfg: PipelineConfig, sections: Sequence[str], resume: bool) -> pd.DataFrame:
    """:func:`run_pipeline` after its checks: ``sections`` (in run order) in one session."""
    import pandas as pd

    from raymeta.tracking import as_params
    from raymeta.tune.compare import Comparison
    from raymeta.tune.study import run_transfer_study
    from raymeta.tune.suite import run_transfer_suite

    table = pd.DataFrame()
    with open_session(cfg, sections, resume=resume) as session:
        import mlflow  # once the session is open: it refuses a bad --resume without MLflow

        params = as_params(cfg.model_dump(mode="json"))
        with session.parent_run(
            "pipeline", params=params, state_file=PIPELINE_STATE_FILE
        ) as parent:
            t0 = time.perf_counter()
            if {"meta_train", "transfer", "longtail"} & set(sections):
                table = _run_training_sections(cfg, sections, session, parent)
            if "mfm_search" in sections:
                from raymeta.tune.mfm_search import run_mfm_search

                table = run_mfm_search(cfg, session)
            if "compare" in sections:
                table = Comparison(cfg).run(session)
            if "study" in sections:
                table = run_transfer_study(cfg, session)
            if "suite" in sections:
                table = run_transfer_suite(cfg, session)
            mlflow.log_metric("pipeline_wall_time_s", time.perf_counter() - t0)
        print(f"MLflow parent run {parent.run_id} in {session.tracking_uri}")
    return table
