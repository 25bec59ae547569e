"""Helpers for second-order one-step look-aheads (MFM, Meta-Weight-Net) around the shared
look-ahead of :mod:`raymeta.meta.lookahead`.

MLR-SNet's look-ahead direction does not depend on the meta-learner; MFM's and
Meta-Weight-Net's does: ``d(phi)`` is the gradient of a training loss that the meta-parameters
``phi`` shape (a feature modulation, per-sample weights), taken with ``create_graph=True`` so
that the meta-gradient includes the second-order path through ``d``.

Data parallelism. With ``N`` workers each holding a chunk of the global batch, the virtual step
must use the *global* direction ``D = mean_r d_r(phi)``, and the meta-gradient must be that of
the global meta loss. :func:`worker_mean` is a differentiable all-reduce (mean in the forward,
mean of the incoming gradients in the backward); with it every worker's local backward yields
``N`` times its share of the global hypergradient, so averaging the meta-gradients afterwards
(as MLR-SNet does) gives the exact hypergradient of the ``N * b`` batch, to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from raymeta.meta.lookahead import Params, sgd_direction, unwrap

Average = Callable[[torch.Tensor], torch.Tensor]


def identity_average(t: torch.Tensor) -> torch.Tensor:
    """The ``average`` of a single worker."""
    return t


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


class _WorkerMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, average: Average) -> torch.Tensor:
        ctx.average = average
        return average(x.detach().clone())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return ctx.average(grad.contiguous().clone()), None


def worker_mean(x: torch.Tensor, average: Average = identity_average) -> torch.Tensor:
    """Differentiable mean of ``x`` across data-parallel workers (any shape).

    Forward: ``average(x)``; backward: ``average(grad)``. Every worker must call it (and later
    backpropagate through it) in the same order, as for any collective.
    """
    return _WorkerMean.apply(x, average)


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """``name -> parameter`` of the (unwrapped) model's parameters that require grad."""
    return {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}


def functional_logits(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, K)`` of ``model`` evaluated with ``params`` on ``x``; buffers are cloned so
    BatchNorm running statistics are untouched (as in
    :func:`raymeta.meta.lookahead.functional_loss`, which returns only the mean cross-entropy)."""
    model = unwrap(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return functional_call(model, {**buffers, **params}, (x,))


def sgd_constant_part(
    model: nn.Module, optimizer: torch.optim.SGD | None, names: list[str]
) -> dict[str, torch.Tensor]:
    """What SGD adds to the gradient in its next step: ``mu * buf + wd * w`` (``wd * w`` on the
    first step), from :func:`raymeta.meta.lookahead.sgd_direction` at zero gradient.

    The ``.grad`` of the model's parameters are restored afterwards. Returns ``name -> tensor``
    for ``names`` (an empty dict when ``optimizer`` is None: a plain gradient step).

    Raises:
        ValueError: the optimiser uses dampening or Nesterov momentum.
    """
    if optimizer is None:
        return {}
    inner = unwrap(model)
    saved = [(p, p.grad) for p in inner.parameters()]
    try:
        for p in inner.parameters():
            p.grad = torch.zeros_like(p)
        full = sgd_direction(inner, optimizer)
    finally:
        for p, g in saved:
            p.grad = g
    return {n: full[n] for n in names}


def second_order_direction(
    loss: torch.Tensor,
    model: nn.Module,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.SGD | None,
    average: Average = identity_average,
) -> dict[str, torch.Tensor]:
    """The global direction ``D = mean_r (dL_r/dw + mu * buf + wd * w)`` of the coming SGD
    step, differentiable w.r.t. whatever ``loss`` depends on besides ``w``.

    Args:
        loss: ``()`` this worker's training loss, a function of ``params`` and the
            meta-parameters.
        model: the classifier (possibly DDP-wrapped), for the optimiser's constant part.
        params: ``name -> parameter`` the loss was computed with (:func:`trainable_params`).
        optimizer: the classifier's SGD optimiser (momentum buffers, weight decay) or None.
        average: mean across workers (identity for one worker); applied once, flattened.

    Returns:
        ``name -> (same shape as the parameter)`` tensors carrying the second-order graph.
    """
    names = list(params)
    grads = torch.autograd.grad(
        loss, [params[n] for n in names], create_graph=True, allow_unused=True
    )
    const = sgd_constant_part(model, optimizer, names)
    parts = []
    for n, g in zip(names, grads, strict=True):
        g = torch.zeros_like(params[n]) if g is None else g
        if n in const:
            g = g + const[n]
        parts.append(g.reshape(-1))
    flat = worker_mean(torch.cat(parts), average)
    out, offset = {}, 0
    for n in names:
        k = params[n].numel()
        out[n] = flat[offset : offset + k].view_as(params[n])
        offset += k
    return out


def build_meta_optimizer(
    params, kind: str | Callable = "adam", lr: float = 1e-3, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The outer-loop optimiser: ``"adam"``, ``"sgd"`` (momentum 0.9) or a factory
    ``params -> Optimizer``.

    Raises:
        ConfigError: unknown ``kind``.
    """
    from raymeta.errors import ConfigError

    if callable(kind):
        return kind(params)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ConfigError(f"unknown meta optimiser {kind!r}; accepted: adam, sgd")


def apply_meta_gradient(
    params: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    optimizer: torch.optim.Optimizer,
    average: Average = identity_average,
) -> None:
    """Average ``grads`` across workers (one flattened all-reduce), store them in ``.grad``
    and take one ``optimizer`` step."""
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    flat = average(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p in params:
        k = p.numel()
        p.grad = flat[offset : offset + k].view_as(p).clone()
        offset += k
    optimizer.step()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
