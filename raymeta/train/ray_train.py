"""Ray Train glue: one ``TorchTrainer`` run of :func:`raymeta.train.loop.train` on N workers.

``train_loop_per_worker`` is the plain loop plus the three Ray calls of every Ray Train
example: the device, ``prepare_model`` (DDP when N > 1; gloo on CPU, NCCL on GPU) and
``ray.train.report`` with a checkpoint every epoch. One glue serves every kind of run spec
(:mod:`raymeta.spec`: a hand-designed or learned schedule, MLR-SNet meta-training, the
long-tailed methods), each assembled by :func:`raymeta.train.build.build_run`. After a worker
failure Ray restarts the group (``FailureConfig.max_failures``) and the loop resumes from the
latest checkpoint. Only rank 0 logs to MLflow and prints progress.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raymeta.console import progress_enabled
from raymeta.errors import DeadRunError, NonFiniteLossError, RaymetaError
from raymeta.spec import MetaTrainRun, MultiTaskMetaTrainRun, RunSpec

STATE_FILE = "state.pt"


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


@dataclass
class RunRequest:
    """One run for :func:`fit_runs`: its spec and what travels beside it.

    Attributes:
        spec: what to train.
        meta_learner: the registered meta-learner the spec names by ``model_uri``, loaded in
            the driver (see :func:`raymeta.train.build.build_run`).
        mlflow_run_id: the MLflow run that rank 0 logs to, once per epoch: the epoch metrics
            (:func:`raymeta.tracking.epoch_points`) and the per-step curves
            (:class:`raymeta.tracking.StepCurves`).
        keep_model: False drops the run's weights from its result once it is finished
            (sweeps: keeps checkpoints small).
        dead_run_is_result: a run stopped as dead (:class:`~raymeta.errors.DeadRunError` from
            the dead-run guard, :mod:`raymeta.train.guard`, or
            :class:`~raymeta.errors.NonFiniteLossError` for a NaN or infinite loss) ends with a
            result whose ``dead_reason`` is that one-line error, and the worker group goes on
            with the next run; otherwise the error ends the whole :func:`fit_runs` call. Other
            errors end it either way.
    """

    spec: RunSpec
    meta_learner: nn.Module | None = None
    mlflow_run_id: str | None = None
    keep_model: bool = True
    dead_run_is_result: bool = False


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: train one run, or a sequence of ``runs`` one after the other in
    the same worker group (a sweep pays Ray Train's start-up once).

    ``config``: ``runs`` (a list of :class:`RunRequest`), ``threads``, ``use_gpu``,
    ``tracking_uri`` (for the requests' MLflow runs) and optional ``fail_once_after_epoch``.

    The checkpoint of every epoch holds the current run's state plus the results of the runs
    already finished (``done``), so a restarted group resumes the sweep where it stopped.
    """
    import ray.train

    from raymeta.train.device import resolve_device

    for name in list(logging.root.manager.loggerDict):  # Train's per-report INFO lines
        if name.startswith("ray.train") or "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(config.get("threads", 1))
    runs = config["runs"]
    checkpoint = ray.train.get_checkpoint()
    ckpt = None
    if checkpoint is not None:
        device = resolve_device(config["use_gpu"])
        with checkpoint.as_directory() as d:
            ckpt = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
    done = list(ckpt.get("done", [])) if ckpt else []
    for index in range(len(done), len(runs)):
        resume = ckpt if ckpt is not None and ckpt.get("index", 0) == index else None
        try:
            attempt = _RunAttempt(runs[index], config, index, done, resume, checkpoint is None)
            done.append(_train_run(attempt))
        except RaymetaError as exc:
            _report_user_error(type(exc)(f"run {runs[index].spec.label!r}: {exc}"))
            return


def _report_user_error(exc: RaymetaError) -> None:
    """End the run with a deterministic user error (a bad value, a dead run) as its result
    instead of raising it: Ray Train would restart the worker group
    (``FailureConfig.max_failures``) and fail the same way again. Every worker reaches this at
    the same step (the guard's losses and the config are the same on all), and every worker
    reports once; rank 0's checkpoint carries the error for :func:`fit_runs` to raise."""
    import ray.train

    error = {"type": type(exc).__name__, "message": str(exc)}
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({"error": 1})
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"error": error}, Path(d) / STATE_FILE)
        ray.train.report({"error": 1}, checkpoint=ray.train.Checkpoint.from_directory(d))


def _raise_user_error(error: dict) -> None:
    """Raise the error :func:`_report_user_error` saved, as its own raymeta error type."""
    import raymeta.errors

    cls = getattr(raymeta.errors, error["type"], RaymetaError)
    if not (isinstance(cls, type) and issubclass(cls, RaymetaError)):
        cls = RaymetaError
    raise cls(error["message"])


@dataclass
class _RunAttempt:
    """One run of a sweep as a worker of :func:`train_loop_per_worker` trains it.

    Attributes:
        request: the run.
        config: the loop's ``config``.
        index: the run's place in the sweep (``config["runs"]``).
        done: the results of the sweep's runs already finished (saved in every checkpoint).
        ckpt: the run's checkpoint to resume from (the payload :meth:`report_checkpoint`
            saved); None: from the start.
        first_attempt: the group's first attempt (it started without any checkpoint); only it
            injects ``fail_once_after_epoch``.
    """

    request: RunRequest
    config: dict
    index: int
    done: list[dict]
    ckpt: dict | None
    first_attempt: bool

    def report_checkpoint(self, metrics: dict, payload: dict) -> None:
        """Rank 0's ``ray.train.report`` of ``metrics`` with a checkpoint (``STATE_FILE``)
        holding ``payload`` and the run's place in the sweep (``index``, ``done``)."""
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            torch.save({**payload, "index": self.index, "done": self.done}, Path(d) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def fail_if_injected(self, epoch: int) -> None:
        """Raise the injected worker failure (fault-tolerance tests) after epoch
        ``fail_once_after_epoch`` of the first attempt."""
        if self.config.get("fail_once_after_epoch") == epoch and self.first_attempt:
            raise RuntimeError(
                f"injected worker failure after epoch {epoch} (fault-tolerance test)"
            )


def _train_run(attempt: _RunAttempt) -> dict:
    """One run of :func:`train_loop_per_worker`; returns its result (the keys of
    :class:`FitResult`)."""
    import ray.train
    import ray.train.torch

    from raymeta.tracking import StepCurves, epoch_points, flush_metrics, log_points
    from raymeta.train.build import build_run
    from raymeta.train.device import resolve_device
    from raymeta.train.loop import RunState, Workers

    request, config, index, ckpt = attempt.request, attempt.config, attempt.index, attempt.ckpt
    spec = request.spec
    if isinstance(spec, MultiTaskMetaTrainRun):
        return _train_multitask(attempt)
    built = build_run(
        spec,
        resolve_device(config["use_gpu"]),
        Workers.current(),
        meta_learner=request.meta_learner,
    )
    model, schedule, rule, workers = built.model, built.schedule, built.rule, built.workers
    state, optimizer_state, saved_cells, elapsed = RunState(), None, {}, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        schedule.load_state_dict(ckpt["schedule"])
        rule.load_state_dict(ckpt["rule"])
        state, optimizer_state = RunState(**ckpt["run"]), ckpt["optimizer"]
        saved_cells, elapsed = ckpt["saved_cells"], ckpt.get("elapsed_s", 0.0)
    if workers.world_size > 1:
        built.model = ray.train.torch.prepare_model(model)
    saved_epochs = set(spec.saved_epochs) if isinstance(spec, MetaTrainRun) else set()
    t_start = time.perf_counter() - elapsed
    payload: dict[str, Any] = {}
    curves = StepCurves(spec.task.epochs * built.steps_per_epoch)

    def on_epoch_end(metrics, run_state, optimizer):
        if metrics["epoch"] in saved_epochs:
            saved_cells[metrics["epoch"]] = {
                k: v.clone().cpu() for k, v in schedule.cell.state_dict().items()
            }
        report = {**metrics, "step": run_state.step, "run_index": index}
        payload.update(
            model=model.state_dict(),
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
            if request.mlflow_run_id:  # one log_batch per epoch: epoch metrics, step curves
                points = epoch_points(metrics) + curves.drain()
                log_points(config["tracking_uri"], request.mlflow_run_id, points)
            if progress_enabled():
                elapsed_s = time.perf_counter() - t_start
                line = _progress_line(spec.label, metrics, spec.task.epochs, elapsed_s)
                print(line, file=sys.__stdout__, flush=True)  # bypass Train's print-to-log tee
            attempt.report_checkpoint(report, payload)
        attempt.fail_if_injected(metrics["epoch"])

    try:
        built.train(
            state=state,
            optimizer_state=optimizer_state,
            on_epoch_end=on_epoch_end,
            on_step=curves if workers.rank == 0 and request.mlflow_run_id else None,
        )
    except (DeadRunError, NonFiniteLossError) as exc:
        if not request.dead_run_is_result:
            raise
        dead = _dead_result(exc, state, time.perf_counter() - t_start)
        _report_dead_run(dead, attempt, curves, workers.rank)
        return dead
    if request.mlflow_run_id and workers.rank == 0:  # what an MLflow outage held back
        flush_metrics(config["tracking_uri"], request.mlflow_run_id, final=True)
    result = _result_of(payload)
    if not request.keep_model:
        result["model_state"] = {}
    return result


def _dead_result(exc: RaymetaError, state, elapsed_s: float) -> dict:
    """The result (the keys of :class:`FitResult`) of a run stopped as dead by ``exc``: the
    epochs it finished before the stop (``state``, a :class:`~raymeta.train.loop.RunState`),
    its LRs so far, no weights, and ``dead_reason``, the one-line error."""
    return {
        "history": state.history,
        "lrs": state.lrs,
        "saved_cells": {},
        "gamma": None,
        "gammas": None,
        "wall_time_s": elapsed_s,
        "model_state": {},
        "dead_reason": str(exc),
    }


def _report_dead_run(dead: dict, attempt: _RunAttempt, curves, rank: int) -> None:
    """Record a dead run (:attr:`RunRequest.dead_run_is_result`) so that the group goes on:
    rank 0 logs ``dead_run`` 1 and the step curves up to the stop to the run's MLflow run, and
    every worker reports once (all stop at the same step: the guard's losses are
    worker-averaged), rank 0 with a checkpoint whose ``done`` ends with ``dead``, which a
    restarted group resumes after and :func:`fit_runs` reads when this run is the last."""
    import ray.train

    from raymeta.tracking import flush_metrics, log_points

    request, config, index = attempt.request, attempt.config, attempt.index
    report = {"dead_run": 1, "run_index": index}
    if rank != 0:
        ray.train.report(report)
        return
    if request.mlflow_run_id:
        points = [("dead_run", 1.0, 0), *curves.drain()]
        log_points(config["tracking_uri"], request.mlflow_run_id, points)
        flush_metrics(config["tracking_uri"], request.mlflow_run_id, final=True)
    with tempfile.TemporaryDirectory() as d:
        torch.save({"done": [*attempt.done, dead], "index": index}, Path(d) / STATE_FILE)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))


def _train_multitask(attempt: _RunAttempt) -> dict:
    """Multi-task meta-training on this worker (:mod:`raymeta.train.multitask`): train its
    task to the end of each meta-training epoch, gather every task's state (one
    ``all_gather_object`` over all workers; rank 0 logs the tasks' metrics and saves the
    checkpoint of all of them), every worker reports. A user error in one task (a dead run)
    reaches every worker at that gather and ends the run on one line. Returns the run's result
    (the keys of :class:`FitResult`)."""
    import ray.train
    import torch.distributed as dist

    from raymeta.tracking import epoch_points, log_points
    from raymeta.train.build import build_run
    from raymeta.train.device import resolve_device
    from raymeta.train.loop import Workers
    from raymeta.train.multitask import (
        RestartingTask,
        group_data_parallel,
        owe_meta_steps,
        task_summary,
    )

    request, config, index, ckpt = attempt.request, attempt.config, attempt.index, attempt.ckpt
    spec: MultiTaskMetaTrainRun = request.spec
    device = resolve_device(config["use_gpu"])
    workers = Workers.for_tasks(len(spec.tasks))
    saved_cells, history, elapsed, payload = {}, [], 0.0, {}
    if ckpt is not None:
        saved_cells, history, elapsed = ckpt["saved_cells"], ckpt["history"], ckpt["elapsed_s"]
        payload = {k: ckpt[k] for k in ("tasks", "saved_cells", "history", "elapsed_s")}
    task, error = None, None
    try:
        task = RestartingTask(
            build_run(spec, device, workers), group_data_parallel(workers, device)
        )
        if ckpt is not None:
            task.load_state_dict(ckpt["tasks"][workers.task])
    except RaymetaError as exc:
        error = exc
    meta_steps = len(history) * spec.clock_steps // spec.meta.meta_every
    t_start = time.perf_counter() - elapsed
    for epoch in range(len(history) + 1, spec.epochs + 1):
        stop = epoch * spec.clock_steps
        if error is None:
            try:
                task.train_until(stop)
            except RaymetaError as exc:
                error = exc
            meta_steps = task.run.schedule.meta_steps
        if error is not None:  # the other tasks' workers wait in the meta steps' all-reduces
            owe_meta_steps(workers, spec.meta, meta_steps, stop, device)
            meta_steps = stop // spec.meta.meta_every
        mine = {"error": error} if error else None
        if error is None and workers.rank == 0:
            mine = _to_cpu(task.state_dict())
        gathered = [None] * workers.meta_world_size
        dist.all_gather_object(gathered, mine)
        for i, g in enumerate(gathered):
            if g is not None and "error" in g:
                t = spec.tasks[i // workers.world_size]
                raise type(g["error"])(f"task {t.dataset}/{t.model}: {g['error']}")
        if epoch in spec.saved_epochs:
            cell = task.run.schedule.cell
            saved_cells[epoch] = {k: v.detach().clone().cpu() for k, v in cell.state_dict().items()}
        if dist.get_rank() != 0:
            ray.train.report({"epoch": epoch, "run_index": index})
            continue
        tasks = [t for t in gathered if t is not None]  # group leaders': one per task, in order
        metrics = {"epoch": epoch, "step": task.state.step}
        for i, task_state in enumerate(tasks):
            summary = task_summary(task_state, spec.clock_steps)
            metrics |= {f"task{i}_{k}": v for k, v in summary.items()}
        history.append(metrics)
        elapsed_s = time.perf_counter() - t_start
        payload = {"tasks": tasks, "saved_cells": saved_cells, "history": history}
        payload["elapsed_s"] = elapsed_s
        if request.mlflow_run_id:
            log_points(config["tracking_uri"], request.mlflow_run_id, epoch_points(metrics))
        if progress_enabled():
            lines = ", ".join(
                f"task{i} lr {metrics[f'task{i}_lr_epoch_mean']:.4g} val_acc "
                f"{metrics.get(f'task{i}_val_acc', math.nan):.2%} (restarts {t['restarts']})"
                for i, t in enumerate(tasks)
            )
            line = f"[{spec.label}] epoch {epoch}/{spec.epochs}  {lines}  {elapsed_s:.0f}s"
            print(line, file=sys.__stdout__, flush=True)
        attempt.report_checkpoint({"epoch": epoch, "run_index": index}, payload)
        attempt.fail_if_injected(epoch)
    return _multitask_result(payload) if dist.get_rank() == 0 else {}


def _to_cpu(obj):
    """``obj`` (nested dicts, lists, tuples) with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _multitask_result(payload: dict) -> dict:
    """The :class:`FitResult` keys of a multi-task run's last checkpoint payload: ``history``
    holds the meta-training epochs' metrics (``task{i}_*``), ``tasks`` each task's own epochs
    (all restarts) and LRs; ``lrs`` and ``gammas`` are the first task's."""
    tasks = [
        {"history": t["history"], "lrs": t["done_lrs"] + t["run"]["lrs"], "restarts": t["restarts"]}
        for t in payload["tasks"]
    ]
    return {
        "history": payload["history"],
        "lrs": tasks[0]["lrs"],
        "saved_cells": payload["saved_cells"],
        "gamma": None,
        "gammas": [h["gamma"] for h in tasks[0]["history"] if h["epoch"] == 1],
        "wall_time_s": payload["elapsed_s"],
        "model_state": {},
        "tasks": tasks,
    }


def _result_of(payload: dict) -> dict:
    """The :class:`FitResult` keys of a run's last checkpoint payload."""
    if "tasks" in payload:
        return _multitask_result(payload)
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
    tasks: list[dict] = field(default_factory=list)  # multi-task meta-training: each task's run
    dead_reason: str | None = None  # why it is dead (RunRequest.dead_run_is_result)


def fit(
    spec: RunSpec,
    *,
    meta_learner: nn.Module | None = None,
    mlflow_run_id: str | None = None,
    **options,
) -> FitResult:
    """Train one run in a ``TorchTrainer`` and return its result. Ray must be initialised.

    Args:
        spec: what to train; ``spec.label`` names the Ray Train run and prefixes progress.
        meta_learner, mlflow_run_id: as :class:`RunRequest`.
        options: as :func:`fit_runs` (``num_workers``, ``use_gpu``, ``storage_path``,
            ``max_failures``, ``fail_once_after_epoch``, ``threads``, ``tracking_uri``).

    Returns:
        The run's :class:`FitResult`; ``wall_time_s`` includes Ray Train's start-up.
    """
    request = RunRequest(spec, meta_learner, mlflow_run_id)
    t0 = time.perf_counter()
    (result,) = fit_runs([request], name=spec.label, **options)
    result.wall_time_s = time.perf_counter() - t0
    return result


def fit_runs(
    runs: list[RunRequest],
    *,
    name: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    storage_path: str | Path = "ray_results",
    max_failures: int = 1,
    tracking_uri: str | None = None,
    fail_once_after_epoch: int | None = None,
    threads: int | None = None,
) -> list[FitResult]:
    """Train ``runs`` one after the other in one ``TorchTrainer`` (one worker group, one Ray
    Train start-up, about 10-18 s on a small machine) and return their results in order. Ray
    must be initialised.

    Args:
        runs: the runs (:class:`RunRequest`).
        name: the Ray Train run name prefix.
        num_workers: data-parallel workers; each task's ``batch_size`` is split across them.
        use_gpu: one GPU per worker (NCCL) instead of CPU (gloo)
            (:func:`raymeta.train.device.worker_resources`).
        storage_path: where Ray Train keeps checkpoints (made absolute).
        max_failures: worker-group restarts allowed (resume from the last checkpoint).
        tracking_uri: the MLflow store of the runs' ``mlflow_run_id``.
        fail_once_after_epoch: inject one worker failure (for fault-tolerance tests).
        threads: torch threads per worker (default
            :func:`raymeta.train.device.torch_threads`).

    Returns:
        One :class:`FitResult` per run; ``wall_time_s`` is the run's own time in the worker
        (training, evaluation, checkpoints); a dead run of a request with
        ``dead_run_is_result`` has its ``dead_reason`` and the epochs before the stop.

    Raises:
        RaymetaError: a user-input error inside a worker (a bad value, a dead run without
            ``dead_run_is_result``), re-raised on one line without restarting the workers (it
            would fail the same way).
        KeyboardInterrupt: Ctrl+C or SIGTERM in the driver (``trainer.fit`` runs off the main
            thread, :func:`raymeta.interrupts.call_off_main_thread`).
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

    from raymeta.interrupts import call_off_main_thread
    from raymeta.train.device import torch_threads, worker_resources

    config = {
        "runs": runs,
        "threads": threads or torch_threads(use_gpu, num_workers),
        "use_gpu": use_gpu,
        "tracking_uri": tracking_uri,
        "fail_once_after_epoch": fail_once_after_epoch,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=worker_resources(use_gpu),
        ),
        run_config=RunConfig(
            name=f"{name.replace('/', '-')}-{int(time.time() * 1000)}",
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:  # off the main thread: Train's own Ctrl+C handler would exit 0 (raymeta.interrupts)
        result = call_off_main_thread(trainer.fit)
    except TrainingFailedError as exc:
        cause = _user_error(exc)
        if cause is None:
            raise
        raise cause from None
    with result.checkpoint.as_directory() as d:
        ckpt = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    if "error" in ckpt:
        _raise_user_error(ckpt["error"])
    results = [FitResult(**r) for r in ckpt["done"]]
    if len(results) < len(runs):  # the last run's own checkpoint (a dead last run is in done)
        results.append(FitResult(**_result_of(ckpt)))
    return results
