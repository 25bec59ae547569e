"""Learning-rate schedules behind one interface: ``Schedule.lr(step, epoch, loss)``.

Hand-designed families wrap ``torch.optim.lr_scheduler`` (:mod:`raymeta.schedules.hand`); the
learned MLR-SNet schedule (:mod:`raymeta.schedules.mlrsnet`) maps the current training loss to
the learning rate with a frozen meta-learner.

The MLR-SNet names are imported on first use (they import torch): the config reads the family
names and :mod:`raymeta.schedules.mlrsnet_settings` from this package without torch.
"""

from raymeta.schedules.base import Schedule
from raymeta.schedules.hand import FAMILIES, HandSchedule

__all__ = [
    "FAMILIES",
    "HandSchedule",
    "MLRSNet",
    "MLRSNetBundle",
    "MLRSNetSchedule",
    "Schedule",
    "gamma_scale",
]


def __getattr__(name: str):
    """The MLR-SNet names, from :mod:`raymeta.schedules.mlrsnet` on first use."""
    if name in ("MLRSNet", "MLRSNetBundle", "MLRSNetSchedule", "gamma_scale"):
        from raymeta.schedules import mlrsnet

        return getattr(mlrsnet, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
