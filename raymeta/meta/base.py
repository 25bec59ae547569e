"""The meta-learner base class, and the step interface of the long-tailed methods.

A meta-learner owns meta-parameters that an outer loop updates every ``meta_every``
optimisation steps with the meta-gradient of the shared one-step look-ahead
(:mod:`raymeta.meta.lookahead`), averaged across data-parallel workers:

- :class:`~raymeta.meta.mlrsnet.MLRSNetMetaTrainer`: the meta-learner is the LR schedule
  (MLR-SNet, Shu et al., TPAMI 2022);
- :class:`LookaheadMethod`: the meta-learner shapes the training loss of a long-tailed method
  (MFM's feature modulation, Meta-Weight-Net's weighting net).

:class:`MetaLearner` holds what they share: the meta-step interval, the meta optimiser, the
look-ahead meta loss and its gradient, the worker-averaged update, the record of the meta loss
and the checkpoint state.

Every long-tailed method (a :class:`LookaheadMethod` or a plain loss,
:class:`raymeta.meta.losses.LossStep`) has ``train_step(model, optimizer, x, y, *, lr, step,
meta_x, meta_y) -> StepOutput``, ``is_meta_step(step)``, ``needs_meta``,
``start_epoch(epoch)``, ``resample`` and ``state_dict()`` / ``load_state_dict()``. The training
loop (:class:`raymeta.train.rules.MethodRule`) drives them; they know nothing of Ray or MLflow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from raymeta.errors import ConfigError
from raymeta.meta.lookahead import (
    Average,
    apply_meta_gradient,
    build_meta_optimizer,
    identity_average,
    lookahead_loss,
    set_lr,
)


class MetaLearner:
    """Meta-parameters (``meta_module``'s parameters) updated every ``meta_every`` optimisation
    steps from a look-ahead meta-gradient averaged across workers.

    Subclasses compute the meta-gradient (what the virtual step depends on differs: the LR for
    MLR-SNet, the training loss for MFM and Meta-Weight-Net) and pass it to
    :meth:`apply_meta_gradient`.

    Args:
        meta_module: the module holding the meta-parameters, trained in place.
        meta_every: a look-ahead meta step every ``meta_every`` optimisation steps, counted
            globally across epochs: 0-based step ``s`` is a meta step when
            ``(s + 1) % meta_every == 0`` (the MLR-SNet paper's ``T_val``: 300).
        meta_lr, meta_weight_decay: the meta optimiser's hyper-parameters.
        meta_optimizer: ``"adam"``, ``"sgd"`` or a factory ``params -> Optimizer``
            (:func:`~raymeta.meta.lookahead.build_meta_optimizer`).
        frozen: never update the meta-parameters (no optimiser, no meta step, no meta set).
        average: mean of a tensor across data-parallel workers (identity for one worker).

    Attributes:
        meta_params: the meta-parameters (list).
        optimizer: the meta optimiser (None when frozen).
        meta_steps: meta steps taken so far.
        last_meta_loss: this worker's meta loss at the last meta step (None before the first).
            The loop reports each epoch's mean meta loss from the steps' results; the
            checkpoint holds only these two numbers, so its size does not grow with the run.

    Raises:
        ConfigError: ``meta_every < 1`` or an unknown meta optimiser.
    """

    state_key = "meta_module"  # key of the meta module's state in :meth:`state_dict`

    def __init__(
        self,
        meta_module: nn.Module,
        *,
        meta_every: int,
        meta_lr: float,
        meta_weight_decay: float,
        meta_optimizer: str | Callable = "adam",
        frozen: bool = False,
        average: Average = identity_average,
    ):
        if meta_every < 1:
            raise ConfigError(f"meta_every={meta_every} is invalid; accepted: an integer >= 1")
        self.meta_module, self.meta_every, self.frozen = meta_module, meta_every, frozen
        self.average = average
        self.meta_params = list(meta_module.parameters())
        self.optimizer: torch.optim.Optimizer | None = None
        if frozen:
            meta_module.requires_grad_(False)
        else:
            self.optimizer = build_meta_optimizer(
                self.meta_params, meta_optimizer, meta_lr, meta_weight_decay
            )
        self.meta_steps = 0
        self.last_meta_loss: float | None = None

    needs_meta = property(lambda self: not self.frozen)

    def is_meta_step(self, step: int) -> bool:
        """True when global step ``step`` (0-based) has a look-ahead meta step."""
        return not self.frozen and (step + 1) % self.meta_every == 0

    def lookahead_meta_grads(
        self,
        model: nn.Module,
        params: dict[str, torch.Tensor],
        direction: dict[str, torch.Tensor],
        lr: torch.Tensor | float,
        meta_x: torch.Tensor,
        meta_y: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The meta loss ``()`` of the virtual weights ``params - lr * direction`` on the meta
        batch ``(meta_x (B_meta, ...), meta_y (B_meta,))``
        (:func:`~raymeta.meta.lookahead.lookahead_loss`, ``params`` detached) and its gradient
        w.r.t. :attr:`meta_params` (None where unused): the meta-parameters enter through
        ``lr`` (MLR-SNet) or ``direction`` (MFM, Meta-Weight-Net)."""
        base = {n: p.detach() for n, p in params.items()}
        meta_loss = lookahead_loss(model, base, direction, lr, meta_x, meta_y)
        return meta_loss, list(torch.autograd.grad(meta_loss, self.meta_params, allow_unused=True))

    def apply_meta_gradient(
        self, meta_loss: torch.Tensor, grads: Sequence[torch.Tensor | None]
    ) -> float:
        """Average ``grads`` (one per :attr:`meta_params`, None counts as zeros) across workers,
        take one meta-optimiser step and record ``meta_loss`` (``()``, this worker's); returns
        it as a float."""
        self.optimizer.zero_grad(set_to_none=True)
        apply_meta_gradient(self.meta_params, list(grads), self.optimizer, self.average)
        self.last_meta_loss = float(meta_loss.detach())
        self.meta_steps += 1
        return self.last_meta_loss

    def state_dict(self) -> dict:
        """The meta module, the meta optimiser and the meta-loss record (constant size)."""
        return {
            self.state_key: self.meta_module.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "meta_steps": self.meta_steps,
            "last_meta_loss": self.last_meta_loss,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.meta_module.load_state_dict(sd[self.state_key])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(sd["optimizer"])
        self.meta_steps, self.last_meta_loss = sd["meta_steps"], sd["last_meta_loss"]


@dataclass
class StepOutput:
    """What one training step of a long-tailed method reports.

    Attributes:
        loss: ``()`` detached training objective of this worker's batch (average it across
            workers for logging).
        meta_loss: this worker's meta-batch loss after the look-ahead, or None without a meta
            step.
    """

    loss: torch.Tensor
    meta_loss: float | None = None


def sgd_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """``zero_grad`` (to zeros, not None), ``loss.backward()``, ``optimizer.step()``."""
    optimizer.zero_grad(set_to_none=False)
    loss.backward()
    optimizer.step()


class LookaheadMethod(MetaLearner, ABC):
    """A long-tailed method whose meta-parameters are meta-optimised through the shared
    one-step look-ahead on a balanced meta set (MFM, Meta-Weight-Net).

    Subclasses implement :meth:`meta_gradient` and :meth:`train_step`.

    Args:
        meta_module, meta_every, meta_lr, meta_weight_decay, meta_optimizer, frozen, average:
            as :class:`MetaLearner`.
        meta_lr_follows_lr: scale the meta-optimiser's learning rate at every meta step by
            ``lr / max(lr so far)``, ``lr`` being the classifier's (so the meta-parameters
            settle as the classifier's schedule anneals); False keeps ``meta_lr`` constant.

    Raises:
        ConfigError: ``meta_every < 1`` or an unknown meta optimiser.
    """

    label = "meta-learned"  # names the method in error messages
    resample = False

    def __init__(
        self,
        meta_module: nn.Module,
        *,
        meta_lr: float,
        meta_weight_decay: float,
        meta_every: int = 1,
        meta_optimizer: str | Callable = "adam",
        frozen: bool = False,
        average: Average = identity_average,
        meta_lr_follows_lr: bool = False,
    ):
        super().__init__(
            meta_module,
            meta_every=meta_every,
            meta_lr=meta_lr,
            meta_weight_decay=meta_weight_decay,
            meta_optimizer=meta_optimizer,
            frozen=frozen,
            average=average,
        )
        self.meta_lr, self.meta_lr_follows_lr, self.peak_lr = meta_lr, meta_lr_follows_lr, 0.0

    def start_epoch(self, epoch: int) -> None:  # noqa: B027
        """Nothing to do per epoch (the common method interface)."""

    @abstractmethod
    def meta_gradient(self, model, optimizer, x, y, meta_x, meta_y, lr):
        """``(meta_loss (), grads)``: this worker's meta loss and share of the
        meta-gradient, one entry per :attr:`meta_params` (not yet averaged)."""

    @abstractmethod
    def train_step(self, model, optimizer, x, y, *, lr, step, meta_x=None, meta_y=None):
        """One optimisation step of the classifier at ``lr`` (a :class:`StepOutput`), with a
        meta step first when :meth:`is_meta_step`."""

    def meta_due(self, step: int, meta_x: torch.Tensor | None, meta_y: torch.Tensor | None) -> bool:
        """Whether step ``step`` has a meta step.

        Raises:
            ConfigError: a meta step is due and no meta batch was given.
        """
        if not self.is_meta_step(step):
            return False
        if meta_x is None or meta_y is None:
            raise ConfigError(
                f"step {step} is a {self.label} meta step but no meta batch was given; pass "
                "meta_x/meta_y, or use frozen=True for transfer without a meta set"
            )
        return True

    def follow_lr(self, lr: float) -> None:
        """With ``meta_lr_follows_lr``, set the meta optimiser's LR to
        ``meta_lr * lr / max(lr so far)`` (``lr``: the classifier's LR of this step); call
        before :meth:`apply_meta_gradient`."""
        if self.meta_lr_follows_lr:
            self.peak_lr = max(self.peak_lr, lr)
            set_lr(self.optimizer, self.meta_lr * lr / self.peak_lr)

    def meta_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.SGD | None,
        x: torch.Tensor,
        y: torch.Tensor,
        meta_x: torch.Tensor,
        meta_y: torch.Tensor,
        lr: float,
    ) -> float:
        """One outer-loop update (arguments as :meth:`meta_gradient`). Returns this worker's
        meta loss (a float, before the update)."""
        meta_loss, grads = self.meta_gradient(model, optimizer, x, y, meta_x, meta_y, lr)
        self.follow_lr(lr)
        return self.apply_meta_gradient(meta_loss, grads)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "peak_lr": self.peak_lr}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.peak_lr = sd["peak_lr"]
