"""Update rules: how the training loop turns one batch into one optimisation step.

:func:`raymeta.train.loop.train` owns what every job shares — the seeded batches, the SGD
optimiser, the schedule, the meta-batch stream, per-epoch evaluation, the ``on_epoch_end``
hook that reports and checkpoints — and delegates the step itself to an :class:`UpdateRule`:

- :class:`SGDRule`: forward, backward, loss averaged across workers, an optional MLR-SNet
  look-ahead meta step (when the schedule is a trainable
  :class:`~raymeta.meta.mlrsnet.MLRSNetMetaTrainer`), the LR from the schedule (which may
  depend on the loss), the SGD step.
- :class:`MethodRule`: a long-tailed method's ``train_step`` (:mod:`raymeta.meta.base`):
  a loss (cross-entropy, class-balanced, focal, LDAM-DRW, logit-adjusted), optionally on
  class-balanced re-sampled batches, or a meta-learned method (MFM, Meta-Weight-Net) whose
  look-ahead takes a meta batch. The LR comes from the schedule *before* the step (the
  look-ahead needs it), so the schedule must not depend on the loss.

Rules are plain PyTorch: the loop passes ``workers`` (for the mean of the loss across
data-parallel workers) and ``next_meta`` (this worker's next meta batch, drawn only when asked,
so a resumed run sees the same meta batches as an unbroken one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raymeta.meta.lookahead import set_lr
from raymeta.meta.losses import class_balanced_indices
from raymeta.meta.mlrsnet import MLRSNetMetaTrainer
from raymeta.schedules.base import Schedule

MetaBatch = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepResult:
    """One optimisation step as the loop records it.

    Attributes:
        loss: the batch's training objective, averaged across workers (a float).
        lr: the learning rate of the step.
        meta_loss: this worker's meta loss when the step had a meta step, else None.
    """

    loss: float
    lr: float
    meta_loss: float | None = None


class UpdateRule(ABC):
    """The per-step strategy of :func:`raymeta.train.loop.train` (see the module docstring).

    Attributes:
        meta_batch_size: global meta batch per meta step (summed over workers); 0 when the
            rule needs no meta set.
    """

    meta_batch_size: int = 0

    def is_meta_step(self, step: int) -> bool:
        """True when global step ``step`` (0-based) draws a meta batch."""
        return False

    def start_epoch(self, epoch: int) -> None:  # noqa: B027
        """Called before each epoch (0-based), after the schedule's ``start_epoch``."""

    def epoch_pool(self, train_y: torch.Tensor, seed: int, epoch: int) -> torch.Tensor | None:
        """Positions into the training split that this epoch batches over (re-sampling), or
        None for the training split itself. Must be identical on every worker."""
        return None

    @abstractmethod
    def step(
        self,
        model: nn.Module,
        optimizer: torch.optim.SGD,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        step: int,
        epoch: int,
        schedule: Schedule,
        next_meta: MetaBatch,
        workers,
    ) -> StepResult:  # pragma: no cover
        """One optimisation step on this worker's batch ``x (B, ...)``, ``y (B,)``."""

    def state_dict(self) -> dict:
        """What a resumed run needs beyond the schedule's and the model's state."""
        return {}

    def load_state_dict(self, sd: dict) -> None:  # noqa: B027
        """Restore :meth:`state_dict`."""


class SGDRule(UpdateRule):
    """Cross-entropy SGD step at ``schedule.lr(step, epoch, loss)``; with ``meta`` (the
    schedule itself, a trainable MLR-SNet) its meta step comes between the backward pass and
    the LR (MLR-SNet paper, Algorithm 1), and the step's direction is shown to it before the
    SGD update (the delayed meta-objective keeps the directions of its window).
    """

    def __init__(self, meta: MLRSNetMetaTrainer | None = None):
        self.meta = meta
        self.meta_batch_size = meta.meta_batch_size if meta is not None else 0

    @classmethod
    def for_schedule(cls, schedule: Schedule) -> SGDRule:
        """The rule a schedule implies: meta-training for an :class:`MLRSNetMetaTrainer`."""
        return cls(schedule if isinstance(schedule, MLRSNetMetaTrainer) else None)

    def is_meta_step(self, step: int) -> bool:
        return self.meta is not None and self.meta.is_meta_step(step)

    def step(self, model, optimizer, x, y, *, step, epoch, schedule, next_meta, workers):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        loss_value = float(workers.mean(loss.detach()))
        meta_loss = None
        if self.is_meta_step(step):
            schedule.check_loss(loss_value, step, epoch)
            meta_x, meta_y = next_meta()
            meta_loss = self.meta.meta_step(model, optimizer, loss_value, meta_x, meta_y)
        lr = schedule.lr(step, epoch, loss_value)
        if self.meta is not None:
            self.meta.observe_step(model, optimizer, step)
        set_lr(optimizer, lr)
        optimizer.step()
        return StepResult(loss_value, lr, meta_loss)


class MethodRule(UpdateRule):
    """A long-tailed method's step (:func:`raymeta.meta.methods.build_method`).

    Args:
        method: the method, built on the (not yet DDP-wrapped) model before the optimiser,
            with ``average`` = the workers' mean.
        meta_batch_size: global meta batch of a meta-learned method (ignored otherwise).
    """

    def __init__(self, method, meta_batch_size: int = 100):
        self.method = method
        self.meta_batch_size = meta_batch_size if method.needs_meta else 0

    def is_meta_step(self, step: int) -> bool:
        return self.method.is_meta_step(step)

    def start_epoch(self, epoch: int) -> None:
        self.method.start_epoch(epoch)

    def epoch_pool(self, train_y, seed, epoch):
        if not self.method.resample:
            return None
        return class_balanced_indices(train_y, seed=seed, epoch=epoch).to(train_y.device)

    def step(self, model, optimizer, x, y, *, step, epoch, schedule, next_meta, workers):
        lr = schedule.lr(step, epoch, None)
        meta_x = meta_y = None
        if self.method.is_meta_step(step):
            meta_x, meta_y = next_meta()
        out = self.method.train_step(
            model, optimizer, x, y, lr=lr, step=step, meta_x=meta_x, meta_y=meta_y
        )
        loss_value = float(workers.mean(out.loss))
        schedule.check_loss(loss_value, step, epoch)
        return StepResult(loss_value, lr, out.meta_loss)

    def state_dict(self) -> dict:
        return self.method.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.method.load_state_dict(sd)


class HypergradientRule(SGDRule):
    """SGD with hypergradient descent on the LR (SGD-HD; Baydin et al., "Online Learning Rate
    Adaptation with Hypergradient Descent", ICLR 2018, Algorithm 2):
    ``lr_t = lr_{t-1} + beta * <g_t, g_{t-1}>`` with ``g`` the (worker-averaged) gradient of the
    batch loss. The schedule gives ``lr_0`` only; the LR is clipped at 0 (a negative LR would
    ascend the loss).

    Args:
        hypergradient_lr: ``beta``, the hypergradient step (units: LR per squared gradient norm).
    """

    def __init__(self, hypergradient_lr: float):
        super().__init__(None)
        self.beta = hypergradient_lr
        self.lr: float | None = None
        self.prev: torch.Tensor | None = None

    def step(self, model, optimizer, x, y, *, step, epoch, schedule, next_meta, workers):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        loss_value = float(workers.mean(loss.detach()))
        schedule.check_loss(loss_value, step, epoch)
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        if self.lr is None:
            self.lr = schedule.lr(step, epoch, loss_value)
        else:
            self.lr = max(0.0, self.lr + self.beta * float(grad @ self.prev))
        self.prev = grad.clone()
        set_lr(optimizer, self.lr)
        optimizer.step()
        return StepResult(loss_value, self.lr)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "prev": self.prev}

    def load_state_dict(self, sd: dict) -> None:
        self.lr, self.prev = sd["lr"], sd["prev"]


def rule_for_task(task, schedule: Schedule) -> UpdateRule:
    """The update rule a (non-long-tailed) task implies: SGD-HD for ``optimizer: sgd_hd``,
    otherwise :meth:`SGDRule.for_schedule` (MLR-SNet meta-training when the schedule is one)."""
    if getattr(task, "optimizer", "sgd") == "sgd_hd":
        return HypergradientRule(task.hypergradient_lr)
    return SGDRule.for_schedule(schedule)
