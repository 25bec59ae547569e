"""The run spec: what one training run is, typed, JSON-serialisable, one class per kind.

A run spec is built in the driver from a pipeline's config (:func:`method_run`,
:func:`meta_train_run`, :func:`longtail_run`), logged as MLflow params
(``spec.model_dump(mode="json")``), sent to Ray Train workers and Tune trials, and assembled
there by :func:`raymeta.train.build.build_run`. Its kinds (the ``kind`` field discriminates):

- :class:`HandRun` (``hand``): a hand-designed schedule family (:mod:`raymeta.schedules.hand`);
- :class:`LearnedRun` (``learned``): a frozen registered MLR-SNet (MLR-SNet (Test), transfer);
- :class:`MetaTrainRun` (``meta_train``): MLR-SNet meta-trained on the task itself, whose LR
  schedule it is (meta-training, and MLR-SNet (Train) of a comparison);
- :class:`MultiTaskMetaTrainRun` (``multitask_meta_train``): one MLR-SNet meta-trained on
  several tasks at once, one group of workers per task;
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


class MultiTaskMetaTrainRun(Strict):
    """Meta-train one MLR-SNet on several ``tasks`` at once with the outer loop ``meta``: one
    group of Ray Train workers per task, the meta-learner's gradient averaged over all of them
    (:mod:`raymeta.train.multitask`, docs/mlrsnet.md section 3).

    ``epoch_steps``: optimisation steps in one epoch of each task with its group of workers
    (counted in the driver from the data, :func:`raymeta.train.loop.check_task`). Meta-training
    lasts :attr:`total_steps`, the longest task's steps; its epochs (:attr:`epochs` of
    :attr:`clock_steps` steps each) are that task's: metrics are reported, checkpoints taken
    and the meta-learner saved (``saved_epochs``, 1-based) at their ends. A task that finishes
    earlier restarts from a fresh initialisation with a new seed.
    """

    kind: Literal["multitask_meta_train"] = "multitask_meta_train"
    label: str
    tasks: list[TaskConfig] = Field(min_length=2)
    meta: OuterLoopConfig
    epoch_steps: list[PositiveInt]
    saved_epochs: list[PositiveInt] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self):
        if len(self.epoch_steps) != len(self.tasks):
            raise ValueError(
                f"epoch_steps has {len(self.epoch_steps)} entries for {len(self.tasks)} tasks"
            )
        late = [e for e in self.saved_epochs if e > self.epochs]
        if late:
            raise ValueError(
                f"checkpoint_epochs {late} exceed the {self.epochs} epochs of meta-training "
                f"(those of task {self.clock}, the longest in optimisation steps)"
            )
        return self

    @property
    def task_steps(self) -> list[int]:
        """Optimisation steps of one full run of each task."""
        return [t.epochs * n for t, n in zip(self.tasks, self.epoch_steps, strict=True)]

    @property
    def total_steps(self) -> int:
        """Optimisation steps of meta-training: the longest task's."""
        return max(self.task_steps)

    @property
    def clock(self) -> int:
        """The task whose epochs are meta-training's (the first of the longest)."""
        return self.task_steps.index(self.total_steps)

    @property
    def epochs(self) -> int:
        """Epochs of meta-training (the clock task's)."""
        return self.tasks[self.clock].epochs

    @property
    def clock_steps(self) -> int:
        """Optimisation steps of one meta-training epoch."""
        return self.epoch_steps[self.clock]

    def task_run(self, index: int) -> MetaTrainRun:
        """The meta-training run of task ``index`` alone (what its worker group assembles)."""
        return MetaTrainRun(
            label=f"{self.label}/task{index}", task=self.tasks[index], meta=self.meta
        )


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


RunSpec = Annotated[
    HandRun | LearnedRun | MetaTrainRun | MultiTaskMetaTrainRun | LongTailRun,
    Field(discriminator="kind"),
]
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


def multitask_meta_train_run(
    meta: OuterLoopConfig,
    tasks: Sequence[TaskConfig],
    label: str,
    epoch_steps: Sequence[int],
    checkpoint_epochs: Sequence[int] | None = None,
) -> MultiTaskMetaTrainRun:
    """The multi-task meta-training run of ``tasks`` (``epoch_steps``: steps per epoch of each
    task with its group of workers); the meta-learner is saved after ``checkpoint_epochs``
    (default: the first, middle and last epoch of meta-training).

    Raises:
        ConfigError: a checkpoint epoch past the end of meta-training (one line).
    """
    data = {
        "label": label,
        "tasks": list(tasks),
        "meta": meta.outer_loop(),
        "epoch_steps": list(epoch_steps),
    }
    if not checkpoint_epochs:
        e = parse_run({"kind": "multitask_meta_train", **data}, "meta_train").epochs
        checkpoint_epochs = [1, (e + 1) // 2, e]
    saved = sorted(set(checkpoint_epochs))
    return parse_run({"kind": "multitask_meta_train", **data, "saved_epochs": saved}, "meta_train")


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
