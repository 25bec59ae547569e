"""The dead-run guard: stop a run that makes no progress instead of training on at chance.

A run is dead when its training loss (the worker-averaged batch loss of each optimisation step)

- is NaN or infinite;
- averaged over the last ``window`` steps, grows past ``max_loss_ratio`` times the initial
  loss ``L0`` (the first step's batch loss, taken before any update); or
- averaged over the last ``window`` steps, is not at least ``min_progress * L0`` below ``L0``
  after ``patience_steps`` steps (default: one epoch).

Every check uses worker-averaged losses, so all data-parallel workers stop at the same step.
The error is one line naming the step, the loss, the LR in use and what to change. The guard
is plain Python (no Ray); the loop calls :meth:`ProgressGuard.check` once per step.
"""

from __future__ import annotations

import math
from collections import deque

from raymeta.errors import DeadRunError, NonFiniteLossError
from raymeta.schedules.base import Schedule


class ProgressGuard:
    """Per-step dead-run checks (see the module docstring).

    Args:
        patience_steps: optimisation steps (global count) after which the loss must be below
            ``L0 * (1 - min_progress)``.
        min_progress: required relative decrease of the windowed loss at ``patience_steps``.
        max_loss_ratio: the windowed loss may never exceed ``max_loss_ratio * L0``.
        window: steps averaged for both checks (fewer at the start of a run).
        initial_loss: ``L0`` when resuming a run (None: taken from the first checked step).
        enabled: False makes :meth:`check` test only for non-finite losses.
        step_settings: the settings that size the run's steps, named in the errors ("lower
            ..."; the schedule's :attr:`~raymeta.schedules.base.Schedule.step_settings`:
            meta-training has no learning rate to lower).
    """

    def __init__(
        self,
        patience_steps: int,
        *,
        min_progress: float = 0.01,
        max_loss_ratio: float = 3.0,
        window: int = 20,
        initial_loss: float | None = None,
        enabled: bool = True,
        step_settings: str = Schedule.step_settings,
    ):
        self.patience_steps, self.min_progress = patience_steps, min_progress
        self.step_settings = step_settings
        self.max_loss_ratio, self.enabled = max_loss_ratio, enabled
        self.initial_loss = initial_loss
        self.recent: deque[float] = deque(maxlen=min(window, patience_steps))

    def check(self, step: int, loss: float, lr: float) -> None:
        """Record step ``step``'s (0-based, global) worker-averaged batch loss, taken at LR
        ``lr``, and raise if the run is dead.

        Raises:
            NonFiniteLossError: ``loss`` is NaN or infinite.
            DeadRunError: the windowed loss grew past ``max_loss_ratio * L0``, or is not below
                ``L0 * (1 - min_progress)`` at step ``patience_steps``.
        """
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss} at step {step + 1} (LR {lr:.4g}): training diverged; "
                f"lower {self.step_settings}, or check the data"
            )
        if not self.enabled:
            return
        if self.initial_loss is None:
            self.initial_loss = loss
        self.recent.append(loss)
        mean = sum(self.recent) / len(self.recent)
        l0 = self.initial_loss
        if mean > self.max_loss_ratio * l0:
            raise DeadRunError(
                f"training loss grew to {mean:.4g} (mean of the last {len(self.recent)} steps) "
                f"at step {step + 1}, past {self.max_loss_ratio:g} x its initial value "
                f"{l0:.4g} (LR {lr:.4g}): training diverged; lower {self.step_settings} (or "
                "raise guard.max_loss_ratio)"
            )
        if step + 1 == self.patience_steps and mean > l0 * (1 - self.min_progress):
            raise DeadRunError(
                f"no progress: training loss {mean:.4g} (mean of the last {len(self.recent)} "
                f"steps) after {step + 1} steps is not below its initial value {l0:.4g} "
                f"(LR {lr:.4g}); change {self.step_settings}, or raise guard.patience_steps"
            )
