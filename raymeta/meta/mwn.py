"""Meta-Weight-Net (Shu et al., "Meta-Weight-Net: Learning an Explicit Mapping For Sample
Weighting", NeurIPS 2019): a weighting net from a sample's loss to its weight, meta-learned
through the shared one-step look-ahead of :mod:`raymeta.meta.lookahead` on a balanced meta set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raymeta.meta.base import LookaheadMethod, StepOutput, sgd_step
from raymeta.meta.lookahead import (
    Average,
    functional_logits,
    identity_average,
    second_order_direction,
    set_lr,
    trainable_params,
    worker_mean,
)


class WeightNet(nn.Module):
    """Meta-Weight-Net's weighting function: an MLP ``1 -> hidden -> 1`` (ReLU, sigmoid output)
    from a sample's loss to its weight in ``(0, 1)`` (Shu et al., NeurIPS 2019, Sec. 3; hidden
    100 in the reference). Input ``(B, 1)`` losses (nats), output ``(B, 1)`` weights."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(losses))


class MetaWeightNetTrainer(LookaheadMethod):
    """Meta-Weight-Net (Shu et al., NeurIPS 2019, Algorithm 1) with the shared look-ahead.

    Every ``meta_every`` steps: per-sample losses ``l_i(w)`` of the training batch (functional
    forward, BN buffers untouched), weights ``v_i = V(l_i; theta)`` (losses detached, as in the
    reference), weighted loss ``sum v_i l_i / sum v_i`` (``normalise``, the reference) or
    ``/ B``; its gradient with ``create_graph=True`` gives the virtual step (plus SGD's
    momentum and weight decay); the meta loss of the virtually updated classifier on a balanced
    meta batch is differentiated w.r.t. ``theta`` and the weighting net takes an optimiser
    step. The real step then uses the updated net's weights (detached).

    Args:
        wnet: the :class:`WeightNet`.
        meta_lr, meta_weight_decay: optimiser of ``theta``. The reference's long-tail script
            uses Adam with lr 1e-5, weight decay 1e-4; that lr leaves the weights nearly uniform
            in short runs (docs/design.md section 4), so the default lr here is 1e-3.
        meta_every: meta step every ``meta_every`` optimisation steps.
        normalise: divide the weighted loss by the sum of the weights (the reference).
        meta_optimizer: ``"adam"``, ``"sgd"`` or a factory.
        average: mean across data-parallel workers (identity for one).
        meta_lr_follows_lr: scale the meta LR with the classifier's schedule (default False:
            the reference keeps it constant; MFM's default is True).
    """

    label = "Meta-Weight-Net"
    state_key = "wnet"

    def __init__(
        self,
        wnet: WeightNet,
        *,
        meta_lr: float = 1e-3,
        meta_weight_decay: float = 1e-4,
        meta_every: int = 1,
        normalise: bool = True,
        meta_optimizer: str | Callable = "adam",
        average: Average = identity_average,
        meta_lr_follows_lr: bool = False,
    ):
        super().__init__(
            wnet,
            meta_lr=meta_lr,
            meta_weight_decay=meta_weight_decay,
            meta_every=meta_every,
            meta_optimizer=meta_optimizer,
            average=average,
            meta_lr_follows_lr=meta_lr_follows_lr,
        )
        self.wnet, self.normalise = wnet, normalise

    def weighted_loss(
        self, per_sample: torch.Tensor, weights: torch.Tensor, differentiable: bool
    ) -> torch.Tensor:
        """``(B,)`` losses and weights -> this worker's share of the global weighted loss."""
        total = (weights * per_sample).mean()
        if not self.normalise:
            return total
        mean_w = weights.mean()
        denom = (
            worker_mean(mean_w, self.average) if differentiable else self.average(mean_w.detach())
        )
        return total / denom.clamp_min(1e-12)

    def meta_gradient(self, model, optimizer, x, y, meta_x, meta_y, lr):
        """This worker's meta loss and share of ``dL_meta/dtheta`` (arguments and averaging as
        :meth:`raymeta.meta.mfm.MFMTrainer.meta_gradient`)."""
        params = trainable_params(model)
        per = F.cross_entropy(functional_logits(model, params, x), y, reduction="none")
        weights = self.wnet(per.detach()[:, None]).squeeze(1)
        loss = self.weighted_loss(per, weights, differentiable=True)
        direction = second_order_direction(loss, model, params, optimizer, self.average)
        meta_loss, grads = self.lookahead_meta_grads(model, params, direction, lr, meta_x, meta_y)
        return meta_loss.detach(), grads

    def train_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.SGD,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        lr: float,
        step: int,
        meta_x: torch.Tensor | None = None,
        meta_y: torch.Tensor | None = None,
    ) -> StepOutput:
        """The meta step if due, then the real weighted SGD step (see :class:`raymeta.meta.losses.LossStep`).

        Raises:
            ConfigError: a meta step is due and no meta batch was given.
        """
        due = self.meta_due(step, meta_x, meta_y)
        meta_loss = self.meta_step(model, optimizer, x, y, meta_x, meta_y, lr) if due else None
        set_lr(optimizer, lr)
        per = F.cross_entropy(model(x), y, reduction="none")
        with torch.no_grad():
            weights = self.wnet(per.detach()[:, None]).squeeze(1)
        loss = self.weighted_loss(per, weights, differentiable=False)
        sgd_step(optimizer, loss)
        return StepOutput(loss.detach(), meta_loss)
