"""Run assembly: the one place where a run spec (:mod:`raymeta.spec`) becomes the data, the
model, the LR schedule and the update rule that :func:`raymeta.train.loop.train` runs.

Every caller assembles runs here: the Ray Train glue (:mod:`raymeta.train.ray_train`, on each
worker), the Ray Tune trials of a comparison and of a transfer study, the driver-side checks of
the long-tail study, and the benchmarks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from raymeta.data.batches import steps_per_epoch
from raymeta.data.task import TaskData
from raymeta.schedules.base import Schedule
from raymeta.spec import (
    HandRun,
    LearnedRun,
    LongTailRun,
    MetaTrainRun,
    MultiTaskMetaTrainRun,
    RunSpec,
)
from raymeta.train.loop import RunState, Workers, build_task_model, load_task_data, train
from raymeta.train.rules import UpdateRule


@dataclass
class Run:
    """A run ready to train: what :func:`build_run` assembled from ``spec``.

    Attributes:
        data: the task's splits on the run's device.
        model: the task's model, seeded by ``task.seed`` (a long-tailed method may have
            changed it: LDAM-DRW's normed classifier, MFM's hooks); wrap it in DDP, if at
            all, after loading any checkpoint.
        schedule: the LR schedule (for :class:`~raymeta.spec.MetaTrainRun`: the trainable
            MLR-SNet meta-trainer).
        rule: the per-step update rule.
        steps_per_epoch: optimisation steps per epoch with ``workers.world_size`` workers.
    """

    spec: RunSpec
    data: TaskData
    model: nn.Module
    schedule: Schedule
    rule: UpdateRule
    steps_per_epoch: int
    workers: Workers

    @property
    def task(self):
        return self.spec.task

    def train(self, **options) -> RunState:
        """:func:`raymeta.train.loop.train` on this run (``options``: ``state``, ``on_step``,
        ``optimizer_state``, ``on_epoch_end``)."""
        return train(
            self.task,
            self.data,
            self.model,
            self.schedule,
            rule=self.rule,
            workers=self.workers,
            **options,
        )


def build_run(
    spec: RunSpec,
    device: torch.device | str = "cpu",
    workers: Workers | None = None,
    *,
    meta_learner: nn.Module | None = None,
    data: TaskData | None = None,
) -> Run:
    """Assemble ``spec`` on ``device`` for ``workers`` (default: one process).

    Args:
        spec: what to train. For a :class:`~raymeta.spec.MultiTaskMetaTrainRun`, the run of
            this worker's task (``workers.task``, :meth:`~raymeta.train.loop.Workers.for_tasks`),
            its meta-learner initialised as on every other worker (from the first task's seed).
        device: where the data and the model go (:func:`raymeta.train.device.resolve_device`).
        workers: the data-parallel context (rank, world size, the mean across workers that a
            meta-learner's gradient and a long-tailed loss use).
        meta_learner: the registered meta-learner the spec names by ``model_uri``, loaded in
            the driver: an :class:`~raymeta.schedules.MLRSNetBundle` for a
            :class:`~raymeta.spec.LearnedRun`, an MFM modulator network for a
            :class:`~raymeta.spec.LongTailRun` with ``model_uri`` (copied here, then attached
            frozen).
        data: the task's data when already loaded (benchmarks, driver-side checks); default
            loaded from ``spec.task``.

    Raises:
        ConfigError: a value that does not fit the data or the method (unknown schedule
            parameter, unknown method parameter; one line).
        DataNotFoundError: the dataset's files are missing.
        ValueError: the spec names a registered meta-learner and none was given.
    """
    workers = workers or Workers()
    cell_seed = None
    if isinstance(spec, MultiTaskMetaTrainRun):  # one meta-learner for every task
        spec, cell_seed = spec.task_run(workers.task), spec.tasks[0].seed + 1
    task = spec.task
    data = data if data is not None else load_task_data(task, device)
    model = build_task_model(task, data, device)
    n_steps = steps_per_epoch(
        len(data.train_y), task.batch_size // workers.world_size, workers.world_size
    )
    schedule = _schedule(spec, data, n_steps, workers, meta_learner, cell_seed)
    rule = _rule(spec, data, model, schedule, workers, meta_learner)
    return Run(spec, data, model, schedule, rule, n_steps, workers)


def _registered(spec: RunSpec, meta_learner: nn.Module | None) -> nn.Module:
    if meta_learner is None:
        raise ValueError(f"run {spec.label!r} uses {spec.model_uri}: pass it as meta_learner")
    return meta_learner


def _schedule(
    spec: RunSpec,
    data: TaskData,
    n_steps: int,
    workers: Workers,
    meta_learner,
    cell_seed: int | None = None,
):
    """The run's schedule. For a language model MLR-SNet's input is the loss divided by
    ln(vocabulary size). A meta-trained cell is initialised from ``cell_seed`` (default: the
    task's seed + 1)."""
    from raymeta.data.text import mlrsnet_loss_scale
    from raymeta.meta.mlrsnet import MLRSNetMetaTrainer
    from raymeta.schedules import HandSchedule, MLRSNet, MLRSNetSchedule

    task = spec.task
    scale = mlrsnet_loss_scale(data.num_classes) if data.train_y.dim() == 2 else 1.0
    if isinstance(spec, MetaTrainRun):
        meta = spec.meta
        torch.manual_seed(task.seed + 1 if cell_seed is None else cell_seed)
        cell = MLRSNet(meta.hidden_size, meta.mlp_hidden)
        return MLRSNetMetaTrainer(
            cell.to(data.train_x.device),
            data.num_classes,
            meta_every=meta.meta_every,
            meta_batch_size=meta.meta_batch_size,
            meta_lr=meta.meta_lr,
            meta_weight_decay=meta.meta_weight_decay,
            loss_scale=scale,
            average=workers.meta_mean,
            momentum=task.momentum,
            meta_objective=meta.meta_objective,
            horizon=meta.horizon,
        )
    if isinstance(spec, LearnedRun):
        return MLRSNetSchedule(
            _registered(spec, meta_learner),
            data.num_classes,
            task.epochs,
            loss_scale=scale,
            fixed_gamma=spec.gamma,
            momentum=task.momentum,
        )
    assert isinstance(spec, HandRun | LongTailRun)
    s = spec.schedule
    return HandSchedule(s.family, s.lr, task.epochs * n_steps, n_steps, **s.params)


def _rule(spec: RunSpec, data: TaskData, model: nn.Module, schedule, workers, meta_learner):
    """The loop's update rule; a long-tailed method is built here, on the bare model, before
    the optimiser and before DDP (LDAM-DRW swaps the last layer, MFM attaches hooks)."""
    from raymeta.meta.methods import build_method
    from raymeta.train.rules import MethodRule, rule_for_task

    if not isinstance(spec, LongTailRun):
        return rule_for_task(spec.task, schedule)
    modulation = None
    if spec.model_uri is not None:  # transfer: a registered modulator network, frozen
        modulation = copy.deepcopy(_registered(spec, meta_learner))
    method = build_method(
        spec.method,
        data.class_counts,
        model,
        input_shape=(data.in_channels, data.image_size, data.image_size),
        epochs=spec.task.epochs,
        average=workers.mean,
        modulation=modulation,
        **spec.params,
    )
    return MethodRule(method, spec.meta_batch_size)
