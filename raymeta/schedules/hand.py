"""Hand-designed LR schedules as thin wrappers over ``torch.optim.lr_scheduler``.

Every family is stepped once per optimisation step (not per epoch), so fractions of the run
(milestones, warm-up) are exact whatever the batch size. Parameters, by family:

============== ==================================================================
``fixed``       ``lr``
``multistep``   ``lr``, ``milestones`` (fractions of the run, default 0.5, 0.75),
                ``decay`` (multiplicative factor at each milestone, default 0.1)
``exponential`` ``lr``, ``decay`` (factor per epoch, default 0.9)
``cosine``      ``lr``, ``final_lr_fraction`` (eta_min / lr, default 0)
``sgdr``        ``lr``, ``first_cycle_epochs`` (T_0, default 1), ``cycle_mult`` (T_mult,
                integer, default 2), ``final_lr_fraction`` (default 0)
                (Loshchilov & Hutter, ICLR 2017)
``onecycle``    ``lr`` (the maximum), ``warmup_fraction`` (pct_start, default 0.3)
                (Smith & Topin 2019)
``warmup_cosine`` ``lr``, ``warmup_fraction`` (default 0.05), ``final_lr_fraction`` (default 0)
============== ==================================================================

A family's builder takes ``torch.optim.lr_scheduler`` as its first argument: this module
imports torch only when a schedule is built, so that the config checks family names (and
``raymeta run`` refuses a bad pipeline file) without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from raymeta.errors import ConfigError
from raymeta.schedules.base import Schedule


def _fixed(sched, opt, total, spe):
    return sched.ConstantLR(opt, factor=1.0, total_iters=0)


def _multistep(sched, opt, total, spe, milestones=(0.5, 0.75), decay=0.1):
    return sched.MultiStepLR(opt, sorted(max(1, round(f * total)) for f in milestones), decay)


def _exponential(sched, opt, total, spe, decay=0.9):
    return sched.ExponentialLR(opt, decay ** (1.0 / spe))


def _cosine(sched, opt, total, spe, final_lr_fraction=0.0):
    lr = opt.param_groups[0]["lr"]
    return sched.CosineAnnealingLR(opt, total, eta_min=lr * final_lr_fraction)


def _sgdr(sched, opt, total, spe, first_cycle_epochs=1.0, cycle_mult=2, final_lr_fraction=0.0):
    lr = opt.param_groups[0]["lr"]
    t0 = max(1, round(first_cycle_epochs * spe))
    return sched.CosineAnnealingWarmRestarts(
        opt, t0, int(cycle_mult), eta_min=lr * final_lr_fraction
    )


def _onecycle(sched, opt, total, spe, warmup_fraction=0.3):
    lr = opt.param_groups[0]["lr"]
    return sched.OneCycleLR(
        opt, lr, total_steps=total + 1, pct_start=warmup_fraction, cycle_momentum=False
    )


def _warmup_cosine(sched, opt, total, spe, warmup_fraction=0.05, final_lr_fraction=0.0):
    lr = opt.param_groups[0]["lr"]
    warm = max(1, round(warmup_fraction * total))
    return sched.SequentialLR(
        opt,
        [
            sched.LinearLR(opt, start_factor=1.0 / warm, total_iters=warm),
            sched.CosineAnnealingLR(opt, max(1, total - warm), eta_min=lr * final_lr_fraction),
        ],
        milestones=[warm],
    )


FAMILIES: dict[str, Callable[..., Any]] = {
    "fixed": _fixed,
    "multistep": _multistep,
    "exponential": _exponential,
    "cosine": _cosine,
    "sgdr": _sgdr,
    "onecycle": _onecycle,
    "warmup_cosine": _warmup_cosine,
}


class HandSchedule(Schedule):
    """A hand-designed schedule: ``lr(step, ...)`` is the LR that the wrapped
    ``torch.optim.lr_scheduler`` gives after ``step`` scheduler steps (one per optimisation step).

    Args:
        family: one of :data:`FAMILIES`.
        lr: initial (``onecycle``: maximum) learning rate, > 0.
        total_steps: optimisation steps in the whole run (epochs x steps per epoch).
        steps_per_epoch: optimisation steps per epoch (converts per-epoch parameters).
        **params: the family's parameters (table in the module docstring).

    Raises:
        ConfigError: unknown family, unknown parameter or an impossible value.
    """

    def __init__(self, family: str, lr: float, total_steps: int, steps_per_epoch: int, **params):
        if family not in FAMILIES:
            raise ConfigError(
                f"unknown schedule family {family!r}; accepted: {', '.join(FAMILIES)}"
            )
        if not lr > 0:
            raise ConfigError(f"schedule {family}: lr must be > 0, got {lr}")
        import torch
        from torch.optim import lr_scheduler

        self.family, self.params = family, dict(params)
        self._opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        try:
            self._sched = FAMILIES[family](
                lr_scheduler, self._opt, total_steps, steps_per_epoch, **params
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"schedule {family} with {params}: {exc}") from None
        self._step = 0

    def lr(self, step: int, epoch: int, loss: float) -> float:
        self.check_loss(loss, step, epoch)
        if step < self._step:
            raise ValueError(f"HandSchedule cannot go back from step {self._step} to {step}")
        while self._step < step:
            self._opt.step()
            self._sched.step()
            self._step += 1
        return float(self._opt.param_groups[0]["lr"])
