"""Ray Train glue: one ``TorchTrainer`` run of :func:`raymeta.train.loop.train` on N workers.

``train_loop_per_worker`` is the plain loop plus the three Ray calls of every Ray Train
example: the device, ``prepare_model`` (DDP when N > 1; gloo on CPU, NCCL on GPU) and
``ray.train.report`` with a checkpoint every epoch. After a worker failure Ray restarts the
group (``FailureConfig.max_failures``) and the loop resumes from the latest checkpoint.
Only rank 0 logs to MLflow and prints progress.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from raymeta.config import TaskConfig
from raymeta.errors import RaymetaError

STATE_FILE = "state.pt"


def _progress_enabled() -> bool:
    return not (os.environ.get("CI") or os.environ.get("RAYMETA_QUIET"))


def _progress_line(label: str, m: dict[str, Any], epochs: int, elapsed: float) -> str:
    eta = elapsed / m["epoch"] * (epochs - m["epoch"])
    val = f"  val_acc {m['val_acc']:.2%}" if m["val_acc"] == m["val_acc"] else ""
    meta = f"  meta_loss {m['meta_loss']:.3f}" if "meta_loss" in m else ""
    return (
        f"[{label}] epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}{val}"
        f"  test_acc {m['test_acc']:.2%}  lr {m['lr']:.4g}{meta}  {m['epoch_time_s']:.1f}s"
        f"  ETA {eta:.0f}s"
    )


def _build_schedule(job: dict, task: TaskConfig, data, n_steps: int, workers):
    from raymeta.meta.mlrsnet import MLRSNetMetaTrainer
    from raymeta.schedules import HandSchedule, MLRSNet, MLRSNetSchedule

    kind = job["kind"]
    if kind == "meta_train":
        torch.manual_seed(task.seed + 1)
        cell = MLRSNet(job["hidden_size"], job["mlp_hidden"]).to(data.train_x.device)
        return MLRSNetMetaTrainer(
            cell,
            data.num_classes,
            t_val=job["t_val"],
            meta_batch_size=job["meta_batch_size"],
            meta_lr=job["meta_lr"],
            meta_weight_decay=job["meta_weight_decay"],
            average=workers.mean,
        )
    if kind == "mlrsnet":
        return MLRSNetSchedule(
            job["bundle"], data.num_classes, task.epochs, fixed_gamma=job.get("gamma")
        )
    return HandSchedule(kind, job["lr"], task.epochs * n_steps, n_steps, **job.get("params", {}))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: ``task`` (TaskConfig dict), ``job`` (what schedule:
    ``kind`` = ``meta_train``, ``mlrsnet`` or a hand-designed family, plus its settings),
    ``label``, ``threads``, optional ``mlflow`` = ``{"uri", "run_id"}`` and ``saved_epochs``."""
    import ray.train
    import ray.train.torch

    from raymeta.data.batches import steps_per_epoch
    from raymeta.tracking import log_epoch_metrics
    from raymeta.train.loop import RunState, Workers, build_task_model, load_task_data, train

    for name in list(logging.root.manager.loggerDict):  # Train's per-report INFO lines
        if name.startswith("ray.train") or "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(config.get("threads", 1))
    task = TaskConfig(**config["task"])
    job, label = config["job"], config.get("label", config["job"]["kind"])
    workers = Workers.current()
    device = ray.train.torch.get_device()
    data = load_task_data(task, device)
    model = build_task_model(task, data, device)
    n_steps = steps_per_epoch(
        len(data.train_y), task.batch_size // workers.world_size, workers.world_size
    )
    schedule = _build_schedule(job, task, data, n_steps, workers)
    state, optimizer_state, saved_cells = RunState(), None, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            ckpt = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        schedule.load_state_dict(ckpt["schedule"])
        state, optimizer_state = RunState(**ckpt["run"]), ckpt["optimizer"]
        saved_cells = ckpt["saved_cells"]
    if workers.world_size > 1:
        model = ray.train.torch.prepare_model(model)
    saved_epochs = set(config.get("saved_epochs", []))
    t_start = time.perf_counter()
    fail_at = config.get("fail_once_after_epoch")

    def on_epoch_end(metrics, run_state, optimizer):
        if job["kind"] == "meta_train" and metrics["epoch"] in saved_epochs:
            saved_cells[metrics["epoch"]] = {
                k: v.clone().cpu() for k, v in schedule.cell.state_dict().items()
            }
        report = {**metrics, "step": run_state.step}
        if workers.rank != 0:
            ray.train.report(report)
        else:
            mlflow_cfg = config.get("mlflow")
            if mlflow_cfg:
                log_epoch_metrics(mlflow_cfg["uri"], mlflow_cfg["run_id"], metrics)
            if _progress_enabled():
                line = _progress_line(label, metrics, task.epochs, time.perf_counter() - t_start)
                print(line, file=sys.__stdout__, flush=True)  # bypass Train's print-to-log tee
            base = getattr(model, "module", model)
            payload = {
                "model": base.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "run": asdict(run_state),
                "saved_cells": saved_cells,
                "gamma": getattr(schedule, "gamma", None),
                "gammas": getattr(schedule, "gammas", None),
            }
            with tempfile.TemporaryDirectory() as d:
                torch.save(payload, Path(d) / STATE_FILE)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
        if fail_at == metrics["epoch"] and checkpoint is None:
            raise RuntimeError(
                f"injected worker failure after epoch {fail_at} (fault-tolerance test)"
            )

    train(
        task,
        data,
        model,
        schedule,
        workers=workers,
        state=state,
        optimizer_state=optimizer_state,
        on_epoch_end=on_epoch_end,
    )


def _user_error(exc: BaseException) -> RaymetaError | None:
    """The first raymeta (user-input) error behind a failed Train run, to re-raise on one line."""
    failures = list(getattr(exc, "worker_failures", {}).values())
    failures += [getattr(exc, "controller_failure", None)]
    for failure in failures:
        seen = 0
        while failure is not None and seen < 10:
            if isinstance(failure, RaymetaError):
                return type(failure)(str(failure))
            failure = getattr(failure, "cause", None) or failure.__cause__
            seen += 1
    return None


@dataclass
class FitResult:
    """What a finished run hands back to the driver (from its last checkpoint)."""

    history: list[dict]
    lrs: list[float]
    saved_cells: dict[int, dict[str, torch.Tensor]]
    gamma: float | None
    gammas: list[float] | None
    wall_time_s: float
    model_state: dict[str, torch.Tensor]


def fit(
    task: TaskConfig,
    job: dict[str, Any],
    *,
    label: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    storage_path: str | Path = "ray_results",
    max_failures: int = 1,
    mlflow: dict[str, str] | None = None,
    saved_epochs: list[int] | None = None,
    fail_once_after_epoch: int | None = None,
) -> FitResult:
    """Run one job in a ``TorchTrainer`` and return its result. Ray must be initialised.

    Args:
        task: the task to train.
        job: the schedule (see :func:`train_loop_per_worker`).
        label: a run name (also the progress prefix).
        num_workers: data-parallel workers; ``task.batch_size`` is split across them.
        use_gpu: one GPU per worker (NCCL) instead of CPU (gloo).
        storage_path: where Ray Train keeps checkpoints (made absolute).
        max_failures: worker-group restarts allowed (resume from the last checkpoint).
        mlflow: ``{"uri": tracking URI, "run_id": run}`` for rank 0's per-epoch metrics.
        saved_epochs: meta-training epochs (1-based) at which to keep the meta-learner.
        fail_once_after_epoch: inject one worker failure (for fault-tolerance tests).
    """
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    cpus = max(1, (os.cpu_count() or 1) // num_workers) if not use_gpu else 1
    config = {
        "task": task.model_dump(),
        "job": job,
        "label": label,
        "threads": cpus,
        "mlflow": mlflow,
        "saved_epochs": saved_epochs or [],
        "fail_once_after_epoch": fail_once_after_epoch,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}
        ),
        run_config=RunConfig(
            name=f"{label}-{int(time.time() * 1000)}",
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        cause = _user_error(exc)
        if cause is None:
            raise
        raise cause from None
    wall = time.perf_counter() - t0
    with result.checkpoint.as_directory() as d:
        ckpt = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    return FitResult(
        history=ckpt["run"]["history"],
        lrs=ckpt["run"]["lrs"],
        saved_cells=ckpt["saved_cells"],
        gamma=ckpt["gamma"],
        gammas=ckpt["gammas"],
        wall_time_s=wall,
        model_state=ckpt["model"],
    )
