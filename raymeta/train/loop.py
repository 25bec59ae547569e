"""The training loop of every raymeta run, on each worker: plain PyTorch plus ``torch.distributed``.

One loop serves plain training with any :class:`~raymeta.schedules.Schedule`, MLR-SNet
meta-training (the schedule is then a trainable
:class:`~raymeta.meta.mlrsnet.MLRSNetMetaTrainer`) and the long-tailed methods (MFM and its
baselines): the step itself is delegated to an :class:`~raymeta.train.rules.UpdateRule`. With
several data-parallel workers the model gradient is averaged by DDP (or by the rule), the
batch loss and the meta-gradient are averaged with ``all_reduce``, and worker ``r`` takes the
``r``-th chunk of every global batch, so N workers with per-worker batch b match one worker
with batch N*b. Long-tailed tasks (:class:`~raymeta.config.LongTailTaskConfig`) add
many/medium/few-shot and per-class test accuracies to every epoch's metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raymeta.config import LongTailTaskConfig, TaskConfig
from raymeta.data import load_dataset, make_splits
from raymeta.data.batches import endless_batches, epoch_batches, steps_per_epoch
from raymeta.data.longtail import make_longtail_split, metrics_from_class_hits
from raymeta.data.task import TaskData
from raymeta.errors import ConfigError
from raymeta.meta.lookahead import functional_loss, unwrap
from raymeta.models import build_model
from raymeta.models.registry import check_model_name
from raymeta.schedules.base import Schedule
from raymeta.train.guard import ProgressGuard
from raymeta.train.rules import SGDRule, StepResult, UpdateRule

L0_SAMPLES = 10_000  # mean training loss (gamma's L0) is estimated on this many training images


@dataclass
class Workers:
    """Data-parallel context of this process: rank, world size and mean/sum reductions.

    In multi-task meta-training (:meth:`for_tasks`) the workers are cut into one group per
    task: ``rank``, ``world_size``, :meth:`sum` and :meth:`mean` are the group's (``group``, a
    ``torch.distributed`` process group; None: every worker), ``task`` is the group's task, and
    :meth:`meta_mean` averages over all ``meta_world_size`` workers (the meta-learner's
    gradient, one schedule for every task).
    """

    rank: int = 0
    world_size: int = 1
    task: int = 0
    group: Any = None
    meta_world_size: int | None = None

    @classmethod
    def current(cls) -> Workers:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @classmethod
    def for_tasks(cls, num_tasks: int) -> Workers:
        """This process's context when ``num_tasks`` tasks share the workers: equal groups of
        consecutive ranks, group ``i`` training task ``i`` (data-parallel within the group).
        Every worker must call it once (it creates the groups' process groups).

        Raises:
            ConfigError: the number of workers is not a positive multiple of ``num_tasks``.
        """
        world = cls.current()
        if world.world_size % num_tasks:
            raise ConfigError(
                f"{num_tasks} tasks need a multiple of {num_tasks} workers (one group per "
                f"task), got {world.world_size}"
            )
        size = world.world_size // num_tasks
        group = dist.new_subgroups(group_size=size)[0] if size > 1 else None
        return cls(world.rank % size, size, world.rank // size, group, world.world_size)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t, group=self.group)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world_size if self.world_size > 1 else t

    def meta_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over every worker that meta-trains the same meta-learner (all tasks'
        groups; :meth:`mean` when there is one task)."""
        n = self.meta_world_size or self.world_size
        if n == self.world_size:
            return self.mean(t)
        t = t.clone()
        dist.all_reduce(t)
        return t / n


def task_splits(task: TaskConfig):
    """The task's dataset and its seeded train / validation / meta :class:`Splits`."""
    ds = load_dataset(task.dataset)
    sp = make_splits(
        ds.train_y,
        ds.num_classes,
        val_size=task.val_size,
        meta_per_class=task.meta_per_class,
        seed=task.seed,
        train_subset=task.train_subset,
        class_names=ds.class_names,
    )
    return ds, sp


def longtail_splits(task: LongTailTaskConfig):
    """The task's dataset and its seeded :class:`~raymeta.data.longtail.LongTailSplit`.

    Raises:
        ConfigError: the long-tail values do not fit the dataset (one line naming the value).
        DataNotFoundError: the dataset's files are missing.
    """
    ds = load_dataset(task.dataset)
    sp = make_longtail_split(
        ds.train_y,
        ds.num_classes,
        imbalance_factor=task.imbalance_factor,
        meta_per_class=task.meta_per_class,
        val_per_class=task.val_per_class,
        profile=task.profile,
        n_max=task.n_max,
        class_order=task.class_order,
        seed=task.seed,
        order_seed=task.order_seed,
        class_names=ds.class_names,
    )
    return ds, sp


def noisy_labels(task: TaskConfig, train_y: torch.Tensor, num_classes: int):
    """The training labels corrupted by ``task.label_noise`` (seeded; meta, validation and test
    labels stay clean) and the :class:`~raymeta.data.noise.NoiseRecord` to log."""
    from raymeta.data.noise import corrupt_labels

    noise = task.label_noise
    seed = task.seed if noise.seed is None else noise.seed
    return corrupt_labels(train_y, num_classes, noise.type, noise.rate, seed)


def load_task_data(
    task: TaskConfig | LongTailTaskConfig, device: torch.device | str = "cpu"
) -> TaskData:
    """Load the task's dataset and cut its seeded train / validation / meta splits (for a
    long-tailed task: the long-tailed training set, the balanced meta set, the balanced
    validation set of ``val_per_class`` images per class (none by default), and the class
    counts; with ``label_noise``: corrupted training labels; for Tiny
    Shakespeare: ``(N, seq_len)`` character windows, ``meta_per_class`` meta windows)."""
    longtail = isinstance(task, LongTailTaskConfig)
    if not longtail and task.dataset == "tinyshakespeare":
        from raymeta.data.text import load_text_task

        text = load_text_task(
            task.seq_len,
            meta_sequences=task.meta_per_class,
            train_subset=task.train_subset,
            seed=task.seed,
            device=device,
        )
        return text
    ds, sp = longtail_splits(task) if longtail else task_splits(task)
    train_y = ds.train_y[sp.train]
    if not longtail and task.label_noise is not None:
        train_y = noisy_labels(task, train_y, ds.num_classes)[0]

    def take(idx, y=None):
        return ds.train_x[idx].to(device), (ds.train_y[idx] if y is None else y).to(device)

    return TaskData(
        *take(sp.train, train_y),
        *take(sp.val),
        *take(sp.meta),
        ds.test_x.to(device),
        ds.test_y.to(device),
        ds.num_classes,
        ds.in_channels,
        ds.image_size,
        ds.class_names,
        sp.counts if longtail else None,
    )


@torch.no_grad()
def evaluate_classes(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    workers: Workers,
    num_classes: int = 0,
    batch: int = 1000,
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Top-1 accuracy (fraction), mean cross-entropy and per-class tallies of ``model`` (eval
    mode) on ``(x, y)``, sharded across workers (one ``all_reduce``).

    Returns:
        ``(acc, loss, hits, totals)``: ``hits``/``totals`` are ``(num_classes,)`` float64
        correct predictions and samples per class, summed over workers. ``(nan, nan, zeros,
        zeros)`` for an empty set.
    """
    if len(y) == 0:
        zeros = torch.zeros(num_classes, dtype=torch.float64)
        return math.nan, math.nan, zeros, zeros.clone()
    was_training = model.training
    model.eval()
    idx = torch.arange(workers.rank, len(y), workers.world_size, device=y.device)
    totals = torch.zeros(2 + 2 * num_classes, dtype=torch.float64, device=y.device)
    for chunk in idx.split(batch):
        logits = unwrap(model)(x[chunk])
        correct = logits.argmax(1) == y[chunk]  # (B,) or (B, T) for a language model
        totals[0] += correct.sum()
        totals[1] += F.cross_entropy(logits, y[chunk], reduction="sum")
        if num_classes:
            totals[2 : 2 + num_classes] += torch.bincount(
                y[chunk], weights=correct.double(), minlength=num_classes
            )
            totals[2 + num_classes :] += torch.bincount(y[chunk], minlength=num_classes)
    model.train(was_training)
    totals = workers.sum(totals).cpu()
    hits, counts = totals[2 : 2 + num_classes], totals[2 + num_classes :]
    return float(totals[0] / y.numel()), float(totals[1] / y.numel()), hits, counts


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, workers: Workers, batch: int = 1000
) -> tuple[float, float]:
    """Top-1 accuracy (fraction) and mean cross-entropy of ``model`` (eval mode) on ``(x, y)``,
    sharded across workers. Returns ``(nan, nan)`` for an empty set."""
    acc, loss, _, _ = evaluate_classes(model, x, y, workers, batch=batch)
    return acc, loss


def majority_fraction(labels: torch.Tensor) -> float:
    """Accuracy of always predicting the commonest label (chance level): ``labels`` ``(N,)``
    class indices, or ``(N, T)`` target tokens of a language model."""
    if labels.numel() == 0:
        return math.nan
    return float(torch.bincount(labels.reshape(-1)).max()) / labels.numel()


@torch.no_grad()
def mean_train_loss(model: nn.Module, data: TaskData, workers: Workers) -> float:
    """Mean per-sample training loss (train-mode forward, BN buffers untouched) over a fixed
    subset of at most :data:`L0_SAMPLES` training images (or target tokens, for text),
    averaged across workers."""
    n = min(len(data.train_y), max(1, L0_SAMPLES // data.train_y[0].numel()))  # text: tokens
    idx = torch.arange(workers.rank, n, workers.world_size, device=data.train_y.device)
    params = dict(unwrap(model).named_parameters())
    total = torch.zeros((), dtype=torch.float64, device=data.train_y.device)
    for chunk in idx.split(1000):
        total += functional_loss(model, params, data.train_x[chunk], data.train_y[chunk]) * len(
            chunk
        )
    return float(workers.sum(total) / n)


def build_optimizer(task: TaskConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The task's inner-loop optimiser at LR 0 (the schedule sets the LR every step): SGD
    (``momentum``, ``nesterov``, ``weight_decay``; also for ``sgd_hd``) or Adam (``betas``, ``weight_decay``)."""
    if getattr(task, "optimizer", "sgd") == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=0.0, betas=task.betas, weight_decay=task.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=0.0,
        momentum=task.momentum,
        nesterov=task.nesterov,
        weight_decay=task.weight_decay,
    )


def check_batches(
    n_train: int, batch_size: int, num_workers: int, meta_batch_size: int | None = None
) -> None:
    """Raise a one-line :class:`ConfigError` if the batches cannot be split across workers.

    ``batch_size`` and ``meta_batch_size`` are global (summed over workers).
    """
    if batch_size % num_workers:
        raise ConfigError(f"batch_size={batch_size} is not divisible by num_workers={num_workers}")
    if meta_batch_size is not None and meta_batch_size % num_workers:
        raise ConfigError(
            f"meta_batch_size={meta_batch_size} is not divisible by num_workers={num_workers}"
        )
    if steps_per_epoch(n_train, batch_size // num_workers, num_workers) == 0:
        raise ConfigError(f"batch_size={batch_size} is larger than the training split ({n_train})")


def check_task(
    task: TaskConfig | LongTailTaskConfig, num_workers: int = 1, meta_batch_size: int | None = None
) -> int:
    """Validate everything about ``task`` that depends on the data or on a registry, in the
    driver, before any Ray worker starts (an unknown model, a missing dataset, a meta set
    larger than a class, an imbalance factor that leaves the tail empty, batch sizes).
    Returns the optimisation steps of one epoch with ``num_workers`` workers.

    Raises:
        ConfigError, DataNotFoundError: one line naming the value.
    """
    check_model_name(task.model)  # here, not in the config: the registry imports torch
    if isinstance(task, LongTailTaskConfig):
        n_train = len(longtail_splits(task)[1].train)
    elif task.dataset == "tinyshakespeare":
        n_train = len(load_task_data(task).train_y)
    else:
        n_train = len(task_splits(task)[1].train)
    check_batches(n_train, task.batch_size, num_workers, meta_batch_size)
    return steps_per_epoch(n_train, task.batch_size // num_workers, num_workers)


@dataclass
class RunState:
    """Everything a resumed run needs: weights, optimiser, schedule, counters and history."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimisation steps (global count)
    history: list[dict] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)  # LR of every step so far
    initial_loss: float | None = None  # L0 of the dead-run guard (first step's batch loss)
    # A run stopped inside an epoch (``train(stop_step=...)``) continues exactly from these:
    start_step: int = 0  # global step of the run's first step (a restarted multi-task task)
    epoch_step: int = 0  # steps done in the unfinished epoch ``epoch``
    epoch_sums: dict[str, float] = field(default_factory=dict)  # its running sums
    guard_losses: list[float] = field(default_factory=list)  # the guard's window


def build_task_model(task: TaskConfig | LongTailTaskConfig, data: TaskData, device) -> nn.Module:
    """The task's model, initialised from ``task.seed`` (identical on every worker)."""
    torch.manual_seed(task.seed)
    return build_model(task.model, data.in_channels, data.num_classes, data.image_size).to(device)


def train(
    task: TaskConfig | LongTailTaskConfig,
    data: TaskData,
    model: nn.Module,
    schedule: Schedule,
    *,
    rule: UpdateRule | None = None,
    workers: Workers | None = None,
    state: RunState | None = None,
    optimizer_state: dict | None = None,
    on_epoch_end: Callable[[dict, RunState, torch.optim.Optimizer], None] | None = None,
    on_step: Callable[[int, StepResult], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    stop_step: int | None = None,
) -> RunState:
    """Train ``model`` on ``data`` for ``task.epochs`` epochs with LRs from ``schedule``.

    Per step, on this worker's chunk of the global batch of ``task.batch_size`` samples, the
    ``rule`` (default :meth:`SGDRule.for_schedule`: forward/backward, the loss averaged across
    workers, an optional MLR-SNet meta step when ``schedule`` is an
    :class:`~raymeta.meta.mlrsnet.MLRSNetMetaTrainer`, the SGD step at
    ``schedule.lr(step, epoch, loss)``) takes one step of the SGD optimiser
    (``task.momentum``, ``task.weight_decay``); a :class:`~raymeta.train.rules.MethodRule`
    runs a long-tailed method instead. Meta batches come from the balanced meta set.

    Args:
        model: built by :func:`build_task_model` (and, for a long-tailed method, modified by
            it), possibly DDP-wrapped by the caller.
        rule: the update rule (its state is the caller's to checkpoint).
        state, optimizer_state: resume from a checkpoint (``state.epoch`` epochs done, and
            ``state.epoch_step`` steps of the next one).
        on_epoch_end: called with the epoch's metrics (``epoch`` is 1-based; accuracies are
            fractions; ``train_loss`` is the mean batch loss; ``lr`` the mean LR of the epoch;
            for long-tailed data also ``test_many_acc``, ``test_medium_acc``,
            ``test_few_acc`` and ``test_acc_class_{c}``), the run state and the optimiser,
            e.g. to report and checkpoint.
        on_step: called after every optimisation step with the global step (0-based, counted
            across epochs) and its :class:`~raymeta.train.rules.StepResult` (batch loss
            averaged across workers, LR, this worker's meta loss), e.g. to record per-step
            curves (:class:`raymeta.tracking.StepCurves`).
        optimizer: the optimiser to step (default: a new one, :func:`build_optimizer`); pass
            the one of a run that stopped at ``stop_step`` to continue it.
        stop_step: return once ``state.step`` (the global step count) reaches it, inside an
            epoch if need be: ``state`` then records the unfinished epoch, and a later call
            with it continues exactly as if the run had not stopped (multi-task
            meta-training's clock, :mod:`raymeta.train.multitask`).

    Raises:
        ConfigError: ``task.batch_size`` is not divisible by the number of workers, or the
            training split is smaller than one global batch.
        NonFiniteLossError: the loss became NaN or infinite.
        DeadRunError: the run makes no progress (``task.guard``, :mod:`raymeta.train.guard`).
    """
    workers = workers or Workers.current()
    state = state or RunState()
    if stop_step is not None and state.step >= stop_step:
        return state
    rule = rule or SGDRule.for_schedule(schedule)
    check_batches(
        len(data.train_y), task.batch_size, workers.world_size, rule.meta_batch_size or None
    )
    local_batch = task.batch_size // workers.world_size
    n_steps = steps_per_epoch(len(data.train_y), local_batch, workers.world_size)
    optimizer = optimizer or build_optimizer(task, model)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    meta_batches = None
    if rule.meta_batch_size:
        meta_batches = endless_batches(
            len(data.meta_y),
            rule.meta_batch_size // workers.world_size,
            seed=task.seed,
            rank=workers.rank,
            world_size=workers.world_size,
        )
        for s in range(state.step):  # resume: the same meta batches as an unbroken run
            if rule.is_meta_step(s):
                next(meta_batches)

    def next_meta() -> tuple[torch.Tensor, torch.Tensor]:
        midx = next(meta_batches)
        return data.meta_x[midx], data.meta_y[midx]

    num_classes = data.num_classes if data.class_counts is not None else 0
    guard = ProgressGuard(
        task.guard.patience_steps or max(n_steps, task.guard.window),
        min_progress=task.guard.min_progress,
        max_loss_ratio=task.guard.max_loss_ratio,
        window=task.guard.window,
        initial_loss=state.initial_loss,
        enabled=task.guard.enabled,
        step_settings=schedule.step_settings,
    )
    guard.recent.extend(state.guard_losses)
    chance_acc = majority_fraction(data.test_y)
    model.train()
    for epoch in range(state.epoch, task.epochs):
        t0 = time.perf_counter()
        schedule.start_epoch(epoch, lambda: mean_train_loss(model, data, workers))
        rule.start_epoch(epoch)
        sums = {"loss": 0.0, "lr": 0.0, "meta_loss": 0.0, "meta_steps": 0, "train_time_s": 0.0}
        sums.update(state.epoch_sums)
        pool = rule.epoch_pool(data.train_y, task.seed, epoch)
        batches = epoch_batches(
            len(data.train_y) if pool is None else len(pool),
            local_batch,
            seed=task.seed,
            epoch=epoch,
            rank=workers.rank,
            world_size=workers.world_size,
        )
        for idx in islice(batches, state.epoch_step, None):
            if stop_step is not None and state.step >= stop_step:
                sums["train_time_s"] += time.perf_counter() - t0
                state.epoch_sums, state.guard_losses = sums, list(guard.recent)
                return state
            if pool is not None:
                idx = pool[idx]
            out = rule.step(
                model,
                optimizer,
                data.train_x[idx],
                data.train_y[idx],
                step=state.step,
                epoch=epoch,
                schedule=schedule,
                next_meta=next_meta,
                workers=workers,
            )
            if out.meta_loss is not None:
                sums["meta_loss"] += out.meta_loss
                sums["meta_steps"] += 1
            guard.check(state.step - state.start_step, out.loss, out.lr)
            state.initial_loss = guard.initial_loss
            state.lrs.append(out.lr)
            if on_step is not None:
                on_step(state.step, out)
            sums["loss"] += out.loss
            sums["lr"] += out.lr
            state.step += 1
            state.epoch_step += 1
        train_time = sums["train_time_s"] + time.perf_counter() - t0
        state.epoch_step, state.epoch_sums, state.guard_losses = 0, {}, list(guard.recent)
        val_acc, val_loss = evaluate(model, data.val_x, data.val_y, workers)
        test_acc, test_loss, hits, totals = evaluate_classes(
            model, data.test_x, data.test_y, workers, num_classes
        )
        metrics = {
            "epoch": epoch + 1,
            "train_loss": sums["loss"] / n_steps,
            "val_acc": val_acc,
            "val_loss": val_loss,
            "test_acc": test_acc,
            "test_loss": test_loss,
            "lr": sums["lr"] / n_steps,
            "chance_acc": chance_acc,
            "train_time_s": train_time,
            "epoch_time_s": sums["train_time_s"] + time.perf_counter() - t0,
        }
        if sums["meta_steps"]:
            metrics["meta_loss"] = sums["meta_loss"] / sums["meta_steps"]
        if data.train_y.dim() == 2:  # a language model: perplexity and bits per character
            from raymeta.data.text import lm_metrics

            metrics.update(lm_metrics(val_loss, "val_") | lm_metrics(test_loss, "test_"))
        if data.class_counts is not None:
            lt = metrics_from_class_hits(hits, totals, data.class_counts).to_dict("test_")
            metrics.update({k: v for k, v in lt.items() if k != "test_top1"})  # = test_acc
        state.history.append(metrics)
        state.epoch = epoch + 1
        if on_epoch_end is not None:
            on_epoch_end(metrics, state, optimizer)
        if stop_step is not None and state.step >= stop_step:
            break
    return state
