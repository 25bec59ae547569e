"""The one-step look-ahead shared by MLR-SNet, MFM and Meta-Weight-Net (docs/design.md section 5).

Every method needs the gradient of a meta loss through one virtual SGD step ``w' = w - lr * d``:
the meta loss is the loss of the virtually updated model on a batch of the meta set. It is
written once here, functionally, with ``torch.func.functional_call`` over a dict of parameters;
buffers are cloned for every virtual pass so BatchNorm running statistics are never touched
(the batch statistics are still used, as in a training-mode forward).

What carries the meta-gradient depends on the method:

- MLR-SNet: ``lr`` comes from the meta-learner, ``d`` is a constant (no second-order terms):
  :func:`sgd_direction` of the gradients already in ``.grad``.
- MFM, Meta-Weight-Net: ``d(phi)`` is the gradient of a training loss that the
  meta-parameters ``phi`` shape (a feature modulation, per-sample weights), taken with
  ``create_graph=True`` (:func:`averaged_gradients`, :func:`second_order_direction`), so the
  meta-gradient includes the second-order path through ``d``.

Data parallelism. With ``N`` workers each holding a chunk of the global batch, the virtual step
must use the *global* direction ``D = mean_r d_r(phi)``, and the meta-gradient must be that of
the global meta loss. :func:`worker_mean` is a differentiable all-reduce (mean in the forward,
mean of the incoming gradients in the backward); with it every worker's local backward yields
``N`` times its share of the global hypergradient, so averaging the meta-gradients afterwards
(:func:`apply_meta_gradient`) gives the exact hypergradient of the ``N * b`` batch, to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Params = Mapping[str, torch.Tensor]
Average = Callable[[torch.Tensor], torch.Tensor]


def identity_average(t: torch.Tensor) -> torch.Tensor:
    """The ``average`` of a single worker."""
    return t


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying module of a ``DistributedDataParallel`` (or similar) wrapper."""
    return getattr(model, "module", model)


def trainable_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """``name -> parameter`` of the (unwrapped) model's parameters that require grad."""
    return {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}


def functional_logits(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Outputs of ``model`` evaluated with ``params`` on ``x``; BN buffers untouched.

    Args:
        model: the module, possibly DDP-wrapped (its own parameters are ignored where
            ``params`` has a name). Forward hooks (e.g. an MFM modulation) still run.
        params: name -> tensor for the parameters to substitute.
        x: ``(B, ...)`` inputs.

    Returns:
        ``(B, K)`` logits.
    """
    model = unwrap(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return functional_call(model, {**buffers, **params}, (x,))


def functional_loss(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy ``()`` of :func:`functional_logits` on ``(x, y)`` (``y``: ``(B,)``
    int64 labels); BN buffers untouched."""
    return F.cross_entropy(functional_logits(model, params, x), y)


def virtual_step(
    params: Params, direction: Params, lr: torch.Tensor | float
) -> dict[str, torch.Tensor]:
    """The virtual SGD update ``w' = w - lr * d`` for every parameter (a new dict).

    ``lr`` may be a ``()`` tensor that requires grad (MLR-SNet) and ``d`` may carry a graph (MFM).
    """
    return {name: w - lr * direction[name] for name, w in params.items()}


def lookahead_loss(
    model: nn.Module,
    params: Params,
    direction: Params,
    lr: torch.Tensor | float,
    meta_x: torch.Tensor,
    meta_y: torch.Tensor,
) -> torch.Tensor:
    """Meta loss after one virtual step: ``L_meta(w - lr * d)`` on a meta batch ``(meta_x, meta_y)``.

    Source: the bilevel one-step approximation of MLR-SNet (Shu et al. 2022, Eq. 6) and of
    Meta-Weight-Net / MFM. Returns a ``()`` tensor differentiable w.r.t. whatever ``lr`` and
    ``direction`` depend on.
    """
    return functional_loss(model, virtual_step(params, direction, lr), meta_x, meta_y)


def sgd_direction(
    model: nn.Module, optimizer: torch.optim.SGD | None, grads: Params | None = None
) -> dict[str, torch.Tensor]:
    """The direction ``d`` of the SGD step that ``optimizer.step()`` takes at LR 1.

    With ``g' = g + wd * w``: ``d = g'`` without momentum; with momentum ``mu`` the next
    momentum buffer is ``b = mu * buf + g'`` (``g'`` on the first step) and ``d = b``, or
    ``d = g' + mu * b`` with Nesterov, exactly as ``torch.optim.SGD`` computes it (dampening 0).

    Args:
        model: the model (possibly DDP-wrapped).
        optimizer: its SGD optimiser, or None for a plain gradient step (``d = g``).
        grads: ``name -> g`` to use instead of the parameters' ``.grad`` (then only these
            names are returned, and ``g`` keeps its graph: ``w`` and ``buf`` enter as
            constants). Default: every parameter's ``.grad`` (call after ``backward()``).

    Returns:
        ``name -> (same shape as the parameter)``.

    Raises:
        ValueError: the optimiser uses dampening (not supported here).
    """
    mu = wd = 0.0
    nesterov = False
    if optimizer is not None:
        group = optimizer.param_groups[0]
        if group.get("dampening", 0):
            raise ValueError("the look-ahead supports SGD without dampening")
        mu, wd, nesterov = group["momentum"], group["weight_decay"], group.get("nesterov", False)
    out = {}
    for name, p in unwrap(model).named_parameters():
        if grads is None:
            d = p.grad.detach()
        elif name in grads:
            d = grads[name]
        else:
            continue
        if wd:
            d = d + wd * p.detach()
        if mu:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            b = d if buf is None else mu * buf + d
            d = d + mu * b if nesterov else b
        out[name] = d
    return out


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


def averaged_gradients(
    loss: torch.Tensor,
    params: Params,
    average: Average = identity_average,
    second_order: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The worker-averaged gradient ``G = mean_r dL_r/dw`` of this worker's ``loss``.

    Args:
        loss: ``()`` this worker's training loss.
        params: ``name -> parameter`` the loss was computed with (:func:`trainable_params`).
        average: mean across workers (identity for one worker); one flattened all-reduce,
            differentiable through :func:`worker_mean`.
        second_order: names whose gradient keeps its graph (``create_graph=True``), so that
            ``G[name]`` is differentiable w.r.t. whatever ``loss`` depends on besides ``w``;
            default all. The others are constants. The graph of ``loss`` is retained.

    Returns:
        ``name -> (same shape as the parameter)`` for every name of ``params`` (zeros where
        the loss does not depend on the parameter).
    """
    names = list(params)
    keep = set(names if second_order is None else second_order)
    tracked = [n for n in names if n in keep]
    rest = [n for n in names if n not in keep]
    grads: dict[str, torch.Tensor | None] = {}
    for group, create in ((tracked, True), (rest, False)):
        if group:
            gs = torch.autograd.grad(
                loss,
                [params[n] for n in group],
                create_graph=create,
                retain_graph=True,
                allow_unused=True,
            )
            grads.update(zip(group, gs, strict=True))
    parts = [
        (torch.zeros_like(params[n]) if grads[n] is None else grads[n]).reshape(-1) for n in names
    ]
    flat = worker_mean(torch.cat(parts), average)
    views = _unflatten(flat, [params[n] for n in names])
    # One all-reduce for every name, but only the tracked names keep the graph: a constant
    # entry left attached would make a later meta backward run the full backward of every
    # forward that uses it (weight gradients of the virtual backbone) for a zero contribution.
    return {n: v if n in keep else v.detach() for n, v in zip(names, views, strict=True)}


def _unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat ``(sum numel,)`` tensor into views shaped like ``like``."""
    chunks = flat.split([p.numel() for p in like])
    return [chunk.view_as(p) for chunk, p in zip(chunks, like, strict=True)]


def second_order_direction(
    loss: torch.Tensor,
    model: nn.Module,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.SGD | None,
    average: Average = identity_average,
) -> dict[str, torch.Tensor]:
    """The global direction ``D = mean_r (dL_r/dw) + mu * buf + wd * w`` of the coming SGD
    step, differentiable w.r.t. whatever ``loss`` depends on besides ``w``
    (:func:`averaged_gradients` then :func:`sgd_direction`).

    Args:
        loss: ``()`` this worker's training loss, a function of ``params`` and the
            meta-parameters.
        model: the classifier (possibly DDP-wrapped), for the optimiser's constant part.
        params: ``name -> parameter`` the loss was computed with (:func:`trainable_params`).
        optimizer: the classifier's SGD optimiser (momentum buffers, weight decay) or None.
        average: mean across workers (identity for one worker).

    Returns:
        ``name -> (same shape as the parameter)`` tensors carrying the second-order graph.
    """
    return sgd_direction(model, optimizer, averaged_gradients(loss, params, average))


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
    and take one ``optimizer`` step (``None`` grads count as zeros)."""
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    flat = average(torch.cat([g.reshape(-1) for g in grads]))
    for p, g in zip(params, _unflatten(flat, params), strict=True):
        p.grad = g.clone()
    optimizer.step()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
