"""The training loop every raymeta job runs on each worker: plain PyTorch plus ``torch.distributed``.

One loop serves plain training with any :class:`~raymeta.schedules.Schedule` and MLR-SNet
meta-training (the schedule is then a trainable
:class:`~raymeta.meta.mlrsnet.MLRSNetMetaTrainer`). With several data-parallel workers the
model gradient is averaged by DDP, the batch loss that feeds the schedule and the
meta-gradient are averaged with ``all_reduce``, and worker ``r`` takes the ``r``-th chunk of
every global batch, so N workers with per-worker batch b match one worker with batch N*b.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raymeta.config import TaskConfig
from raymeta.data import load_dataset, make_splits
from raymeta.data.batches import endless_batches, epoch_batches, steps_per_epoch
from raymeta.errors import ConfigError
from raymeta.meta.lookahead import functional_loss, unwrap
from raymeta.meta.mlrsnet import MLRSNetMetaTrainer
from raymeta.models import build_model
from raymeta.schedules.base import Schedule

L0_SAMPLES = 10_000  # mean training loss (gamma's L0) is estimated on this many training images


@dataclass
class Workers:
    """Data-parallel context of this process: rank, world size and mean/sum reductions."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Workers:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum(t) / self.world_size if self.world_size > 1 else t


@dataclass
class TaskData:
    """A task's splits as tensors on the training device; ``x`` are ``(N, C, S, S)``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    meta_x: torch.Tensor
    meta_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_channels: int
    image_size: int
    class_names: tuple[str, ...]


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


def load_task_data(task: TaskConfig, device: torch.device | str = "cpu") -> TaskData:
    """Load the task's dataset and cut its seeded train / validation / meta splits."""
    ds, sp = task_splits(task)

    def take(idx):
        return ds.train_x[idx].to(device), ds.train_y[idx].to(device)

    return TaskData(
        *take(sp.train),
        *take(sp.val),
        *take(sp.meta),
        ds.test_x.to(device),
        ds.test_y.to(device),
        ds.num_classes,
        ds.in_channels,
        ds.image_size,
        ds.class_names,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, workers: Workers, batch: int = 1000
) -> tuple[float, float]:
    """Top-1 accuracy (fraction) and mean cross-entropy of ``model`` (eval mode) on ``(x, y)``,
    sharded across workers. Returns ``(nan, nan)`` for an empty set."""
    if len(y) == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    idx = torch.arange(workers.rank, len(y), workers.world_size, device=y.device)
    totals = torch.zeros(2, dtype=torch.float64, device=y.device)
    for chunk in idx.split(batch):
        logits = unwrap(model)(x[chunk])
        totals[0] += (logits.argmax(1) == y[chunk]).sum()
        totals[1] += F.cross_entropy(logits, y[chunk], reduction="sum")
    model.train(was_training)
    totals = workers.sum(totals)
    return float(totals[0] / len(y)), float(totals[1] / len(y))


@torch.no_grad()
def mean_train_loss(model: nn.Module, data: TaskData, workers: Workers) -> float:
    """Mean per-sample training loss (train-mode forward, BN buffers untouched) over a fixed
    subset of at most :data:`L0_SAMPLES` training images, averaged across workers."""
    n = min(len(data.train_y), L0_SAMPLES)
    idx = torch.arange(workers.rank, n, workers.world_size, device=data.train_y.device)
    params = dict(unwrap(model).named_parameters())
    total = torch.zeros((), dtype=torch.float64, device=data.train_y.device)
    for chunk in idx.split(1000):
        total += functional_loss(model, params, data.train_x[chunk], data.train_y[chunk]) * len(
            chunk
        )
    return float(workers.sum(total) / n)


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


def check_task(task: TaskConfig, num_workers: int = 1, meta_batch_size: int | None = None) -> None:
    """Validate everything about ``task`` that depends on the data, in the driver, before any
    Ray worker starts (a missing dataset, a meta set larger than a class, batch sizes).

    Raises:
        ConfigError, DataNotFoundError: one line naming the value.
    """
    ds, sp = task_splits(task)
    check_batches(len(sp.train), task.batch_size, num_workers, meta_batch_size)


@dataclass
class RunState:
    """Everything a resumed run needs: weights, optimiser, schedule, counters and history."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimisation steps (global count)
    history: list[dict] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)  # LR of every step so far


def build_task_model(task: TaskConfig, data: TaskData, device) -> nn.Module:
    """The task's model, initialised from ``task.seed`` (identical on every worker)."""
    torch.manual_seed(task.seed)
    return build_model(task.model, data.in_channels, data.num_classes, data.image_size).to(device)


def train(
    task: TaskConfig,
    data: TaskData,
    model: nn.Module,
    schedule: Schedule,
    *,
    workers: Workers | None = None,
    state: RunState | None = None,
    optimizer_state: dict | None = None,
    on_epoch_end: Callable[[dict, RunState, torch.optim.Optimizer], None] | None = None,
) -> RunState:
    """Train ``model`` on ``data`` for ``task.epochs`` epochs with LRs from ``schedule``.

    Per step: forward/backward on this worker's chunk of the global batch of
    ``task.batch_size`` samples, the mean loss averaged across workers, an optional MLR-SNet
    meta step (when ``schedule`` is an :class:`MLRSNetMetaTrainer`), then the SGD step
    (``task.momentum``, ``task.weight_decay``) at ``schedule.lr(step, epoch, loss)``.

    Args:
        model: built by :func:`build_task_model`, possibly DDP-wrapped by the caller.
        state, optimizer_state: resume from a checkpoint (``state.epoch`` epochs done).
        on_epoch_end: called with the epoch's metrics (``epoch`` is 1-based; accuracies are
            fractions; ``train_loss`` is the mean batch loss; ``lr`` the mean LR of the epoch),
            the run state and the optimiser, e.g. to report and checkpoint.

    Raises:
        ConfigError: ``task.batch_size`` is not divisible by the number of workers, or the
            training split is smaller than one global batch.
        NonFiniteLossError: the loss became NaN or infinite.
    """
    workers = workers or Workers.current()
    state = state or RunState()
    check_batches(
        len(data.train_y),
        task.batch_size,
        workers.world_size,
        schedule.meta_batch_size if isinstance(schedule, MLRSNetMetaTrainer) else None,
    )
    local_batch = task.batch_size // workers.world_size
    n_steps = steps_per_epoch(len(data.train_y), local_batch, workers.world_size)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.0, momentum=task.momentum, weight_decay=task.weight_decay
    )
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    meta = schedule if isinstance(schedule, MLRSNetMetaTrainer) else None
    meta_batches = None
    if meta is not None:
        meta_batches = endless_batches(
            len(data.meta_y),
            meta.meta_batch_size // workers.world_size,
            seed=task.seed,
            rank=workers.rank,
            world_size=workers.world_size,
        )
        for _ in range(state.step // meta.t_val):  # resume: same meta batches as an unbroken run
            next(meta_batches)
    model.train()
    for epoch in range(state.epoch, task.epochs):
        t0 = time.perf_counter()
        schedule.start_epoch(epoch, lambda: mean_train_loss(model, data, workers))
        loss_sum, lr_sum, meta_sum, n_meta = 0.0, 0.0, 0.0, 0
        batches = epoch_batches(
            len(data.train_y),
            local_batch,
            seed=task.seed,
            epoch=epoch,
            rank=workers.rank,
            world_size=workers.world_size,
        )
        for idx in batches:
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            loss_value = float(workers.mean(loss.detach()))
            if meta is not None and meta.is_meta_step(state.step):
                schedule.check_loss(loss_value, state.step, epoch)
                midx = next(meta_batches)
                meta_sum += meta.meta_step(
                    model, optimizer, loss_value, data.meta_x[midx], data.meta_y[midx]
                )
                n_meta += 1
            lr = schedule.lr(state.step, epoch, loss_value)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            state.lrs.append(lr)
            loss_sum += loss_value
            lr_sum += lr
            state.step += 1
        val_acc, val_loss = evaluate(model, data.val_x, data.val_y, workers)
        test_acc, test_loss = evaluate(model, data.test_x, data.test_y, workers)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / n_steps,
            "val_acc": val_acc,
            "val_loss": val_loss,
            "test_acc": test_acc,
            "test_loss": test_loss,
            "lr": lr_sum / n_steps,
            "epoch_time_s": time.perf_counter() - t0,
        }
        if n_meta:
            metrics["meta_loss"] = meta_sum / n_meta
        state.history.append(metrics)
        state.epoch = epoch + 1
        if on_epoch_end is not None:
            on_epoch_end(metrics, state, optimizer)
    return state
