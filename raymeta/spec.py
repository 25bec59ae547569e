"""The run spec: what one training run is, typed, JSON-serialisable, one class per kind.

A run spec is built in the driver from a pipeline's config (:func:`method_run`,
:func:`meta_train_run`, :func:`longtail_run`), logged as MLflow params
(``spec.model_dump(mode="json")``), sent to Ray Train workers and Tune trials, and assembled
there by :func:`raymeta.train.build.build_run`. Its kinds (the ``kind`` field discriminates):

- :class:`HandRun` (``hand``): a hand-designed schedule family (:mod:`raymeta.schedules.hand`);
- :class:`LearnedRun` (``learned``): a frozen registered MLR-SNet (MLR-SNet (Test), transfer);
- :class:`MetaTrainRun` (``meta_train``): MLR-SNet meta-trained on the task itself, whose LR
  schedule it is (meta-training, and MLR-SNet (Train) of a comparison);
- :class:`LongTailRun` (``longtail``): a long-tailed method (MFM, Meta-Weight-Net, the loss
  baselines) on a long-tailed task under a hand-designed schedule.

A spec holds names and numbers only. The registered meta-learner a run uses (an MLR-SNet bundle,
a frozen MFM modulator network) is loaded once in the driver (:class:`raymeta.session.Session`)
and travels beside the spec; ``model_uri`` records where it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from raymeta.config import (
    LongTailMethodConfig,
    LongTailTaskConfig,
    MethodConfig,
    OuterLoopConfig,
    PositiveFloat,
    PositiveInt,
    Strict,
    TaskConfig,
    format_validation_error,
)
from raymeta.errors import ConfigError


class ScheduleSpec(Strict):
    """A hand-designed schedule: ``family`` (one of :data:`raymeta.schedules.FAMILIES`), its
    initial LR ``lr`` and the family's ``params`` (fractions of the run, per-epoch factors)."""

    family: str
    lr: PositiveFloat
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        from raymeta.schedules import FAMILIES

        if self.family not in FAMILIES:
            raise ValueError(f"unknown schedule {self.family!r}; accepted: {', '.join(FAMILIES)}")
        return self

    @classmethod
    def of(cls, method: MethodConfig) -> ScheduleSpec:
        """The schedule of a hand-designed :class:`~raymeta.config.MethodConfig`."""
        return cls(family=method.schedule, lr=method.lr, params=method.params)


class HandRun(Strict):
    """Train ``task`` with a hand-designed schedule. ``label``: the run's name (MLflow run
    name and progress prefix)."""

    kind: Literal["hand"] = "hand"
    label: str
    task: TaskConfig
    schedule: ScheduleSpec


class LearnedRun(Strict):
    """Train ``task`` with a frozen registered MLR-SNet (the meta-test protocol, paper Sec.
    4.2): the bundle loaded from ``model_uri`` travels beside the spec. ``gamma``: a fixed LR
    scale instead of the paper's ``gamma`` rule."""

    kind: Literal["learned"] = "learned"
    label: str
    task: TaskConfig
    model_uri: str
    gamma: PositiveFloat | None = None


class MetaTrainRun(Strict):
    """Meta-train MLR-SNet on ``task`` while it schedules that task's LR (paper Sec. 4.1,
    Algorithm 1) with the outer loop ``meta``. ``saved_epochs``: 1-based epochs after which
    the meta-learner's weights are kept (the registered bundle's checkpoints)."""

    kind: Literal["meta_train"] = "meta_train"
    label: str
    task: TaskConfig
    meta: OuterLoopConfig
    saved_epochs: list[PositiveInt] = Field(default_factory=list)


class LongTailRun(Strict):
    """Train a long-tailed ``task`` with a long-tailed ``method`` (``params`` go to the
    method; ``meta_batch_size``: global meta batch of a meta-learned method) under the
    hand-designed ``schedule``. ``model_uri``: the registered modulator network applied frozen
    (``mfm_network`` transfer, no meta set); the modulator travels beside the spec."""

    kind: Literal["longtail"] = "longtail"
    label: str
    task: LongTailTaskConfig
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    meta_batch_size: PositiveInt
    schedule: ScheduleSpec
    model_uri: str | None = None


RunSpec = Annotated[HandRun | LearnedRun | MetaTrainRun | LongTailRun, Field(discriminator="kind")]
_RUN_SPEC: TypeAdapter = TypeAdapter(RunSpec)


def parse_run(data: Any, where: str = "run") -> RunSpec:
    """A run spec from its JSON form (``spec.model_dump(mode="json")``).

    Raises:
        ConfigError: an unknown ``kind`` or a bad value (one line naming it).
    """
    try:
        return _RUN_SPEC.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def method_run(method: MethodConfig, task: TaskConfig, label: str | None = None) -> RunSpec:
    """The run of ``task`` with a schedule entry of ``transfer``, ``compare`` or ``study``
    (the method's optimiser overrides applied to the task): a :class:`LearnedRun` for
    ``schedule: mlrsnet``, else a :class:`HandRun`."""
    task = method.apply_optimizer(task)
    label = label or method.label
    if method.schedule == "mlrsnet":
        return LearnedRun(label=label, task=task, model_uri=method.model_uri, gamma=method.gamma)
    return HandRun(label=label, task=task, schedule=ScheduleSpec.of(method))


def meta_train_run(
    meta: OuterLoopConfig, task: TaskConfig, label: str, saved_epochs: Sequence[int] = ()
) -> MetaTrainRun:
    """The meta-training run of ``task`` with the outer-loop settings of ``meta`` (a
    ``meta_train`` section, or a comparison's ``meta_train`` for MLR-SNet (Train))."""
    return MetaTrainRun(
        label=label, task=task, meta=meta.outer_loop(), saved_epochs=list(saved_epochs)
    )


def longtail_run(
    method: LongTailMethodConfig, task: LongTailTaskConfig, schedule: MethodConfig, label: str
) -> LongTailRun:
    """The run of a long-tail study's ``method`` on ``task`` under the study's ``schedule``."""
    return LongTailRun(
        label=label,
        task=task,
        method=method.method,
        params=method.params,
        meta_batch_size=method.meta_batch_size,
        schedule=ScheduleSpec.of(schedule),
        model_uri=method.model_uri,
    )
