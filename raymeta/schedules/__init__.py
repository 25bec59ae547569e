"""Learning-rate schedules behind one interface: ``Schedule.lr(step, epoch, loss)``.

Hand-designed families wrap ``torch.optim.lr_scheduler`` (:mod:`raymeta.schedules.hand`); the
learned MLR-SNet schedule (:mod:`raymeta.schedules.mlrsnet`) maps the current training loss to
the learning rate with a frozen meta-learner.
"""

from raymeta.schedules.base import Schedule
from raymeta.schedules.hand import FAMILIES, HandSchedule
from raymeta.schedules.mlrsnet import MLRSNet, MLRSNetBundle, MLRSNetSchedule, gamma_scale

__all__ = [
    "FAMILIES",
    "HandSchedule",
    "MLRSNet",
    "MLRSNetBundle",
    "MLRSNetSchedule",
    "Schedule",
    "gamma_scale",
]
