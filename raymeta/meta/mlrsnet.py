"""MLR-SNet meta-training (Shu et al., TPAMI 2022, Sec. 4.1, Algorithm 1).

The meta-learner is the schedule of the task it is meta-trained on: at every optimisation step
it maps the (worker-averaged) batch loss to the LR of the real SGD step. Every ``meta_every`` steps,
counted globally across epochs, a one-step look-ahead updates it first:

1. ``lr = (1 - beta) * gamma * MLRSNet(loss)`` with the current LSTM state, keeping the graph
   (``beta`` the SGD momentum: MLR-SNet's output is the effective step size,
   :func:`~raymeta.schedules.mlrsnet.momentum_lr_scale`);
2. virtual step ``w' = w - lr * d`` with ``d`` the direction SGD is about to take (the batch
   gradient plus weight decay and the momentum buffer, plain or Nesterov), which does not
   depend on the meta-learner;
3. meta loss ``L_meta(w')`` on a batch of the balanced meta set;
4. Adam step on the meta-learner with ``dL_meta/dtheta`` (averaged across workers).

Because ``lr`` only scales a constant ``d``, the exact hypergradient
``dL_meta/dlr = -<grad L_meta(w'), d>`` needs no second-order terms: the meta step costs one
forward and one backward pass on the meta batch, about one plain step. The reference instead
rebuilds the graph with ``create_graph=True`` (about 2.4 plain steps) and counts its ``t_val``
(our ``meta_every``) within an epoch (so an epoch shorter than ``t_val`` batches never
meta-updates).

The real step then uses the LR of the *updated* meta-learner, as in the reference; the LSTM
state advances once per optimisation step and is carried detached.
"""

from __future__ import annotations

import torch
from torch import nn

from raymeta.meta.base import MetaLearner
from raymeta.meta.lookahead import Average, identity_average, sgd_direction, unwrap
from raymeta.schedules.base import Schedule
from raymeta.schedules.mlrsnet import MLRSNet, gamma_scale, momentum_lr_scale, require_loss


class MLRSNetMetaTrainer(MetaLearner, Schedule):
    """A trainable MLR-SNet acting as the schedule of the task it is meta-trained on: a
    :class:`~raymeta.meta.base.MetaLearner` whose meta module is the cell, and a
    :class:`~raymeta.schedules.base.Schedule` (``lr`` needs the batch loss).

    Args:
        cell: the meta-learner (canonical layout), trained in place.
        num_classes: ``C`` of the task, for gamma.
        meta_every: meta step every ``meta_every`` optimisation steps (global count; the
            paper's ``T_val``: 300).
        meta_batch_size: meta-set images per meta step, summed over workers.
        meta_lr, meta_weight_decay: Adam hyper-parameters of the outer loop (paper: 1e-3, 1e-4).
        loss_scale: divide the batch loss by this before the cell (1 for images).
        average: reduces a tensor to its mean over data-parallel workers (identity for one).
        momentum: the task's SGD momentum ``beta``; the real and the virtual step use the LR
            ``(1 - beta) * gamma * MLRSNet(loss)``, so the meta-learner learns the effective
            step size whatever the momentum.

    Raises:
        ConfigError: ``meta_every < 1``.
        ValueError: ``momentum`` not in ``[0, 1)``.
    """

    state_key = "cell"

    def __init__(
        self,
        cell: MLRSNet,
        num_classes: int,
        meta_every: int = 1,
        meta_batch_size: int = 100,
        meta_lr: float = 1e-3,
        meta_weight_decay: float = 1e-4,
        loss_scale: float = 1.0,
        average: Average = identity_average,
        momentum: float = 0.0,
    ):
        super().__init__(
            cell,
            meta_every=meta_every,
            meta_lr=meta_lr,
            meta_weight_decay=meta_weight_decay,
            average=average,
        )
        self.cell, self.num_classes = cell, num_classes
        self.meta_batch_size, self.loss_scale = meta_batch_size, loss_scale
        self.state = cell.initial_state()
        self.gamma: float | None = None
        self.lr_scale = momentum_lr_scale(momentum)

    def start_epoch(self, epoch, mean_train_loss):
        if self.gamma is None:  # gamma from the initial model's mean training loss L0
            self.gamma = gamma_scale(mean_train_loss(), self.num_classes)

    def _cell_input(self, loss: float) -> torch.Tensor:
        w = self.cell.head.weight
        return torch.tensor(loss / self.loss_scale, device=w.device, dtype=w.dtype)

    needs_loss = True

    @torch.no_grad()
    def lr(self, step, epoch, loss):
        self.check_loss(loss, step, epoch)
        require_loss(loss)
        unit, self.state = self.cell(self._cell_input(loss), self.state)
        return float(self.lr_scale * self.gamma * unit)

    def virtual_lr(self, loss: float) -> torch.Tensor:
        """The LR ``()`` of the coming step, ``(1 - beta) * gamma * MLRSNet(loss)``, from the
        current LSTM state (not advanced), differentiable w.r.t. the cell's parameters."""
        unit, _ = self.cell(self._cell_input(loss), self.state)
        return self.lr_scale * self.gamma * unit

    def meta_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.SGD,
        loss: float,
        meta_x: torch.Tensor,
        meta_y: torch.Tensor,
    ) -> float:
        """One outer-loop update; call after ``backward()`` of the training batch and before
        :meth:`lr` for the same step. Returns the meta loss (this worker's meta batch).

        Args:
            model: the task model (possibly DDP-wrapped), gradients already averaged.
            optimizer: the task's SGD optimiser (its momentum buffers define ``d``).
            loss: the worker-averaged training batch loss (mean cross-entropy).
            meta_x, meta_y: this worker's meta batch ``(B_meta, ...)``, ``(B_meta,)``.
        """
        params = dict(unwrap(model).named_parameters())
        direction = sgd_direction(model, optimizer)
        meta_loss, grads = self.lookahead_meta_grads(
            model, params, direction, self.virtual_lr(loss), meta_x, meta_y
        )
        return self.apply_meta_gradient(meta_loss, grads)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "state": self.state, "gamma": self.gamma}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.state, self.gamma = sd["state"], sd["gamma"]
