"""The training-step interface of the long-tailed methods, and the base class of the
meta-learned ones (MFM, Meta-Weight-Net).

Every long-tailed method has ``train_step(model, optimizer, x, y, *, lr, step, meta_x,
meta_y) -> StepOutput``, ``is_meta_step(step)``, ``needs_meta``, ``start_epoch(epoch)``,
``state_dict()`` / ``load_state_dict()`` (and ``resample`` for re-sampling). The training loop
(:class:`raymeta.train.rules.MethodRule`) drives them; they know nothing of Ray or MLflow.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
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


@dataclass
class StepOutput:
    """What one training step reports.

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


class LookaheadMethod(ABC):
    """Base class of a method whose meta-parameters (``meta_module``'s parameters) are
    meta-optimised through the shared one-step look-ahead on a balanced meta set.

    Subclasses implement :meth:`meta_gradient` and :meth:`train_step`.

    Args:
        meta_module: the module holding the meta-parameters (a modulation, a weighting net).
        meta_lr, meta_weight_decay: the meta optimiser's hyper-parameters.
        meta_every: a look-ahead meta step every ``meta_every`` optimisation steps (global
            count, 0-based step ``s`` is a meta step when ``(s + 1) % meta_every == 0``).
        meta_optimizer: ``"adam"``, ``"sgd"`` or a factory ``params -> Optimizer``.
        frozen: never update the meta-parameters (no meta set needed).
        average: mean of a tensor across data-parallel workers (identity for one worker).
        meta_lr_follows_lr: scale the meta-optimiser's learning rate at every meta step by
            ``lr / max(lr so far)``, ``lr`` being the classifier's (so the meta-parameters
            settle as the classifier's schedule anneals); False keeps ``meta_lr`` constant.

    Raises:
        ConfigError: ``meta_every < 1`` or an unknown meta optimiser.
    """

    label = "meta-learned"  # names the method in error messages
    state_key = "meta_module"  # key of the meta module's state in :meth:`state_dict`
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
        if meta_every < 1:
            raise ConfigError(f"meta_every={meta_every} is invalid; accepted: an integer >= 1")
        self.meta_module, self.meta_every, self.frozen = meta_module, meta_every, frozen
        self.average = average
        self.meta_lr, self.meta_lr_follows_lr, self.peak_lr = meta_lr, meta_lr_follows_lr, 0.0
        self.meta_params = list(meta_module.parameters())
        self.optimizer = None
        if frozen:
            meta_module.requires_grad_(False)
        else:
            self.optimizer = build_meta_optimizer(
                self.meta_params, meta_optimizer, meta_lr, meta_weight_decay
            )
        self.meta_losses: list[float] = []

    needs_meta = property(lambda self: not self.frozen)

    def is_meta_step(self, step: int) -> bool:
        """True when global step ``step`` (0-based) starts with a look-ahead meta step."""
        return not self.frozen and (step + 1) % self.meta_every == 0

    def start_epoch(self, epoch: int) -> None:  # noqa: B027
        """Nothing to do per epoch (the common method interface)."""

    @abstractmethod
    def meta_gradient(self, model, optimizer, x, y, meta_x, meta_y, lr):
        """``(meta_loss (), grads)``: this worker's meta loss and share of the
        meta-gradient, one entry per :attr:`meta_params` (not yet averaged)."""

    def lookahead_meta_grads(
        self, model: nn.Module, params: dict, direction: dict, lr: float, meta_x, meta_y
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Meta loss ``()`` of the virtual weights ``params - lr * direction`` on the meta batch
        (the shared look-ahead) and its gradient w.r.t. :attr:`meta_params` (None where unused)."""
        base = {n: p.detach() for n, p in params.items()}
        meta_loss = lookahead_loss(model, base, direction, lr, meta_x, meta_y)
        return meta_loss, list(torch.autograd.grad(meta_loss, self.meta_params, allow_unused=True))

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

    def apply_meta_gradient(self, meta_loss: torch.Tensor, grads: list, lr: float) -> float:
        """Average ``grads`` across workers, take one meta-optimiser step (at ``meta_lr``, or
        ``meta_lr * lr / max(lr so far)`` with ``meta_lr_follows_lr``; ``lr``: the
        classifier's learning rate of this step) and record ``meta_loss``; returns it as a
        float."""
        if self.meta_lr_follows_lr:
            self.peak_lr = max(self.peak_lr, lr)
            set_lr(self.optimizer, self.meta_lr * lr / self.peak_lr)
        self.optimizer.zero_grad(set_to_none=True)
        apply_meta_gradient(self.meta_params, grads, self.optimizer, self.average)
        value = float(meta_loss)
        self.meta_losses.append(value)
        return value

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
        return self.apply_meta_gradient(meta_loss, grads, lr)

    def state_dict(self) -> dict:
        return {
            self.state_key: self.meta_module.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "meta_losses": list(self.meta_losses),
            "peak_lr": self.peak_lr,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.meta_module.load_state_dict(sd[self.state_key])
        if self.optimizer is not None and sd.get("optimizer") is not None:
            self.optimizer.load_state_dict(sd["optimizer"])
        self.meta_losses = list(sd.get("meta_losses", []))
        self.peak_lr = sd.get("peak_lr", 0.0)
