"""MLR-SNet meta-training (Shu et al., TPAMI 2022, Sec. 4.1, Algorithm 1).

The meta-learner is the schedule of the task it is meta-trained on: at every optimisation step
it maps the (worker-averaged) batch loss to the LR of the real SGD step. Every ``meta_every`` steps,
counted globally across epochs, a meta step updates it first. Two meta-objectives
(``meta_objective``):

``lookahead`` (the paper's one-step look-ahead):

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

``delayed`` (a longer horizon against the one-step objective's short-horizon bias,
docs/mlrsnet.md section 4): the last ``horizon`` ``k`` real steps before each meta step are the
meta-objective's window. For each the trainer keeps the LSTM state before it, the cell's input,
the LR it applied and the direction ``d_j`` the real step took (detached). At the meta step the
window's LRs ``lr_j(theta)`` are recomputed from the stored state and inputs with graph
(truncated backpropagation through the LSTM state over the window), and the meta loss is taken
at ``w_k(theta) = w_0 - sum_j lr_j(theta) d_j``, ``w_0`` the weights before the window: the
real weights after those ``k`` steps when the cell has not changed since (``k <= meta_every``),
and otherwise the weights these steps would have reached with the current cell (the windows of
successive meta steps overlap when ``k > meta_every``). The ``d_j`` are constants (first order
in the directions: a direction's dependence on the earlier LRs through the weights is dropped),
so the gradient ``-sum_j <grad L_meta(w_k), d_j> dlr_j/dtheta`` is exact for this surrogate; it
costs one forward and backward pass on the meta batch, ``k`` LSTM steps and ``k`` stored
directions.

The real step then uses the LR of the *updated* meta-learner, as in the reference; the LSTM
state advances once per optimisation step and is carried detached.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from raymeta.meta.base import MetaLearner
from raymeta.meta.lookahead import (
    Average,
    functional_loss,
    identity_average,
    sgd_direction,
    unwrap,
)
from raymeta.schedules.base import Schedule
from raymeta.schedules.mlrsnet import MLRSNet, gamma_scale, momentum_lr_scale, require_loss
from raymeta.schedules.mlrsnet_settings import check_meta_objective


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
        average: reduces a tensor to its mean over the workers that meta-train this cell
            (identity for one; in multi-task meta-training, every worker of every task).
        momentum: the task's SGD momentum ``beta``; the real and the virtual step use the LR
            ``(1 - beta) * gamma * MLRSNet(loss)``, so the meta-learner learns the effective
            step size whatever the momentum.
        meta_objective: ``lookahead`` (one virtual step) or ``delayed`` (the meta loss after
            the last ``horizon`` real steps before each meta step); see the module docstring.
        horizon: ``k`` of ``delayed``, in optimisation steps (default ``meta_every``: the
            steps since the previous meta step); None for ``lookahead``.

    Raises:
        ConfigError: ``meta_every < 1``, an unknown ``meta_objective`` or a bad ``horizon``
            (:func:`~raymeta.schedules.mlrsnet_settings.check_meta_objective`).
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
        meta_objective: str = "lookahead",
        horizon: int | None = None,
    ):
        super().__init__(
            cell,
            meta_every=meta_every,
            meta_lr=meta_lr,
            meta_weight_decay=meta_weight_decay,
            average=average,
        )
        check_meta_objective(meta_objective, horizon)
        self.cell, self.num_classes = cell, num_classes
        self.meta_batch_size, self.loss_scale = meta_batch_size, loss_scale
        self.state = cell.initial_state()
        self.gamma: float | None = None
        self.lr_scale = momentum_lr_scale(momentum)
        self.meta_objective = meta_objective
        self.horizon = (horizon or meta_every) if meta_objective == "delayed" else 0
        self._clear_window()

    def start_epoch(self, epoch, mean_train_loss):
        if self.gamma is None:  # gamma from the initial model's mean training loss L0
            self.gamma = gamma_scale(mean_train_loss(), self.num_classes)

    def new_task(self) -> None:
        """Forget what belongs to the task model, keeping the meta-learner and its optimiser:
        the LSTM state, gamma (recomputed from the next model's ``L0``) and the delayed
        objective's window. Multi-task meta-training calls it when a finished task restarts
        from a fresh initialisation."""
        self.state, self.gamma = self.cell.initial_state(), None
        self._clear_window()

    def _cell_input(self, loss: float) -> torch.Tensor:
        w = self.cell.head.weight
        return torch.tensor(loss / self.loss_scale, device=w.device, dtype=w.dtype)

    needs_loss = True
    # meta-training has no LR setting: MLR-SNet gives the LR, scaled by gamma from L0
    step_settings = (
        "the task's momentum or weight_decay (meta-training's LR comes from MLR-SNet, scaled "
        "by gamma from the initial loss)"
    )

    def in_window(self, step: int) -> bool:
        """True when global step ``step`` (0-based) is one of the ``horizon`` steps before a
        meta step (the delayed objective's window; every step when ``horizon >= meta_every``;
        never for ``lookahead``)."""
        until = self.meta_every - 1 - step % self.meta_every  # 0: step is itself a meta step
        return 0 < (until or self.meta_every) <= self.horizon

    @torch.no_grad()
    def lr(self, step, epoch, loss):
        self.check_loss(loss, step, epoch)
        require_loss(loss)
        x, before = self._cell_input(loss), self.state
        unit, self.state = self.cell(x, before)
        lr = float(self.lr_scale * self.gamma * unit)
        if self.in_window(step):
            self._window.append({"state": before, "input": x, "lr": lr})
        return lr

    def observe_step(self, model: nn.Module, optimizer: torch.optim.SGD, step: int) -> None:
        """Keep the direction ``d (P,)`` (flattened over the parameters) of the real step
        ``step`` when it is in the delayed objective's window; call after :meth:`lr` and
        before ``optimizer.step()`` (``d`` is read from the gradients and momentum buffers)."""
        if self.in_window(step):
            d = sgd_direction(model, optimizer)
            self._window[-1]["direction"] = torch.cat([v.reshape(-1) for v in d.values()]).detach()

    def virtual_lr(self, loss: float) -> torch.Tensor:
        """The LR ``()`` of the coming step, ``(1 - beta) * gamma * MLRSNet(loss)``, from the
        current LSTM state (not advanced), differentiable w.r.t. the cell's parameters."""
        unit, _ = self.cell(self._cell_input(loss), self.state)
        return self.lr_scale * self.gamma * unit

    def window_lrs(self) -> torch.Tensor:
        """The LRs ``(k,)`` of the delayed objective's window, recomputed with the current cell
        from the LSTM state before its first step, differentiable w.r.t. the cell's parameters
        (equal to the LRs the real steps took when the cell has not changed since)."""
        state, units = self._window[0]["state"], []
        for entry in self._window:
            unit, state = self.cell(entry["input"], state)
            units.append(unit)
        return self.lr_scale * self.gamma * torch.stack(units)

    def delayed_meta_grads(
        self, model: nn.Module, meta_x: torch.Tensor, meta_y: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The delayed objective's meta loss ``()`` at ``w_k = w_0 - sum_j lr_j d_j`` on the meta
        batch ``(meta_x (B_meta, ...), meta_y (B_meta,))`` and this worker's gradient of it
        w.r.t. the cell's parameters, the ``d_j`` held constant (None where unused; all None
        when the window is empty, e.g. just after :meth:`new_task`). ``w_k`` is the current
        weights moved by ``sum_j (lr_j applied - lr_j now) d_j``: zero unless the cell changed
        inside the window."""
        params = {n: p.detach() for n, p in unwrap(model).named_parameters()}
        if not self._window:
            return functional_loss(model, params, meta_x, meta_y).detach(), [None] * len(
                self.meta_params
            )
        lrs = self.window_lrs()
        directions = torch.stack([entry["direction"] for entry in self._window])  # (k, P)
        applied = torch.tensor([entry["lr"] for entry in self._window], dtype=lrs.dtype)
        shift = (applied.to(lrs.device) - lrs.detach()) @ directions  # (P,)
        offsets = shift.split([p.numel() for p in params.values()])
        params = {
            n: (p + o.view_as(p)).requires_grad_(True)
            for (n, p), o in zip(params.items(), offsets, strict=True)
        }
        meta_loss = functional_loss(model, params, meta_x, meta_y)
        grad = torch.autograd.grad(meta_loss, list(params.values()))
        coeffs = -(directions @ torch.cat([g.reshape(-1) for g in grad]))  # (k,) dL_meta/dlr_j
        surrogate = (coeffs * lrs).sum()
        grads = torch.autograd.grad(surrogate, self.meta_params, allow_unused=True)
        return meta_loss.detach(), list(grads)

    def meta_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.SGD,
        loss: float,
        meta_x: torch.Tensor,
        meta_y: torch.Tensor,
    ) -> float:
        """One outer-loop update; call after ``backward()`` of the training batch and before
        :meth:`lr` for the same step. Returns the meta loss (this worker's meta batch: after
        the virtual step for ``lookahead``, at the current weights for ``delayed``).

        Args:
            model: the task model (possibly DDP-wrapped), gradients already averaged.
            optimizer: the task's SGD optimiser (its momentum buffers define ``d``).
            loss: the worker-averaged training batch loss (mean cross-entropy).
            meta_x, meta_y: this worker's meta batch ``(B_meta, ...)``, ``(B_meta,)``.
        """
        if self.meta_objective == "delayed":
            meta_loss, grads = self.delayed_meta_grads(model, meta_x, meta_y)
        else:
            params = dict(unwrap(model).named_parameters())
            direction = sgd_direction(model, optimizer)
            meta_loss, grads = self.lookahead_meta_grads(
                model, params, direction, self.virtual_lr(loss), meta_x, meta_y
            )
        return self.apply_meta_gradient(meta_loss, grads)

    def _clear_window(self) -> None:
        self._window: deque[dict] = deque(maxlen=max(self.horizon, 1))

    def state_dict(self) -> dict:
        """The meta-learner state, the LSTM state, gamma and the delayed objective's window (at
        most ``horizon`` directions: constant size)."""
        window = list(self._window)
        return {**super().state_dict(), "state": self.state, "gamma": self.gamma, "window": window}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.state, self.gamma = sd["state"], sd["gamma"]
        self._clear_window()
        self._window.extend(sd["window"])
