"""Declarative workflows (``raymeta run FILE``): meta-train MLR-SNet, register it, transfer it.

Flow: config -> Ray (local or ``ray.address``) -> one ``TorchTrainer`` per job -> MLflow (one
parent run per pipeline, a nested run per job) + a Parquet/Markdown table and PNG plots in
``output_dir``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from raymeta.config import MetaTrainConfig, PipelineConfig, RayConfig, TaskConfig, TransferConfig
from raymeta.report import plot_accuracy_curves, plot_lr_curves, to_markdown, write_table


def stage(message: str) -> None:
    """A progress banner for a pipeline stage (quiet under CI / RAYMETA_QUIET)."""
    from raymeta.train.ray_train import progress_enabled

    if progress_enabled():
        print(f"\n== {message}", flush=True)


def start_local_ray(num_cpus: int | None = None, **kwargs) -> str:
    """``ray.init(address="local", ...)`` with the GCS on a free port chosen here, exported to
    every process of the new cluster as ``RAY_ADDRESS`` (job-level ``runtime_env``).

    Why: Ray Train V2's ``PlacementGroupCleaner`` (a detached actor) queries the State API
    without an address; with a second Ray instance on the host it otherwise logs a
    "Found multiple active Ray instances" traceback on every run (training is unaffected).
    Ray Jobs set ``RAY_ADDRESS`` for their drivers the same way. Returns the GCS address.
    """
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by Ray when it starts a head node
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            runtime_env={"env_vars": {"RAY_ADDRESS": address}},
            **kwargs,
        )
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT")
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    return address


def init_ray(cfg: RayConfig) -> bool:
    """Connect to ``cfg.address`` / ``$RAY_ADDRESS``, or start a local Ray with ``cfg.num_cpus``.

    Returns True if this call started Ray (the caller then shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray(cfg.num_cpus)
    return True


@dataclass
class Context:
    """What every job of a pipeline shares."""

    ray: RayConfig
    tracking_uri: str
    output_dir: Path

    @property
    def storage_path(self) -> Path:
        return self.output_dir / "ray_results"


def _job_row(kind: str, label: str, task: TaskConfig, fit, version: str | None) -> dict:
    last = fit.history[-1]
    return {
        "job": kind,
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


def run_meta_train(cfg: MetaTrainConfig, ctx: Context, num_workers: int):
    """Meta-train MLR-SNet in a ``TorchTrainer``, log it to MLflow and register it under
    ``cfg.registered_model`` with ``cfg.alias``. Must run inside an active MLflow run.

    Returns ``(bundle, version, fit_result)``.
    """
    import mlflow

    from raymeta.schedules import MLRSNetBundle
    from raymeta.tracking import flatten, log_meta_learner
    from raymeta.train.ray_train import fit

    job = {
        "kind": "meta_train",
        **cfg.model_dump(
            include={
                "t_val",
                "meta_batch_size",
                "meta_lr",
                "meta_weight_decay",
                "hidden_size",
                "mlp_hidden",
            }
        ),
    }
    stage(
        f"meta-training MLR-SNet on {cfg.task.dataset}/{cfg.task.model} with {num_workers} Ray "
        f"Train worker(s), {cfg.task.epochs} epochs, a look-ahead every {cfg.t_val} steps"
    )
    with mlflow.start_run(run_name="meta-train", nested=True) as run:
        mlflow.log_params(flatten(cfg.model_dump(), "") | {"num_workers": num_workers})
        result = fit(
            cfg.task,
            job,
            label="meta-train",
            num_workers=num_workers,
            use_gpu=ctx.ray.use_gpu,
            storage_path=ctx.storage_path,
            max_failures=ctx.ray.max_failures,
            mlflow={"uri": ctx.tracking_uri, "run_id": run.info.run_id},
            saved_epochs=cfg.saved_epochs,
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
        png = ctx.output_dir / "meta_train_lr.png"
        plot_lr_curves(
            {"MLR-SNet (meta-training)": (result.lrs, spe)}, png, "LR during meta-training"
        )
        mlflow.log_artifact(str(png))
        version = log_meta_learner(bundle, cfg.registered_model, cfg.alias)
    return bundle, version, result


def run_transfer(
    cfg: TransferConfig, ctx: Context, num_workers: int
) -> tuple[list[dict], dict, dict]:
    """Train ``cfg.task`` once per method (a frozen registered MLR-SNet is loaded by its
    ``model_uri``; hand-designed schedules by family). Must run inside an active MLflow run.

    Returns ``(rows, lr_curves, histories)`` for the table and plots.
    """
    import mlflow

    from raymeta.tracking import flatten, load_meta_learner
    from raymeta.train.ray_train import fit

    rows, curves, histories = [], {}, {}
    for method in cfg.methods:
        version = None
        if method.schedule == "mlrsnet":
            bundle, version = load_meta_learner(method.model_uri)
            job = {"kind": "mlrsnet", "bundle": bundle, "gamma": method.gamma}
        else:
            job = {"kind": method.schedule, "lr": method.lr, "params": method.params}
        stage(
            f"transfer: {method.label} on {cfg.task.dataset}/{cfg.task.model}, batch {cfg.task.batch_size}"
        )
        with mlflow.start_run(run_name=f"transfer/{method.label}", nested=True) as run:
            mlflow.log_params(
                flatten(cfg.task.model_dump(), "task.") | flatten(method.model_dump(), "method.")
            )
            if version is not None:
                mlflow.set_tag("meta_learner_version", version)
            result = fit(
                cfg.task,
                job,
                label=f"transfer/{method.label}",
                num_workers=num_workers,
                use_gpu=ctx.ray.use_gpu,
                storage_path=ctx.storage_path,
                max_failures=ctx.ray.max_failures,
                mlflow={"uri": ctx.tracking_uri, "run_id": run.info.run_id},
            )
            mlflow.log_metric("wall_time_s", result.wall_time_s)
            if result.gammas:
                mlflow.log_param("gammas", [round(g, 5) for g in result.gammas])
        rows.append(_job_row("transfer", method.label, cfg.task, result, version))
        curves[method.label] = (result.lrs, len(result.lrs) // cfg.task.epochs)
        histories[method.label] = result.history
    return rows, curves, histories


def _registered_inputs(cfg: PipelineConfig) -> list[str]:
    """Registry URIs the pipeline loads but does not produce itself (checked before Ray)."""
    uris = []
    if cfg.meta_train is None:  # otherwise MLR-SNet URIs name what meta_train registers
        if cfg.transfer is not None:
            uris += [m.model_uri for m in cfg.transfer.methods if m.model_uri]
        if cfg.compare is not None:
            uris += [m.model_uri for m in cfg.compare.learned]
    if cfg.mfm is not None:
        own = f"models:/{cfg.mfm.registered_model}@{cfg.mfm.alias}"
        produced = cfg.mfm.registered_method is not None
        uris += [
            t.model_uri
            for t in cfg.mfm.transfer
            if t.model_uri and not (produced and t.model_uri == own)
        ]
    return list(dict.fromkeys(uris))


def run_pipeline(cfg: PipelineConfig) -> pd.DataFrame:
    """Run a pipeline end to end and return its results table (also written to ``output_dir``)."""
    import mlflow
    import ray

    from raymeta.tracking import check_registered, flatten, setup
    from raymeta.train.loop import check_task

    if cfg.meta_train is not None:
        workers = cfg.meta_train_workers or cfg.ray.num_workers
        check_task(cfg.meta_train.task, workers, cfg.meta_train.meta_batch_size)
    if cfg.transfer is not None:
        check_task(cfg.transfer.task, cfg.ray.num_workers)
    comparison = None
    if cfg.compare is not None:
        from raymeta.tune.compare import Comparison

        comparison = Comparison(cfg)
        comparison.check_data()
    if cfg.mfm is not None:
        from raymeta.longtail_study import check_study

        check_study(cfg.mfm, cfg.ray.num_workers)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri, experiment_id = setup(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    for model_uri in _registered_inputs(cfg):
        check_registered(model_uri)
    started = init_ray(cfg.ray)
    ctx = Context(cfg.ray, uri, out)
    t0 = time.perf_counter()
    rows, curves, histories = [], {}, {}
    df = pd.DataFrame()
    try:
        if cfg.mfm is not None:  # its own parent run (raymeta.longtail_study)
            from raymeta.longtail_study import run_study_pipeline

            df = run_study_pipeline(cfg, ctx, experiment_id)
            if cfg.meta_train is None and cfg.transfer is None and comparison is None:
                return df
        if cfg.meta_train is None and cfg.transfer is None and comparison is not None:
            return comparison.run()
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=f"pipeline/{cfg.name}"
        ) as parent:
            mlflow.log_params(flatten(cfg.model_dump(exclude={"transfer"})))
            if cfg.meta_train is not None:
                _, version, result = run_meta_train(
                    cfg.meta_train, ctx, cfg.meta_train_workers or cfg.ray.num_workers
                )
                rows.append(
                    _job_row(
                        "meta-train",
                        "MLR-SNet (meta-training)",
                        cfg.meta_train.task,
                        result,
                        version,
                    )
                )
                histories["MLR-SNet (meta-training)"] = result.history
            if cfg.transfer is not None:
                t_rows, curves, t_hist = run_transfer(cfg.transfer, ctx, cfg.ray.num_workers)
                rows += t_rows
                histories.update(t_hist)
            df = pd.DataFrame(rows)
            parquet, md = write_table(df, out)
            pngs = [plot_accuracy_curves(histories, out / "accuracy_curves.png")]
            if curves:
                pngs.append(plot_lr_curves(curves, out / "lr_curves.png", "transfer: LR schedules"))
            for path in (parquet, md, *pngs):
                mlflow.log_artifact(str(path))
            mlflow.log_metric("pipeline_wall_time_s", time.perf_counter() - t0)
            run_id = parent.info.run_id
        print("\n" + to_markdown(df) + "\n")
        print(f"results: {parquet}, {md} and PNG plots in {out}; MLflow run {run_id}")
        if comparison is not None:
            df = comparison.run()
    finally:
        if started:
            ray.shutdown()
    print(
        f"browse the runs: raymeta ui   (or: mlflow ui --backend-store-uri {uri} --host 127.0.0.1)"
    )
    return df
