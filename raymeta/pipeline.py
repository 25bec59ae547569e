"""Declarative workflows (``raymeta run FILE``): every section of a pipeline, in one session.

Flow: the sections' data checks in the driver -> :func:`raymeta.session.open_session` (output
folder, MLflow, registry inputs, Ray) -> ``meta_train``, ``transfer`` and ``longtail`` under
one parent run ``pipeline/{name}`` (a nested run per Ray Train run), then ``compare`` and
``study`` under their own parent runs -> a Parquet/Markdown table and PNG plots per section in
``output_dir``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd

from raymeta.config import SECTIONS, MetaTrainConfig, PipelineConfig, TaskConfig, TransferConfig
from raymeta.console import stage
from raymeta.errors import ConfigError
from raymeta.report import plot_accuracy_curves, plot_lr_curves, to_markdown, write_table
from raymeta.session import Session, open_session


def _result_row(stage_name: str, label: str, task: TaskConfig, fit, version: str | None) -> dict:
    last = fit.history[-1]
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
        "best_val_acc": max(h["val_acc"] for h in fit.history),
        "wall_time_s": fit.wall_time_s,
        "meta_learner_version": None if version is None else str(version),
    }


def run_meta_train(cfg: MetaTrainConfig, session: Session, num_workers: int):
    """Meta-train MLR-SNet in a ``TorchTrainer``, log it to MLflow and register it under
    ``cfg.registered_model`` with ``cfg.alias``. Must run inside an active MLflow run.

    Returns ``(bundle, version, fit_result)``.
    """
    import mlflow

    from raymeta.schedules import MLRSNetBundle
    from raymeta.spec import meta_train_run
    from raymeta.tracking import as_params, log_meta_learner
    from raymeta.train.ray_train import fit

    spec = meta_train_run(cfg, cfg.task, "meta-train", cfg.saved_epochs)
    stage(
        f"meta-training MLR-SNet on {cfg.task.dataset}/{cfg.task.model} with {num_workers} Ray "
        f"Train worker(s), {cfg.task.epochs} epochs, a look-ahead every {cfg.meta_every} steps"
    )
    with mlflow.start_run(run_name="meta-train", nested=True) as run:
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
            source=f"meta-trained on {cfg.task.dataset}/{cfg.task.model} (run {run.info.run_id})",
        )
        mlflow.log_metric("gamma", result.gamma)
        mlflow.log_metric("wall_time_s", result.wall_time_s)
        spe = len(result.lrs) // cfg.task.epochs
        png = session.output_dir / "meta_train_lr.png"
        plot_lr_curves(
            {"MLR-SNet (meta-training)": (result.lrs, spe)}, png, "LR during meta-training"
        )
        mlflow.log_artifact(str(png))
        check_not_at_chance(result.history[-1], f"models:/{cfg.registered_model}")
        version = log_meta_learner(bundle, cfg.registered_model, cfg.alias)
    return bundle, version, result


CHANCE_MARGIN = 0.01  # test accuracy must beat the majority-class rate by this much


def check_not_at_chance(last_epoch: dict, what: str) -> None:
    """Refuse to register ``what`` from a meta-training run whose final test accuracy is within
    :data:`CHANCE_MARGIN` of chance (the majority-class rate of the test split,
    ``chance_acc``): a dead meta-learner must never reach the registry.

    Raises:
        DeadRunError: one line with both accuracies.
    """
    from raymeta.errors import DeadRunError

    acc, chance = last_epoch["test_acc"], last_epoch["chance_acc"]
    if acc <= chance + CHANCE_MARGIN:
        raise DeadRunError(
            f"meta-training ended at chance level (test accuracy {acc:.2%}, chance "
            f"{chance:.2%}); {what} was not registered; lower the LR scale (gamma) or the "
            "momentum, or train longer"
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
    from raymeta.tracking import as_params
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
        with mlflow.start_run(run_name=spec.label, nested=True) as run:
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
        rows.append(_result_row("transfer", method.label, cfg.task, result, version))
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
        check_task(cfg.meta_train.task, _meta_train_workers(cfg), cfg.meta_train.meta_batch_size)
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


def _run_training_sections(
    cfg: PipelineConfig, sections: Sequence[str], session: Session
) -> pd.DataFrame:
    """``meta_train``, ``transfer`` and ``longtail`` (those in ``sections``) under the parent
    run ``pipeline/{name}``; returns the table of the last of them."""
    import mlflow

    from raymeta.longtail_study import run_longtail_study
    from raymeta.tracking import as_params

    t0 = time.perf_counter()
    rows, curves, histories = [], {}, {}
    table = pd.DataFrame()
    with session.parent_run("pipeline", params=as_params(cfg.model_dump(mode="json"))) as parent:
        if "meta_train" in sections:
            _, version, result = run_meta_train(cfg.meta_train, session, _meta_train_workers(cfg))
            label = "MLR-SNet (meta-training)"
            rows.append(_result_row("meta-train", label, cfg.meta_train.task, result, version))
            histories[label] = result.history
        if "transfer" in sections:
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
            for path in (parquet, md, *pngs):
                mlflow.log_artifact(str(path))
            print("\n" + to_markdown(table) + "\n")
            print(f"results: {parquet}, {md} and PNG plots in {out}")
        if "longtail" in sections:
            table = run_longtail_study(cfg.longtail, session)
        mlflow.log_metric("pipeline_wall_time_s", time.perf_counter() - t0)
    print(f"MLflow parent run {parent.run_id} in {session.tracking_uri}")
    return table


def run_pipeline(
    cfg: PipelineConfig, sections: Sequence[str] | None = None, *, resume: bool = False
) -> pd.DataFrame:
    """Run ``sections`` of a pipeline (default: every section it has) in their order
    (:data:`raymeta.config.SECTIONS`) in one session, and return the results table of the last
    one (each is also written to ``output_dir``). Every command runs through here: ``raymeta
    run`` with every section, ``raymeta compare`` with ``compare``, ``raymeta study`` with
    ``study``.

    Args:
        resume: reopen the parent runs and Ray Tune experiments that an interrupted command
            saved (``compare`` and ``study``; the other sections start again).

    Raises:
        ConfigError, DataNotFoundError: a missing section or a bad value, before any training
            (one line).
    """
    from raymeta.tune.compare import Comparison
    from raymeta.tune.study import run_transfer_study
    from raymeta.tune.suite import run_transfer_suite

    if sections is None:
        sections = [name for name in SECTIONS if getattr(cfg, name) is not None]
    for name in sections:
        if getattr(cfg, name) is None:
            raise ConfigError(f"{cfg.name}: the pipeline has no {name!r} section")
    sections = [name for name in SECTIONS if name in sections]
    check_pipeline(cfg, sections)
    table = pd.DataFrame()
    with open_session(cfg, sections, resume=resume) as session:
        if {"meta_train", "transfer", "longtail"} & set(sections):
            table = _run_training_sections(cfg, sections, session)
        if "mfm_search" in sections:
            from raymeta.tune.mfm_search import run_mfm_search

            table = run_mfm_search(cfg, session)
        if "compare" in sections:
            table = Comparison(cfg).run(session)
        if "study" in sections:
            table = run_transfer_study(cfg, session)
        if "suite" in sections:
            table = run_transfer_suite(cfg, session)
    return table
