"""The one-step look-ahead shared by MLR-SNet and MFM (design.md section 5).

Both methods need the gradient of a meta loss through one virtual SGD step
``w' = w - lr * d``: the meta loss is the loss of the virtually updated model on a batch of the
meta set. It is written once here, functionally, with ``torch.func.functional_call`` over a
dict of parameters; buffers are cloned for every virtual pass so BatchNorm running statistics
are never touched (the batch statistics are still used, as in a training-mode forward).

What carries the meta-gradient depends on the method:

- MLR-SNet: ``lr`` comes from the meta-learner, ``d`` is a constant (no second-order terms).
- MFM: ``d`` is the gradient of the training loss computed with ``create_graph=True`` as a
  function of the modulation parameters (second order through ``d``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Params = Mapping[str, torch.Tensor]


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying module of a ``DistributedDataParallel`` (or similar) wrapper."""
    return getattr(model, "module", model)


def functional_loss(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of ``model`` evaluated with ``params`` on ``(x, y)``; BN buffers untouched.

    Args:
        model: the module (its own parameters are ignored where ``params`` has a name).
        params: name -> tensor for every parameter of ``model``.
        x: ``(B, ...)`` inputs; y: ``(B,)`` int64 labels.

    Returns:
        ``()`` mean loss.
    """
    model = unwrap(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    logits = functional_call(model, {**buffers, **params}, (x,))
    return F.cross_entropy(logits, y)


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


def sgd_direction(model: nn.Module, optimizer: torch.optim.SGD) -> dict[str, torch.Tensor]:
    """The direction ``d`` of the SGD step that ``optimizer.step()`` is about to take at LR 1.

    ``d = g + wd * w`` without momentum; with momentum ``mu`` it is the next momentum buffer
    ``mu * buf + g + wd * w`` (``g`` itself on the first step), exactly as
    ``torch.optim.SGD`` computes it (dampening 0, no Nesterov). Call after ``backward()``.

    Raises:
        ValueError: the optimiser uses dampening or Nesterov momentum (not supported here).
    """
    group = optimizer.param_groups[0]
    if group.get("dampening", 0) or group.get("nesterov", False):
        raise ValueError("the look-ahead supports SGD without dampening and without Nesterov")
    mu, wd = group["momentum"], group["weight_decay"]
    out = {}
    for name, p in unwrap(model).named_parameters():
        d = p.grad.detach()
        if wd:
            d = d + wd * p.detach()
        buf = optimizer.state.get(p, {}).get("momentum_buffer") if mu else None
        if buf is not None:
            d = mu * buf + d
        out[name] = d
    return out
