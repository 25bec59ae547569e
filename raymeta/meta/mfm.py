"""MFM meta-training: a feature modulation meta-optimised on a balanced meta set through a
one-step look-ahead (Wang et al., "Meta Feature Modulator for Long-tailed Recognition",
arXiv 2008.03428).

The paper's internals are not public; this is raymeta's reading of its abstract (docs/design.md
section 4), and every choice below is ours. The modulation (:mod:`raymeta.models.modulation`:
direct per-channel parameters or a shared modulator network) acts on the classifier's features
and is a hyper-parameter of the classifier: it is never trained on the long-tailed training
loss. Two look-ahead variants, chosen by ``lookahead``:

``"exact"`` (docs/design.md section 4, step by step). Every ``meta_every`` steps:

1. the training loss ``L_train(w, phi)`` (the base loss of the long-tailed batch, with the
   current modulation ``phi``) gives the direction ``d(phi) = dL_train/dw + mu * buf + wd * w``
   of the coming SGD step, with ``create_graph=True`` for *every* classifier weight;
2. virtual step ``w' = w - lr * d(phi)`` and meta loss ``L_meta(w', phi)`` (the meta
   objective) on a batch of the balanced meta set;
3. ``dL_meta/dphi`` (through the direction and through the modulated meta forward), averaged
   across workers, and one step of the meta optimiser (Adam by default) on ``phi``;

then the real classifier step (a second forward and backward) with the *updated* modulation.
Cost: about 4.5 to 6 cross-entropy steps (measured: SmallCNN and ResNet-8 on
Fashion-MNIST-LT, CPU).

``"fast"`` (the default): the real step *is* the virtual step, and the second-order terms are
kept only for the classifier head. One forward of the training batch with the current ``phi``
gives the real gradient ``G``; the direction ``D = mu * buf + G + wd * w`` is both the virtual
step and the real SGD step, so ``w' = w_{t+1}`` exactly. ``G`` keeps its dependence on ``phi``
(``create_graph=True``) only for the parameters after the last modulation site
(:func:`~raymeta.models.modulation.parameters_after`: SmallCNN's two-layer classifier,
ResNet's ``fc``); the backbone's update enters the meta loss as a constant. The meta-gradient
``dL_meta(w_{t+1}, phi)/dphi`` then has two paths: the modulated meta forward, and the head's
update through the training batch's modulated features. Two differences from ``"exact"``, both
ours: the classifier step at step ``t`` uses ``phi_t`` (the modulation updated at step ``t-1``:
a one-step lag), and the backbone's dependence on ``phi`` is dropped from the hypergradient.
Cost at meta batch = training batch (``benchmarks/mfm_overhead.py``, SmallCNN, 2 CPU threads):
2.1-2.5 cross-entropy epochs for direct modulation, 2.4-3.0 for the modulator network.

**Composition with a base loss** (ours; docs/mfm.md). The classifier trains with any plain
long-tailed loss (``loss``: cross-entropy, logit-adjusted / Balanced Softmax, LDAM-DRW,
class-balanced re-weighting, focal), optionally on class-balanced re-sampled batches
(``resample``), and the look-ahead's virtual step is the step of that same loss, so the
meta-gradient measures how the modulation changes the meta objective after the step the
classifier really takes. The **meta objective** (``meta_loss``) on the balanced meta batch is
cross-entropy or the logit-adjusted loss (:mod:`raymeta.meta.methods`).

BatchNorm running statistics are updated only by the real forward (virtual forwards clone the
buffers). Frozen mode (transfer): a modulator meta-trained elsewhere is applied unchanged to
train a new classifier; no meta set is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from raymeta.errors import ConfigError
from raymeta.meta.base import LookaheadMethod, StepOutput, sgd_step
from raymeta.meta.lookahead import (
    Average,
    Params,
    averaged_gradients,
    functional_logits,
    identity_average,
    second_order_direction,
    set_lr,
    sgd_direction,
    trainable_params,
    virtual_step,
)
from raymeta.meta.losses import CrossEntropyLoss, LongTailLoss
from raymeta.models.modulation import Modulation, parameters_after

LOOKAHEADS = ("fast", "exact")


class MFMTrainer(LookaheadMethod):
    """One MFM training step at a time, plain PyTorch (no Ray, no MLflow).

    Args:
        modulation: a :class:`~raymeta.models.modulation.Modulation` already attached to the
            classifier (see :func:`~raymeta.models.modulation.build_modulation`); it is kept
            out of the classifier's parameters and optimiser.
        loss: the classifier's training loss (the base loss, a
            :class:`~raymeta.meta.losses.LongTailLoss`: ``(B, K) logits, (B,) targets -> ()``;
            default cross-entropy); the virtual step is a step of this loss.
        meta_loss: the meta objective on the meta batch (same signature; default
            cross-entropy).
        resample: the loop draws the training batches class-balanced
            (:func:`~raymeta.meta.losses.class_balanced_indices`).
        meta_lr: learning rate of the meta optimiser.
        meta_weight_decay: its weight decay (default 0: decay would pull direct scales towards
            0, not towards the identity 1).
        meta_every: a look-ahead meta step every ``meta_every`` optimisation steps (global
            count, as :class:`~raymeta.meta.mlrsnet.MLRSNetMetaTrainer`'s; 1 = every step).
        meta_optimizer: ``"adam"`` (default), ``"sgd"`` or a factory ``params -> Optimizer``.
        lookahead: ``"fast"`` (default) or ``"exact"`` (module docstring).
        frozen: transfer mode — the modulation is applied but never updated; no meta set.
        average: mean of a tensor across data-parallel workers (identity for one worker); used
            for the look-ahead direction (differentiably) and for the meta-gradient.
        meta_lr_follows_lr: the meta LR follows the classifier's schedule (``meta_lr * lr /
            max(lr so far)``; default True, ours). With a constant meta LR the modulation
            kept moving while the classifier's cosine LR reached 0: the classifier could no
            longer follow, its training loss rose in the last epoch and MFM (direct) ended
            3 points below cross-entropy on Fashion-MNIST-LT IF 100 (natural order, 10 epochs:
            81.3 % vs 84.6 %; following the schedule: 84.7 %).

    Raises:
        ConfigError: ``meta_every < 1``, an unknown meta optimiser or look-ahead.
    """

    label = "MFM"
    state_key = "modulation"

    def __init__(
        self,
        modulation: Modulation,
        *,
        loss: LongTailLoss | None = None,
        meta_loss: LongTailLoss | None = None,
        resample: bool = False,
        meta_lr: float = 1e-3,
        meta_weight_decay: float = 0.0,
        meta_every: int = 1,
        meta_optimizer: str | Callable = "adam",
        lookahead: str = "fast",
        frozen: bool = False,
        average: Average = identity_average,
        meta_lr_follows_lr: bool = True,
    ):
        if lookahead not in LOOKAHEADS:
            raise ConfigError(f"unknown lookahead {lookahead!r}; accepted: {', '.join(LOOKAHEADS)}")
        super().__init__(
            modulation,
            meta_lr=meta_lr,
            meta_weight_decay=meta_weight_decay,
            meta_every=meta_every,
            meta_optimizer=meta_optimizer,
            frozen=frozen,
            average=average,
            meta_lr_follows_lr=meta_lr_follows_lr,
        )
        self.modulation, self.lookahead = modulation, lookahead
        self.loss = loss if loss is not None else CrossEntropyLoss()
        self.meta_loss = meta_loss if meta_loss is not None else CrossEntropyLoss()
        self.resample = resample
        modulation.average = average  # running statistics of a ModulatorNet, across workers

    def start_epoch(self, epoch: int) -> None:
        """The base loss's epoch hook (LDAM-DRW's deferred re-weighting)."""
        self.loss.start_epoch(epoch)

    def lookahead_objective(
        self,
        model: nn.Module,
        params: Params,
        direction: Params,
        lr: float,
        meta_x: torch.Tensor,
        meta_y: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The meta objective ``()`` of the virtual weights ``params - lr * direction``
        (``params`` detached) on the meta batch ``(meta_x (B_meta, ...), meta_y (B_meta,))``
        and its gradient w.r.t. the modulation's parameters (None where unused)."""
        base = {n: p.detach() for n, p in params.items()}
        logits = functional_logits(model, virtual_step(base, direction, lr), meta_x)
        meta_loss = self.meta_loss(logits, meta_y)
        return meta_loss, list(torch.autograd.grad(meta_loss, self.meta_params, allow_unused=True))

    def meta_gradient(
        self,
        model: nn.Module,
        optimizer: torch.optim.SGD | None,
        x: torch.Tensor,
        y: torch.Tensor,
        meta_x: torch.Tensor,
        meta_y: torch.Tensor,
        lr: float,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The ``"exact"`` look-ahead: this worker's meta loss and its share of
        ``dL_meta/dphi`` (not yet averaged). Parameters and buffers of the classifier are not
        changed.

        Args:
            model: the modulated classifier (possibly DDP-wrapped), in train mode.
            optimizer: its SGD optimiser (momentum / weight decay enter the virtual step), or
                None for a plain gradient step.
            x, y: this worker's long-tailed training batch ``(B, ...)``, ``(B,)`` int64.
            meta_x, meta_y: this worker's balanced meta batch ``(B_meta, ...)``, ``(B_meta,)``.
            lr: the learning rate of the coming real step (virtual step size).

        Returns:
            ``(meta_loss (), grads)`` with ``grads[i]`` matching ``modulation.parameters()``
            (None where a parameter does not influence the loss). The mean of ``grads`` across
            workers is the exact meta-gradient of the global batch.

        Raises:
            ConfigError: the trainer is frozen.
        """
        if self.frozen:
            raise ConfigError("a frozen MFMTrainer has no meta-gradient (frozen=True)")
        params = trainable_params(model)
        train_loss = self.loss(functional_logits(model, params, x), y)
        direction = second_order_direction(train_loss, model, params, optimizer, self.average)
        meta_loss, grads = self.lookahead_objective(model, params, direction, lr, meta_x, meta_y)
        return meta_loss.detach(), grads

    def fast_meta_gradient(
        self,
        model: nn.Module,
        optimizer: torch.optim.SGD | None,
        x: torch.Tensor,
        y: torch.Tensor,
        meta_x: torch.Tensor,
        meta_y: torch.Tensor,
        lr: float,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor | None]]:
        """The ``"fast"`` look-ahead (arguments as :meth:`meta_gradient`), without any update.

        Runs the real training forward (BatchNorm running statistics are updated once; a DDP
        model is called under ``no_sync``: gradients are averaged here instead). Call it
        inside ``modulation.tracking(y)`` when the forward is the real step's (as
        :meth:`train_step` does).

        Returns:
            ``(loss (), meta_loss (), G, grads)``: this worker's training loss, its meta loss
            ``L_meta(w - lr * D, phi)``, the worker-averaged classifier gradient ``G``
            (``name -> tensor``, detached) that the real step applies, and this worker's share
            of ``dL_meta/dphi`` (as :meth:`meta_gradient`).
        """
        params = trainable_params(model)
        head = parameters_after(model, self.modulation.sites[-1])
        no_sync = getattr(model, "no_sync", contextlib.nullcontext)
        with no_sync():
            loss = self.loss(model(x), y)
        grads = averaged_gradients(loss, params, self.average, second_order=head)
        direction = sgd_direction(model, optimizer, grads)
        meta_loss, meta_grads = self.lookahead_objective(
            model, params, direction, lr, meta_x, meta_y
        )
        detached = {n: g.detach() for n, g in grads.items()}
        return loss.detach(), meta_loss.detach(), detached, meta_grads

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
        """One optimisation step of the classifier at ``lr``, with a look-ahead meta step of
        the modulation when :meth:`is_meta_step` (``"exact"``: before the classifier step,
        which then uses the updated modulation; ``"fast"``: sharing the classifier step's
        forward and backward, the modulation updated after it).

        Without a meta step: ``model(x)`` (DDP averages the classifier gradient), the base
        loss, ``backward()`` and ``optimizer.step()``; the modulation gets no gradient. Every
        real forward runs inside ``modulation.tracking(y)``.

        Raises:
            ConfigError: a meta step is due and no meta batch was given.
        """
        due = self.meta_due(step, meta_x, meta_y)
        set_lr(optimizer, lr)
        if due and self.lookahead == "fast":
            with self.modulation.tracking(y):
                loss, meta_loss, grads, meta_grads = self.fast_meta_gradient(
                    model, optimizer, x, y, meta_x, meta_y, lr
                )
            for name, p in trainable_params(model).items():
                p.grad = grads[name]
            optimizer.step()
            self.follow_lr(lr)
            return StepOutput(loss, self.apply_meta_gradient(meta_loss, meta_grads))
        meta_loss = self.meta_step(model, optimizer, x, y, meta_x, meta_y, lr) if due else None
        with self.modulation.no_meta_grad(), self.modulation.tracking(y):
            loss = self.loss(model(x), y)
        sgd_step(optimizer, loss)
        return StepOutput(loss.detach(), meta_loss)
