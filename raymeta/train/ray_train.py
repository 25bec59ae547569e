"""Ray Train glue: one ``TorchTrainer`` run of :func:`raymeta.train.loop.train` on N workers.

``train_loop_per_worker`` is the plain loop plus the three Ray calls of every Ray Train
example: the device, ``prepare_model`` (DDP when N > 1; gloo on CPU, NCCL on GPU) and
``ray.train.report`` with a checkpoint every epoch. One glue serves every job kind: a
hand-designed or learned schedule, MLR-SNet meta-training, and the long-tailed methods
(``kind = "longtail"``: MFM, a frozen registered modulator, the baselines), which differ only
in the :class:`~raymeta.train.rules.UpdateRule` handed to the loop. After a worker failure Ray restarts the
group (``FailureConfig.max_failures``) and the loop resumes from the latest checkpoint.
Only rank 0 logs to MLflow and prints progress.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from raymeta.config import LongTailTaskConfig, TaskConfig
from raymeta.errors import RaymetaError

STATE_FILE = "state.pt"


def progress_enabled() -> bool:
    """Progress lines are printed unless ``$CI`` or ``$RAYMETA_QUIET`` is set."""
    return not (os.environ.get("CI") or os.environ.get("RAYMETA_QUIET"))


def _progress_line(label: str, m: dict[str, Any], epochs: int, elapsed: float) -> str:
    eta = elapsed / m["epoch"] * (epochs - m["epoch"])
    val = f"  val_acc {m['val_acc']:.2%}" if m["val_acc"] == m["val_acc"] else ""
    meta = f"  meta_loss {m['meta_loss']:.3f}" if "meta_loss" in m else ""
    few = m.get("test_few_acc", math.nan)
    few = f"  few-shot {few:.2%}" if few == few else ""
    return (
        f"[{label}] epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}{val}"
        f"  test_acc {m['test_acc']:.2%}{few}  mean lr {m['lr']:.4g}{meta}  {m['epoch_time_s']:.2g}s"
        f"  ETA {eta:.0f}s"
    )


def build_schedule(job: dict, task: TaskConfig, data, n_steps: int, workers):
    """The schedule of a job: ``kind`` ``meta_train`` (a trainable MLR-SNet with ``t_val``,
    ``meta_batch_size``, ``meta_lr``, ``meta_weight_decay`` and optional ``hidden_size``,
    ``mlp_hidden``), ``mlrsnet`` (a frozen ``bundle``, optional ``gamma``), ``longtail`` (its
    ``schedule`` entry) or a hand-designed family (``lr``, ``params``). For a language model
    MLR-SNet's input is the loss divided by ln(vocabulary size)."""
    from raymeta.data.text import mlrsnet_loss_scale
    from raymeta.meta.mlrsnet import MLRSNetMetaTrainer
    from raymeta.schedules import HandSchedule, MLRSNet, MLRSNetSchedule

    kind = job["kind"]
    scale = mlrsnet_loss_scale(data.num_classes) if data.train_y.dim() == 2 else 1.0
    if kind == "meta_train":
        torch.manual_seed(task.seed + 1)
        cell = MLRSNet(job.get("hidden_size", 50), job.get("mlp_hidden", 25))
        return MLRSNetMetaTrainer(
            cell.to(data.train_x.device),
            data.num_classes,
            meta_every=job["t_val"],
            meta_batch_size=job["meta_batch_size"],
            meta_lr=job["meta_lr"],
            meta_weight_decay=job["meta_weight_decay"],
            loss_scale=scale,
            average=workers.mean,
            momentum=task.momentum,
        )
    if kind == "mlrsnet":
        return MLRSNetSchedule(
            job["bundle"],
            data.num_classes,
            task.epochs,
            loss_scale=scale,
            fixed_gamma=job.get("gamma"),
            momentum=task.momentum,
        )
    if kind == "longtail":
        job = job["schedule"]
        kind = job["schedule"]
    return HandSchedule(kind, job["lr"], task.epochs * n_steps, n_steps, **job.get("params", {}))


def _build_rule(job: dict, task, data, model, schedule, workers):
    """The loop's update rule; a long-tailed method is built here, on the bare model, before
    the optimiser and before DDP (LDAM-DRW swaps the last layer, MFM attaches hooks)."""
    from raymeta.meta.methods import build_method
    from raymeta.models.modulation import ModulatorNet
    from raymeta.train.rules import MethodRule, rule_for_task

    if job["kind"] != "longtail":
        return rule_for_task(task, schedule)
    modulation = None
    if job.get("modulator"):  # transfer: a registered modulator network, frozen
        modulation = ModulatorNet(**job["modulator"]["config"])
        modulation.load_state_dict(job["modulator"]["state"])
    method = build_method(
        job["method"],
        data.class_counts,
        model,
        input_shape=(data.in_channels, data.image_size, data.image_size),
        epochs=task.epochs,
        average=workers.mean,
        modulation=modulation,
        **job.get("params", {}),
    )
    return MethodRule(method, job.get("meta_batch_size", 100))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: train one run, or a sequence of ``runs`` one after the other in
    the same worker group (a sweep pays Ray Train's start-up once).

    ``config``: ``threads``, optional ``fail_once_after_epoch``, and either the keys of one run
    or ``runs`` = a list of them. A run: ``task`` (TaskConfig dict; LongTailTaskConfig dict for
    ``longtail``), ``job`` (``kind`` = ``meta_train``, ``mlrsnet``, a hand-designed family, or
    ``longtail`` with ``method``, ``params``, ``meta_batch_size``, ``schedule`` = {schedule,
    lr, params} and an optional frozen ``modulator`` = {config, state}), ``label``, optional
    ``mlflow`` = ``{"uri", "run_id"}``, ``saved_epochs`` and ``keep_model`` (default True;
    False drops the run's weights from its result once it is finished).

    The checkpoint of every epoch holds the current run's state plus the results of the runs
    already finished (``done``), so a restarted group resumes the sweep where it stopped.
    """
    import ray.train
    import ray.train.torch

    for name in list(logging.root.manager.loggerDict):  # Train's per-report INFO lines
        if name.startswith("ray.train") or "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(config.get("threads", 1))
    runs = config.get("runs") or [config]
    checkpoint = ray.train.get_checkpoint()
    ckpt = None
    if checkpoint is not None:
        device = ray.train.torch.get_device()
        with checkpoint.as_directory() as d:
            ckpt = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
    done = list(ckpt.get("done", [])) if ckpt else []
    for index in range(len(done), len(runs)):
        resume = ckpt if ckpt is not None and ckpt.get("index", 0) == index else None
        done.append(_train_run(runs[index], config, index, done, resume, checkpoint is None))


def _train_run(
    run: dict, config: dict, index: int, done: list[dict], ckpt: dict | None, first_attempt: bool
) -> dict:
    """One run of :func:`train_loop_per_worker`; returns its result (the keys of
    :class:`FitResult`)."""
    import ray.train
    import ray.train.torch

    from raymeta.data.batches import steps_per_epoch
    from raymeta.tracking import log_epoch_metrics
    from raymeta.train.loop import RunState, Workers, build_task_model, load_task_data, train

    job, label = run["job"], run.get("label", run["job"]["kind"])
    task = (LongTailTaskConfig if job["kind"] == "longtail" else TaskConfig)(**run["task"])
    workers = Workers.current()
    device = ray.train.torch.get_device()
    data = load_task_data(task, device)
    model = build_task_model(task, data, device)
    n_steps = steps_per_epoch(
        len(data.train_y), task.batch_size // workers.world_size, workers.world_size
    )
    schedule = build_schedule(job, task, data, n_steps, workers)
    rule = _build_rule(job, task, data, model, schedule, workers)
    state, optimizer_state, saved_cells, elapsed = RunState(), None, {}, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        schedule.load_state_dict(ckpt["schedule"])
        rule.load_state_dict(ckpt["rule"])
        state, optimizer_state = RunState(**ckpt["run"]), ckpt["optimizer"]
        saved_cells, elapsed = ckpt["saved_cells"], ckpt.get("elapsed_s", 0.0)
    if workers.world_size > 1:
        model = ray.train.torch.prepare_model(model)
    saved_epochs = set(run.get("saved_epochs", []))
    t_start = time.perf_counter() - elapsed
    fail_at = config.get("fail_once_after_epoch")
    payload: dict[str, Any] = {}

    def on_epoch_end(metrics, run_state, optimizer):
        if job["kind"] == "meta_train" and metrics["epoch"] in saved_epochs:
            saved_cells[metrics["epoch"]] = {
                k: v.clone().cpu() for k, v in schedule.cell.state_dict().items()
            }
        report = {**metrics, "step": run_state.step, "run_index": index}
        base = getattr(model, "module", model)
        payload.update(
            model=base.state_dict(),
            optimizer=optimizer.state_dict(),
            schedule=schedule.state_dict(),
            rule=rule.state_dict(),
            run=asdict(run_state),
            saved_cells=saved_cells,
            gamma=getattr(schedule, "gamma", None),
            gammas=getattr(schedule, "gammas", None),
            elapsed_s=time.perf_counter() - t_start,
        )
        if workers.rank != 0:
            ray.train.report(report)
        else:
            mlflow_cfg = run.get("mlflow")
            if mlflow_cfg:
                log_epoch_metrics(mlflow_cfg["uri"], mlflow_cfg["run_id"], metrics)
            if progress_enabled():
                line = _progress_line(label, metrics, task.epochs, time.perf_counter() - t_start)
                print(line, file=sys.__stdout__, flush=True)  # bypass Train's print-to-log tee
            with tempfile.TemporaryDirectory() as d:
                torch.save({**payload, "index": index, "done": done}, Path(d) / STATE_FILE)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
        if fail_at == metrics["epoch"] and first_attempt:
            raise RuntimeError(
                f"injected worker failure after epoch {fail_at} (fault-tolerance test)"
            )

    train(
        task,
        data,
        model,
        schedule,
        rule=rule,
        workers=workers,
        state=state,
        optimizer_state=optimizer_state,
        on_epoch_end=on_epoch_end,
    )
    result = _result_of(payload)
    if not run.get("keep_model", True):  # sweeps: keep checkpoints small
        result["model_state"] = {}
    return result


def _result_of(payload: dict) -> dict:
    """The :class:`FitResult` keys of a run's last checkpoint payload."""
    return {
        "history": payload["run"]["history"],
        "lrs": payload["run"]["lrs"],
        "saved_cells": payload["saved_cells"],
        "gamma": payload["gamma"],
        "gammas": payload["gammas"],
        "wall_time_s": payload["elapsed_s"],
        "model_state": {k: v.cpu() for k, v in payload["model"].items()},
        "rule_state": payload["rule"],
    }


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
    rule_state: dict = field(default_factory=dict)  # e.g. an MFM run's meta-trained modulation


def fit(
    task: TaskConfig | LongTailTaskConfig,
    job: dict[str, Any],
    *,
    label: str,
    mlflow: dict[str, str] | None = None,
    saved_epochs: list[int] | None = None,
    **options,
) -> FitResult:
    """Run one job in a ``TorchTrainer`` and return its result. Ray must be initialised.

    Args:
        task: the task to train.
        job: the schedule and method (see :func:`train_loop_per_worker`).
        label: a run name (also the progress prefix).
        mlflow: ``{"uri": tracking URI, "run_id": run}`` for rank 0's per-epoch metrics.
        saved_epochs: meta-training epochs (1-based) at which to keep the meta-learner.
        options: as :func:`fit_runs` (``num_workers``, ``use_gpu``, ``storage_path``,
            ``max_failures``, ``fail_once_after_epoch``, ``threads``).

    Returns:
        The run's :class:`FitResult`; ``wall_time_s`` includes Ray Train's start-up.
    """
    run = {
        "task": task.model_dump(),
        "job": job,
        "label": label,
        "mlflow": mlflow,
        "saved_epochs": saved_epochs or [],
    }
    t0 = time.perf_counter()
    (result,) = fit_runs([run], name=label, **options)
    result.wall_time_s = time.perf_counter() - t0
    return result


def fit_runs(
    runs: list[dict[str, Any]],
    *,
    name: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    storage_path: str | Path = "ray_results",
    max_failures: int = 1,
    fail_once_after_epoch: int | None = None,
    threads: int | None = None,
) -> list[FitResult]:
    """Train ``runs`` one after the other in one ``TorchTrainer`` (one worker group, one Ray
    Train start-up, about 10-18 s on a small machine) and return their results in order. Ray
    must be initialised.

    Args:
        runs: dicts with ``task`` (a config dict), ``job``, ``label``, optional ``mlflow`` and
            ``saved_epochs`` (see :func:`train_loop_per_worker`).
        name: the Ray Train run name prefix.
        num_workers: data-parallel workers; each task's ``batch_size`` is split across them.
        use_gpu: one GPU per worker (NCCL) instead of CPU (gloo).
        storage_path: where Ray Train keeps checkpoints (made absolute).
        max_failures: worker-group restarts allowed (resume from the last checkpoint).
        fail_once_after_epoch: inject one worker failure (for fault-tolerance tests).
        threads: torch threads per worker (default: this machine's CPUs / ``num_workers``).

    Returns:
        One :class:`FitResult` per run; ``wall_time_s`` is the run's own time in the worker
        (training, evaluation, checkpoints).

    Raises:
        RaymetaError: a user-input error inside a worker, re-raised on one line.
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
        "runs": runs,
        "threads": threads or cpus,
        "fail_once_after_epoch": fail_once_after_epoch,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}
        ),
        run_config=RunConfig(
            name=f"{name.replace('/', '-')}-{int(time.time() * 1000)}",
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        cause = _user_error(exc)
        if cause is None:
            raise
        raise cause from None
    with result.checkpoint.as_directory() as d:
        ckpt = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    return [FitResult(**r) for r in ckpt["done"]] + [FitResult(**_result_of(ckpt))]
