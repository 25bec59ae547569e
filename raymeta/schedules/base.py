"""The schedule interface shared by hand-designed and learned schedules."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

from raymeta.errors import NonFiniteLossError


class Schedule(ABC):
    """Turns (global step, epoch, current mini-batch training loss) into a learning rate.

    Steps are optimisation steps counted globally from 0 across epochs; epochs count from 0.
    The loss is the mean cross-entropy of the current mini-batch (averaged over all
    data-parallel workers), a Python float, or None when the step needs its LR before the
    batch loss is known (a long-tailed method's look-ahead): schedules that need the loss
    (:attr:`needs_loss`) refuse None.
    """

    needs_loss = False  # the LR depends on the batch loss (MLR-SNet)
    #: the settings that size this schedule's steps, as the errors of a diverging run name
    #: them ("lower ..."; :mod:`raymeta.train.guard`)
    step_settings = "the learning rate or the momentum"

    def start_epoch(self, epoch: int, mean_train_loss: Callable[[], float]) -> None:  # noqa: B027
        """Called before each epoch; ``mean_train_loss()`` evaluates the mean training loss of
        the current model over the training split (costly: call it only when needed)."""

    def state_dict(self) -> dict:
        """What a resumed run needs beyond the step counter (hand-designed schedules: nothing)."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027
        """Restore :meth:`state_dict`."""

    @abstractmethod
    def lr(self, step: int, epoch: int, loss: float | None) -> float:
        """Learning rate for optimisation step ``step`` (in epoch ``epoch``) given the batch loss.

        Raises:
            NonFiniteLossError: ``loss`` is NaN or infinite.
            ConfigError: ``loss`` is None and the schedule needs it.
        """

    def check_loss(self, loss: float | None, step: int, epoch: int) -> None:
        """Raise a one-line :class:`NonFiniteLossError` if ``loss`` is NaN or infinite (None:
        no loss yet, nothing to check), naming :attr:`step_settings`."""
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss} at step {step} (epoch {epoch + 1}): training diverged; "
                f"lower {self.step_settings}, or check the data"
            )
