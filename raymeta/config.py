"""Validated configs (pydantic) for tasks, methods, meta-training, transfer and pipelines.

Every model forbids unknown keys; :func:`load_pipeline` turns any validation failure into a
one-line :class:`~raymeta.errors.ConfigError` naming the key, e.g.
``x.yaml: meta_train.task.epochs: Input should be greater than 0 (got -1)``.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from raymeta.errors import ConfigError
from raymeta.schedules.mlrsnet_settings import HIDDEN_SIZE, MLP_HIDDEN, check_meta_objective

# Integers are strict (YAML's ``true`` is not 1, ``2.5`` is not 2); floats refuse NaN and
# infinity everywhere (``allow_inf_nan=False`` on :class:`Strict`).
Int = Annotated[int, Field(strict=True)]
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
NonNegInt = Annotated[int, Field(ge=0, strict=True)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


def check_registered_model_name(name: str) -> str:
    """Refuse a registered-model name that MLflow would refuse only after training: empty, with
    ``/`` or ``:`` (MLflow's rules), or ``@`` (raymeta's ``models:/NAME@ALIAS``), starting
    with ``.`` or changed by a path normalisation, or with surrounding spaces.

    Raises:
        ValueError: one line naming the value and what is accepted (a config error).
    """
    import posixpath

    bad = [c for c in "/:@" if c in name]
    norm = posixpath.normpath(name)
    if not name.strip() or bad or name != name.strip() or norm != name or norm.startswith("."):
        why = f"contains {' and '.join(map(repr, bad))}" if bad else "is empty or not a plain name"
        raise ValueError(
            f"registered model name {name!r} {why}; accepted: a non-empty name without "
            "'/', ':' or '@' (e.g. mlrsnet-fashion)"
        )
    return name


ALIAS_CHARACTERS = re.compile(r"^[\w-]{1,255}$")  # MLflow's alias rule (and its length limit)


def check_alias(alias: str) -> str:
    """Refuse a registry alias that MLflow would refuse when setting it, after training: empty,
    other characters than letters, digits, ``_`` and ``-``, longer than 255, or reserved
    (``latest``, and ``v<N>``, which names version N), case-insensitive as in MLflow.

    Raises:
        ValueError: one line naming the value and what is accepted (a config error).
    """
    reserved = alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias)
    if reserved or not ALIAS_CHARACTERS.match(alias):
        why = "is reserved by MLflow" if reserved else "is not a valid MLflow alias"
        raise ValueError(
            f"alias {alias[:60]!r} {why}; accepted: 1-255 letters, digits, '_' or '-', other than "
            "'latest' and v<N> (e.g. champion)"
        )
    return alias


RegisteredModelName = Annotated[str, AfterValidator(check_registered_model_name)]
Alias = Annotated[str, AfterValidator(check_alias)]


META_BATCH_SIZE = 100  # meta-set images per meta step (MLR-SNet's and Meta-Weight-Net's protocols)


class Strict(BaseModel):
    """A config section: unknown keys are refused (with the closest accepted name, if one is
    close), values are immutable, and a field with an old name
    (``validation_alias=AliasChoices(new, old)``) accepts either name, not both."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True
    )

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """Refuse a key that names no field (error type ``unknown_key``, the key in its
        context), adding the closest accepted name (:func:`difflib.get_close_matches`), e.g.
        ``meta_bach_size: unknown key; did you mean meta_batch_size?``."""
        if isinstance(data, dict):
            accepted = []
            for name, info in cls.model_fields.items():
                aliases = info.validation_alias
                accepted += aliases.choices if isinstance(aliases, AliasChoices) else [name]
            for key in data:
                if key not in accepted:
                    close = difflib.get_close_matches(str(key), map(str, accepted), n=1)
                    hint = f"; did you mean {close[0]}?" if close else ""
                    raise PydanticCustomError(
                        "unknown_key", "unknown key{hint}", {"key": key, "hint": hint}
                    )
        return data

    @model_validator(mode="before")
    @classmethod
    def _one_name_per_field(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, info in cls.model_fields.items():
                if isinstance(info.validation_alias, AliasChoices):
                    given = [a for a in info.validation_alias.choices if a in data]
                    if len(given) > 1:
                        raise ValueError(
                            f"{' and '.join(map(str, given))} name the same setting ({name}); "
                            "accepted: one of them"
                        )
        return data


class Section(Strict):
    """A pipeline section: what it loads from the model registry and what it registers, so
    that a command checks every input it does not produce itself before Ray starts."""

    def loads(self) -> dict[str, str]:
        """Registry URIs this section loads -> the kind of meta-learner each must be
        (``mlrsnet`` or ``modulator``, as :func:`raymeta.tracking.load_meta_learner`)."""
        return {}

    @property
    def registers(self) -> str | None:
        """The registered model name this section creates a version of, if any."""
        return None


def longtail_methods() -> dict[str, tuple[str, bool]]:
    """Long-tail method name -> (default label, whether it needs a meta set), read from the
    method registry of the lower floor (:data:`raymeta.meta.methods.METHODS`; imported on
    first use: it imports torch)."""
    from raymeta.meta.methods import METHODS

    return {name: (info.label, info.needs_meta_set) for name, info in METHODS.items()}


class LabelNoiseConfig(Strict):
    """Corruption of the training labels (:mod:`raymeta.data.noise`); the meta, validation and
    test splits stay clean. ``seed`` None means the task's seed."""

    type: Literal["uniform", "pair"]
    rate: Annotated[float, Field(ge=0, lt=1)]
    seed: Int | None = None


class GuardConfig(Strict):
    """The dead-run guard (:class:`raymeta.train.guard.ProgressGuard`): a run stops with a
    one-line error when its training loss is NaN or infinite, when the mean loss of its last
    ``window`` steps exceeds ``max_loss_ratio`` times the initial loss L0 (the first step's
    batch loss, before any update), or when, after ``patience_steps`` optimisation steps
    (default: one epoch, at least ``window`` steps), that mean is not at least ``min_progress``
    (a fraction) below L0.
    ``enabled: false`` switches it off."""

    enabled: bool = True
    patience_steps: PositiveInt | None = None
    min_progress: Annotated[float, Field(ge=0, lt=1)] = 0.01
    max_loss_ratio: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 3.0
    window: PositiveInt = 20


def _check_nesterov(task) -> None:
    if task.nesterov and task.momentum == 0:
        raise ValueError("nesterov needs momentum > 0 (got momentum 0)")


class TaskConfig(Strict):
    """One supervised training task: data, model and the inner-loop optimiser.

    ``batch_size`` is the global batch per optimisation step, split evenly across the
    data-parallel workers. ``epochs`` counts passes over the training split. ``optimizer``:
    ``sgd`` (``momentum``, ``nesterov``, ``weight_decay``), ``adam`` (``betas``; ``weight_decay`` as L2), or
    ``sgd_hd``: SGD whose LR is adapted online by hypergradient descent (Baydin et al., ICLR
    2018) with step ``hypergradient_lr``, starting from the schedule's LR.
    """

    dataset: Literal["fashion_mnist", "digits", "cifar10", "cifar100", "tinyshakespeare"] = (
        "fashion_mnist"
    )
    model: str = "small_cnn"
    batch_size: PositiveInt = 128
    epochs: PositiveInt = 3
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    nesterov: bool = False
    weight_decay: NonNegFloat = 5e-4
    val_size: NonNegInt = 5000
    meta_per_class: NonNegInt = 100
    train_subset: PositiveInt | None = None
    seed: Int = 0
    optimizer: Literal["sgd", "adam", "sgd_hd"] = "sgd"
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9,
        0.999,
    )
    hypergradient_lr: PositiveFloat = 1e-4
    label_noise: LabelNoiseConfig | None = None
    seq_len: PositiveInt = 100
    guard: GuardConfig = GuardConfig()

    @model_validator(mode="after")
    def _check_modality(self):
        _check_nesterov(self)
        text = self.dataset == "tinyshakespeare"
        if text != (self.model == "char_lstm"):
            raise ValueError("dataset tinyshakespeare goes with model char_lstm (and only it)")
        if text and self.label_noise is not None:
            raise ValueError("label_noise applies to image classification, not to text")
        return self


class MethodConfig(Strict):
    """An LR schedule to train a task with.

    ``schedule`` is a hand-designed family (``fixed``, ``multistep``, ``exponential``, ``cosine``,
    ``sgdr``, ``onecycle``, ``warmup_cosine``; with ``lr`` and family ``params``) or ``mlrsnet``
    (a frozen registered meta-learner at ``model_uri``, e.g. ``models:/mlrsnet@champion``;
    optional fixed ``gamma``).
    """

    name: str | None = None
    schedule: str
    lr: PositiveFloat | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    model_uri: str | None = None
    gamma: PositiveFloat | None = None
    optimizer: dict[str, Any] = Field(default_factory=dict)

    def apply_optimizer(self, task: TaskConfig) -> TaskConfig:
        """``task`` with this method's optimiser overrides (e.g. Adam, momentum)."""
        return parse(TaskConfig, {**task.model_dump(), **self.optimizer}, f"method {self.label}")

    @model_validator(mode="after")
    def _check(self):
        from raymeta.schedules import FAMILIES

        allowed = {"optimizer", "betas", "hypergradient_lr", "momentum", "nesterov", "weight_decay"}
        if set(self.optimizer) - allowed:
            raise ValueError(
                f"optimizer keys {sorted(set(self.optimizer) - allowed)} unknown; accepted: {sorted(allowed)}"
            )

        if self.schedule == "mlrsnet":
            if self.lr is not None or self.params:
                raise ValueError("mlrsnet takes model_uri and gamma, not lr/params")
        elif self.schedule in FAMILIES:
            if self.lr is None:
                raise ValueError(f"schedule {self.schedule!r} needs lr")
            if self.model_uri is not None or self.gamma is not None:
                raise ValueError(
                    f"schedule {self.schedule!r} takes lr and params, not model_uri/gamma"
                )
        else:
            raise ValueError(
                f"unknown schedule {self.schedule!r}; accepted: mlrsnet, {', '.join(FAMILIES)}"
            )
        return self

    @property
    def label(self) -> str:
        return self.name or self.schedule


class OuterLoopConfig(Strict):
    """MLR-SNet's outer loop (paper Sec. 4.1, Algorithm 1) and the meta-learner's size.

    ``meta_every`` (old name ``t_val``, still accepted): a look-ahead meta step every
    ``meta_every`` optimisation steps, counted globally across epochs (paper: 300 on CIFAR,
    about once per epoch). Very frequent meta steps over-fit the greedy one-step objective and
    collapse the LR (short-horizon bias: on Fashion-MNIST, a meta step every step drove the LR
    from 0.37 to 0.02 within a tenth of the run); the default keeps the meta-learner's drift
    slow, as the paper's schedule does. ``meta_objective``: ``lookahead`` (the paper's one
    virtual step) or ``delayed`` (the meta loss at the weights reached after the last
    ``horizon`` steps before each meta step, default ``meta_every``;
    :mod:`raymeta.meta.mlrsnet`). ``meta_batch_size``: global meta batch (summed over
    workers). ``meta_lr``, ``meta_weight_decay``: Adam on the meta-learner (paper: 1e-3,
    1e-4). ``hidden_size``, ``mlp_hidden``: the MLR-SNet cell (default: the paper's,
    :mod:`raymeta.schedules.mlrsnet_settings`).
    """

    meta_every: PositiveInt = Field(20, validation_alias=AliasChoices("meta_every", "t_val"))
    meta_objective: Literal["lookahead", "delayed"] = "lookahead"
    horizon: PositiveInt | None = None
    meta_batch_size: PositiveInt = META_BATCH_SIZE
    meta_lr: PositiveFloat = 1e-3
    meta_weight_decay: NonNegFloat = 1e-4
    hidden_size: PositiveInt = HIDDEN_SIZE
    mlp_hidden: PositiveInt = MLP_HIDDEN

    @model_validator(mode="after")
    def _check_objective(self):
        try:
            check_meta_objective(self.meta_objective, self.horizon)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def outer_loop(self) -> OuterLoopConfig:
        """Only the outer-loop settings (of a section that adds more)."""
        return OuterLoopConfig(**self.model_dump(include=set(OuterLoopConfig.model_fields)))


class MetaTrainConfig(OuterLoopConfig, Section):
    """MLR-SNet meta-training (paper Sec. 4.1) on one task, or on several at once, registered
    as ``registered_model`` with ``alias``.

    The outer loop: :class:`OuterLoopConfig`. ``task``: the task; or ``tasks`` (instead of
    ``task``, at least 2): multi-task meta-training, one group of Ray Train workers per task
    (:mod:`raymeta.train.multitask`): the meta-training workers must be a multiple of the
    number of tasks, its epochs are those of the task with the most optimisation steps, and
    ``meta_batch_size`` is per task.
    ``checkpoint_epochs``: 1-based (meta-training) epochs at which the meta-learner is saved
    (default: first, middle, last), used by the three-phase meta-test protocol.
    """

    task: TaskConfig = TaskConfig()
    tasks: list[TaskConfig] | None = Field(None, min_length=2)
    checkpoint_epochs: list[PositiveInt] | None = None
    registered_model: RegisteredModelName = "mlrsnet"
    alias: Alias = "champion"

    @model_validator(mode="after")
    def _check(self):
        if self.tasks is not None and "task" in self.model_fields_set:
            raise ValueError("task and tasks are exclusive; accepted: one task, or a list of tasks")
        for i, task in enumerate(self.meta_tasks):
            where = "task" if self.tasks is None else f"tasks.{i}"
            if task.meta_per_class == 0:
                raise ValueError(f"{where}.meta_per_class must be > 0 for meta-training")
        longest = max(t.epochs for t in self.meta_tasks)
        late = [e for e in self.checkpoint_epochs or [] if e > longest]
        if late:
            raise ValueError(
                f"checkpoint_epochs {late} exceed the epochs of meta-training ({longest})"
            )
        return self

    @property
    def meta_tasks(self) -> list[TaskConfig]:
        """The tasks meta-trained on: ``tasks``, or ``[task]``."""
        return list(self.tasks) if self.tasks is not None else [self.task]

    @property
    def saved_epochs(self) -> list[int]:
        e = self.task.epochs
        return sorted(set(self.checkpoint_epochs or [1, (e + 1) // 2, e]))

    @property
    def registers(self) -> str:
        return self.registered_model


class TransferConfig(Section):
    """Train one task with each method (a frozen meta-learner and hand-designed baselines)."""

    task: TaskConfig = TaskConfig(model="mlp", batch_size=64, meta_per_class=0)
    methods: list[MethodConfig] = Field(min_length=1)

    def loads(self) -> dict[str, str]:
        return {m.model_uri: "mlrsnet" for m in self.methods if m.model_uri}


ImbalanceFactor = Annotated[float, Field(ge=1, allow_inf_nan=False)]
Profile = Literal["exp", "step"]  # a long-tailed task's class-count profile


class LongTailTaskConfig(Strict):
    """A long-tailed task (:mod:`raymeta.data.longtail`, the Meta-Weight-Net protocol).

    The balanced meta set (``meta_per_class`` images of every class) is taken from the training
    set first; the rest is sub-sampled to the ``profile`` (``exp`` or ``step``) with head/tail
    ratio ``imbalance_factor`` (IF >= 1; 1 = balanced). ``class_order``: ``natural`` (class 0
    is the head) or ``permuted`` (a permutation seeded by ``order_seed``, default ``seed``,
    decides which classes are rare). ``n_max``: head-class size (default: the smallest class
    after the meta and validation sets; smaller values give reduced, faster tasks).
    ``val_per_class``: a balanced validation split of that many images per class, carved from
    the training set after the meta set and before the sub-sampling (disjoint from both; 0 =
    none, the Meta-Weight-Net protocol); every run reports ``val_acc`` on it, and the MFM
    design search selects on it. Evaluation: the dataset's full balanced test set. Optimiser
    defaults follow the Meta-Weight-Net CIFAR-LT protocol (batch 100, SGD momentum 0.9, weight
    decay 5e-4); ``batch_size`` is global.
    """

    dataset: Literal["fashion_mnist", "digits", "cifar10", "cifar100"] = "fashion_mnist"
    model: str = "small_cnn"
    imbalance_factor: ImbalanceFactor = 100.0
    profile: Profile = "exp"
    meta_per_class: NonNegInt = 10
    val_per_class: NonNegInt = 0
    class_order: Literal["natural", "permuted"] = "natural"
    order_seed: Int | None = None
    n_max: PositiveInt | None = None
    batch_size: PositiveInt = 100
    epochs: PositiveInt = 10
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = False
    weight_decay: NonNegFloat = 5e-4
    seed: Int = 0
    guard: GuardConfig = GuardConfig()

    @model_validator(mode="after")
    def _check(self):
        _check_nesterov(self)
        return self


class LongTailMethodConfig(Strict):
    """One long-tailed method trained under the common loop.

    ``method``: ``ce``, ``cb_reweight``, ``cb_resample``, ``focal``, ``ldam_drw``,
    ``logit_adjust``, ``balanced_softmax``, ``mwn``, ``mfm_direct``, ``mfm_network``;
    ``params`` go to :func:`raymeta.meta.methods.build_method` (e.g. ``beta``, ``gamma``,
    ``tau``; for MFM the design choices ``sites``, ``base_loss``, ``base_params``,
    ``meta_objective``, ``meta_every``, ``meta_lr``, ``class_statistics``, and ``lookahead``,
    ``hidden``; docs/mfm.md). The label of an MFM row names its base loss when it is not
    cross-entropy (``MFM (direct) + BS``). ``meta_batch_size``:
    global meta batch of the meta-learned methods. ``model_uri`` (``mfm_network`` only): a
    registered modulator network (``models:/NAME@ALIAS``) applied frozen, with no meta set.
    """

    name: str | None = None
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    meta_batch_size: PositiveInt = META_BATCH_SIZE
    model_uri: str | None = None

    @model_validator(mode="after")
    def _check(self):
        methods = longtail_methods()
        if self.method not in methods:
            raise ValueError(
                f"unknown long-tail method {self.method!r}; accepted: {', '.join(methods)}"
            )
        if self.model_uri is not None and self.method != "mfm_network":
            raise ValueError(
                f"model_uri is for a registered modulator network (method mfm_network), "
                f"not {self.method!r}"
            )
        return self

    @property
    def label(self) -> str:
        from raymeta.meta.methods import method_label

        if self.name:
            return self.name
        label = method_label(self.method, self.params)
        return label.replace("MFM (network)", "MFM (frozen)") if self.model_uri else label

    @property
    def needs_meta(self) -> bool:
        return longtail_methods()[self.method][1] and self.model_uri is None


# Linear warm-up over the first 10 % of the steps, then cosine to 0, for every method: MultiStep
# at 0.1 from the first step left the BN-free small CNN at the prior's entropy (10 % accuracy)
# under logit adjustment and LDAM (docs/mfm.md). raymeta/pipelines/mfm_cifar_lt.yaml sets the
# Meta-Weight-Net protocol's MultiStep explicitly for ResNet-32.
DEFAULT_LONGTAIL_SCHEDULE = {
    "schedule": "warmup_cosine",
    "lr": 0.1,
    "params": {"warmup_fraction": 0.1},
}


def _check_longtail_runs(task: LongTailTaskConfig, methods, schedule: MethodConfig, where: str):
    if schedule.schedule == "mlrsnet":
        raise ValueError(
            f"{where}schedule: long-tailed methods need their LR before the batch loss; "
            "accepted: a hand-designed schedule (e.g. multistep)"
        )
    if task.meta_per_class == 0:
        needy = [m.label for m in methods if m.needs_meta]
        if needy:
            raise ValueError(
                f"{where}task.meta_per_class is 0 but {', '.join(needy)} "
                f"{'needs' if len(needy) == 1 else 'need'} a meta set; "
                "accepted: meta_per_class >= 1"
            )


class LongTailTransferConfig(Strict):
    """Apply a registered modulator network, frozen and with no meta set, to another
    long-tailed task, beside ``baselines`` trained under the same loop and budget.

    ``model_uri``: default the study's ``models:/{registered_model}@{alias}``. ``seeds``:
    default the study's.
    """

    name: str
    task: LongTailTaskConfig
    model_uri: str | None = None
    baselines: list[LongTailMethodConfig] = Field(
        default_factory=lambda: [LongTailMethodConfig(method="ce")]
    )
    seeds: list[int] | None = Field(default=None, min_length=1)


class LongTailStudyConfig(Section):
    """The ``longtail`` section of a pipeline (old name ``mfm``, still accepted), the long-tail
    study: every method on every (profile, imbalance factor, seed) of a
    long-tailed task, the meta-trained modulator network registered in MLflow, then transfer.

    ``profiles``: default ``[task.profile]``. ``imbalance_factors``: default
    ``[task.imbalance_factor]``. ``seeds``: each sets the task's
    ``seed`` (split sampling, class permutation unless ``order_seed`` is fixed, model
    initialisation, batch order). ``num_workers``: Ray Train workers per run (default
    ``ray.num_workers``). ``max_concurrent``: runs in flight at once (default: the cluster's
    CPUs divided by ``num_workers``). The modulator of the ``mfm_network`` run at
    ``register_profile`` / ``register_imbalance_factor`` / ``register_seed`` (default: the
    first of each) is registered as ``registered_model`` with ``alias``.
    """

    task: LongTailTaskConfig = LongTailTaskConfig()
    profiles: list[Profile] | None = Field(default=None, min_length=1)
    imbalance_factors: list[ImbalanceFactor] | None = Field(default=None, min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    schedule: MethodConfig = Field(
        default_factory=lambda: MethodConfig(**DEFAULT_LONGTAIL_SCHEDULE)
    )
    methods: list[LongTailMethodConfig] = Field(default_factory=list)
    num_workers: PositiveInt | None = None
    max_concurrent: PositiveInt | None = None
    registered_model: RegisteredModelName = "mfm-modulator"
    alias: Alias = "champion"
    register_profile: Profile | None = None
    register_imbalance_factor: ImbalanceFactor | None = None
    register_seed: Int | None = None
    transfer: list[LongTailTransferConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self):
        if not self.methods and not self.transfer:
            raise ValueError("the longtail section needs methods, transfer or both")
        _check_longtail_runs(self.task, self.methods, self.schedule, "")
        for i, t in enumerate(self.transfer):
            _check_longtail_runs(t.task, t.baselines, self.schedule, f"transfer.{i}.")
            if t.model_uri is None and self.registered_method is None:
                raise ValueError(
                    f"transfer.{i} ({t.name!r}) has no model_uri and no mfm_network method is "
                    "meta-trained here to register; accepted: model_uri: models:/NAME@ALIAS"
                )
        if self.register_profile is not None and self.register_profile not in self.grid_profiles:
            raise ValueError(
                f"register_profile={self.register_profile!r} is not one of profiles "
                f"{self.grid_profiles}"
            )
        if self.register_imbalance_factor is not None and (
            self.register_imbalance_factor not in self.factors
        ):
            raise ValueError(
                f"register_imbalance_factor={self.register_imbalance_factor:g} is not one of "
                f"imbalance_factors {self.factors}"
            )
        if self.register_seed is not None and self.register_seed not in self.seeds:
            raise ValueError(f"register_seed={self.register_seed} is not one of seeds {self.seeds}")
        return self

    @property
    def grid_profiles(self) -> list[str]:
        """The grid's profiles: ``profiles`` or ``[task.profile]``."""
        return list(self.profiles or [self.task.profile])

    @property
    def factors(self) -> list[float]:
        return list(self.imbalance_factors or [self.task.imbalance_factor])

    @property
    def registered_method(self) -> LongTailMethodConfig | None:
        """The meta-trained ``mfm_network`` method whose modulator is registered."""
        return next(
            (m for m in self.methods if m.method == "mfm_network" and m.model_uri is None), None
        )

    @property
    def model_uri(self) -> str:
        """``models:/{registered_model}@{alias}``: the default modulator of ``transfer``."""
        return f"models:/{self.registered_model}@{self.alias}"

    def loads(self) -> dict[str, str]:
        return {t.model_uri: "modulator" for t in self.transfer if t.model_uri}

    @property
    def registers(self) -> str | None:
        return self.registered_model if self.registered_method is not None else None


class MFMDesignSpace(Strict):
    """The MFM design space that the design search samples (docs/mfm.md, "The design space"):
    each list holds the choices of one design choice, sampled by Optuna as a categorical;
    ``meta_lr`` is sampled log-uniformly in ``[low, high]``.

    ``modulation``: ``direct``, ``network`` or ``network+class_statistics`` (the modulator
    network that also sees the class-frequency statistic). ``sites``: presets of
    :data:`raymeta.models.modulation.SITE_PRESETS`. ``base_loss``: plain losses of
    :data:`raymeta.meta.methods.BASE_LOSSES`. ``meta_objective``: of
    :data:`raymeta.meta.methods.META_OBJECTIVES`. ``meta_every``: meta-step intervals.
    """

    modulation: list[Literal["direct", "network", "network+class_statistics"]] = Field(
        default_factory=lambda: ["direct", "network", "network+class_statistics"], min_length=1
    )
    sites: list[str] = Field(
        default_factory=lambda: ["stages", "last_stage", "embedding", "stages+embedding"],
        min_length=1,
    )
    base_loss: list[str] = Field(
        default_factory=lambda: ["ce", "balanced_softmax", "cb_resample"], min_length=1
    )
    meta_objective: list[str] = Field(default_factory=lambda: ["ce", "logit_adjust"], min_length=1)
    meta_every: list[PositiveInt] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    meta_lr: tuple[PositiveFloat, PositiveFloat] = (1e-4, 1e-2)

    @model_validator(mode="after")
    def _check(self):
        from raymeta.meta.methods import BASE_LOSSES, META_OBJECTIVES
        from raymeta.models.modulation import SITE_PRESETS

        for key, accepted in (
            ("sites", SITE_PRESETS),
            ("base_loss", BASE_LOSSES),
            ("meta_objective", META_OBJECTIVES),
        ):
            bad = [v for v in getattr(self, key) if v not in accepted]
            if bad:
                raise ValueError(f"{key}: unknown {bad}; accepted: {', '.join(accepted)}")
        for key in ("modulation", "sites", "base_loss", "meta_objective", "meta_every"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"{key}: a choice is listed twice ({values})")
        if not self.meta_lr[0] < self.meta_lr[1]:
            raise ValueError(f"meta_lr: empty range {list(self.meta_lr)}; accepted: [low, high]")
        return self


class MFMSearchConfig(Section):
    """The ``mfm_search`` section, the MFM design search (:mod:`raymeta.tune.mfm_search`).

    1. **Trials.** For each variant a default is chosen for (``direct``; ``network``, with or
       without the class-frequency statistic: the ``modulation`` choices of ``space``), Ray
       Tune + Optuna (seeded TPE) sample ``trials_per_variant`` MFM configurations from
       ``space`` and train each once on the development task ``task`` under ``schedule``,
       scored on the balanced validation split (``task.val_per_class`` images per class,
       carved from the training data: required); the test split is never loaded by a trial.
       ``grace_period``: ASHA stops weak trials after that many epochs (None: no early
       stopping). ``max_concurrent`` trials at once, ``cpus_per_trial`` each (also the trial's
       torch threads).
    2. **Confirmation.** The ``confirm_top`` best trials of each variant and the
       ``baselines`` are re-trained ``repeats`` times, the k-th time (k = 0 .. repeats - 1)
       with training seed ``task.seed + k`` and class order ``task.order_seed + k`` (when
       fixed), so a choice rests on several seeds and class orders, not on one run's noise
       (one validation image is 0.1 point of 1,000). The baselines are reported beside the
       candidates (mean and std over the repeats), never used to choose.
    3. **Choice.** Each variant's chosen configuration is its confirmed candidate with the
       highest mean final validation accuracy (with ``confirm_top: 0``: its trial with the
       highest one), logged to MLflow (the parent run ``mfm-search/{name}``) and written to
       ``mfm_design_choice.json``.
    """

    task: LongTailTaskConfig
    space: MFMDesignSpace = Field(default_factory=MFMDesignSpace)  # built on use: imports torch
    trials_per_variant: PositiveInt = 8
    confirm_top: Annotated[int, Field(ge=0, strict=True)] = 0
    repeats: PositiveInt = 1
    baselines: list[LongTailMethodConfig] = Field(default_factory=list)
    schedule: MethodConfig = Field(
        default_factory=lambda: MethodConfig(**DEFAULT_LONGTAIL_SCHEDULE)
    )
    meta_batch_size: PositiveInt = META_BATCH_SIZE
    seed: Int = 0
    max_concurrent: PositiveInt = 2
    cpus_per_trial: PositiveFloat = 1.0
    grace_period: PositiveInt | None = None
    reduction_factor: Annotated[int, Field(ge=2, strict=True)] = 2

    @model_validator(mode="before")
    @classmethod
    def _renamed_trials(cls, data: Any) -> Any:
        if isinstance(data, dict) and "trials" in data:
            raise PydanticCustomError(
                "unknown_key",
                "renamed trials_per_variant (each variant now has its own search; the old "
                "trials was a total over variants)",
                {"key": "trials"},
            )
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.task.val_per_class == 0:
            raise ValueError(
                "task.val_per_class must be > 0: the search selects on a balanced validation "
                "split carved from the training data"
            )
        if self.task.meta_per_class == 0:
            raise ValueError("task.meta_per_class must be > 0: MFM meta-learns on the meta set")
        _check_longtail_runs(self.task, self.baselines, self.schedule, "")
        return self


class SearchConfig(Strict):
    """Ray Tune + Optuna search of the hand-designed families (:mod:`raymeta.tune.spaces`).

    Every family gets the same ``trials_per_family`` budget and the task's epochs per trial;
    ASHA stops weak trials after ``grace_period`` epochs. ``ranges`` overrides the default
    ``[low, high]`` of a family's parameter (or of ``pbt``'s and ``pb2``'s).

    ``momentum``: the SGD momentum values searched, as a categorical choice, beside every SGD
    family's own hyper-parameters (users run SGD with momentum 0.9); ``search_momentum:
    false`` trains every family at the task's momentum instead (``search_momentum: true``, the
    old key's way to search it, now means the choices of ``momentum``). ``search_weight_decay``
    adds a log-uniform weight decay.

    ``online``: population-based online schedule learners run as rows of the comparison
    (:mod:`raymeta.tune.online`): ``pbt`` (Ray Tune's ``PopulationBasedTraining``) and ``pb2``
    (``PB2``), each with a population of ``trials_per_family`` members that train the task's
    epochs; the LR and momentum are exploited and explored every ``perturbation_interval``
    epochs. ``max_concurrent`` does not limit them (the scheduler needs the whole population):
    the trials' resources do.
    """

    families: list[str] = Field(default_factory=lambda: ["fixed", "multistep", "cosine"])
    trials_per_family: PositiveInt = 8
    ranges: dict[str, dict[str, list[float]]] = Field(default_factory=dict)
    momentum: list[Annotated[float, Field(ge=0, lt=1)]] = Field(
        default_factory=lambda: [0.0, 0.9], min_length=1
    )
    search_momentum: bool = True
    search_weight_decay: bool = False
    online: list[Literal["pbt", "pb2"]] = Field(default_factory=list)
    perturbation_interval: PositiveInt = 1
    seed: Int = 0
    max_concurrent: PositiveInt = 2
    cpus_per_trial: PositiveFloat = 1.0
    gpus_per_trial: Annotated[float, Field(ge=0, le=1)] = 0.0
    grace_period: PositiveInt = 1
    reduction_factor: Annotated[int, Field(ge=2)] = 2

    @model_validator(mode="after")
    def _check(self):
        if not self.families and not self.online:
            raise ValueError("families and online are both empty: nothing to search")
        for key in ("families", "momentum", "online"):
            values = getattr(self, key)
            if len(set(values)) < len(values):
                raise ValueError(f"{key} lists a value twice: {values}")
        if not self.search_momentum and "momentum" in self.model_fields_set:
            raise ValueError(
                "search_momentum: false and momentum: [...] contradict each other; give "
                "momentum (the values searched) or search_momentum: false (the task's momentum)"
            )
        return self

    @property
    def momentum_choices(self) -> list[float] | None:
        """The momentum values searched, ascending (PBT shifts along this order); None when
        every run keeps the task's momentum."""
        return sorted(self.momentum) if self.search_momentum else None


class CompareMetaTrainConfig(OuterLoopConfig):
    """MLR-SNet (Train): meta-train on the compared task itself, with ``meta_per_class`` meta
    images per class carved from its training split; the outer loop: :class:`OuterLoopConfig`."""

    meta_per_class: PositiveInt = 100


class CompareConfig(Section):
    """``raymeta compare``: searched hand-designed schedules vs learned ones on ``task``.

    ``task`` must have a validation split (``val_size > 0``) for the search; the final runs
    use train + validation and the test split, ``seeds`` seeds (0..seeds-1) per method.
    ``learned``: MLR-SNet (Test) entries (``schedule: mlrsnet`` with a ``model_uri``). The
    learned rows (MLR-SNet (Test) and (Train)) run at ``task.momentum``: their LR is scaled by
    ``1 - momentum``, so the effective step is the one the meta-learner chose.
    """

    task: TaskConfig = TaskConfig(meta_per_class=0)
    search: SearchConfig = SearchConfig()
    seeds: PositiveInt = 3
    learned: list[MethodConfig] = Field(default_factory=list)
    meta_train: CompareMetaTrainConfig | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.task.val_size == 0:
            raise ValueError(
                "task.val_size must be > 0: the search selects on the validation split"
            )
        if self.task.meta_per_class:
            raise ValueError(
                "task.meta_per_class must be 0 (MLR-SNet (Train) carves its own meta set)"
            )
        choices = self.search.momentum_choices
        if self.task.nesterov and choices and choices[0] == 0:
            raise ValueError(
                "search.momentum includes 0 but task.nesterov is true (Nesterov needs momentum "
                "> 0); drop 0 from search.momentum or set task.nesterov: false"
            )
        for m in self.learned:
            if m.schedule != "mlrsnet" or not m.model_uri:
                raise ValueError(
                    f"learned entry {m.label!r} needs schedule: mlrsnet and a model_uri"
                )
        return self

    def loads(self) -> dict[str, str]:
        return {m.model_uri: "mlrsnet" for m in self.learned}


class SuiteTaskConfig(Strict):
    """One task of a transfer suite: ``name`` (a folder name under the suite's output) and the
    task (with a validation split for the search and no meta set)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    task: TaskConfig


class TransferSuiteConfig(Section):
    """The transfer benchmark a learned schedule must win (``suite``; issue 10 item 7,
    :mod:`raymeta.tune.suite`): on every task, a schedule comparison (:class:`CompareConfig`)
    of the frozen learned schedule ``learned`` (MLR-SNet (Test), no search on the task) with
    the hand-designed families that ``search`` searches (and the online schedule learners it
    names), ``seeds`` final runs each.

    The verdict of a task compares the learned row with the *best searched family*, chosen by
    its search's best validation accuracy (never by test accuracy): "win" when the learned mean
    test accuracy is at least the family's, "within" when it trails by at most ``tolerance``
    (a fraction: 0.003 = 0.3 points), else "loss". The suite's target: a win on at least
    ``wins_needed`` tasks and no loss. The online rows (PBT, PB2) are shown for reference, not
    part of the verdict. ``smoke``: the budgets are shrunk to check the plumbing
    (``benchmarks/transfer_suite.py --smoke`` sets it); the output then says its numbers mean
    nothing.
    """

    learned: MethodConfig
    search: SearchConfig = SearchConfig(families=["multistep", "cosine"], trials_per_family=20)
    seeds: PositiveInt = 3
    tasks: list[SuiteTaskConfig] = Field(min_length=1)
    tolerance: Annotated[float, Field(ge=0, lt=1)] = 0.003
    wins_needed: PositiveInt | None = None
    smoke: bool = False

    @model_validator(mode="after")
    def _check(self):
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for i, t in enumerate(self.tasks):
            try:
                self.compare(t)
            except ValidationError as exc:
                detail = format_validation_error(exc).removeprefix("<root>: ")
                raise ValueError(f"tasks.{i} ({t.name}): {detail}") from None
        if self.wins_needed is not None and self.wins_needed > len(self.tasks):
            raise ValueError(f"wins_needed={self.wins_needed} exceeds the {len(names)} tasks")
        return self

    @property
    def wins_target(self) -> int:
        """Wins needed: ``wins_needed``, default all tasks but one (3 of 4)."""
        return self.wins_needed or max(1, len(self.tasks) - 1)

    def compare(self, task: SuiteTaskConfig) -> CompareConfig:
        """The comparison of one task."""
        return CompareConfig(
            task=task.task, search=self.search, seeds=self.seeds, learned=[self.learned]
        )

    def loads(self) -> dict[str, str]:
        return {self.learned.model_uri: "mlrsnet"}


class TransferStudyResources(Strict):
    """Resources of one transfer-study task (a Tune trial); a task reserving a GPU (or a
    fraction of one) trains on it."""

    cpus_per_task: PositiveFloat = 1.0
    gpus_per_task: Annotated[float, Field(ge=0, le=1)] = 0.0


class TransferStudyConfig(Section):
    """The ``study`` section, a transfer study (:mod:`raymeta.tune.study`): the grid ``axes``
    (TaskConfig fields -> values) x ``methods``, plus ``extra_tasks`` (TaskConfig overrides),
    minus ``exclude`` (dicts of field -> value, ``method`` matching a method's name)."""

    base_task: TaskConfig = TaskConfig(meta_per_class=0)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    extra_tasks: list[dict[str, Any]] = Field(default_factory=list)
    methods: list[MethodConfig] = Field(min_length=1)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    resources: TransferStudyResources = TransferStudyResources()
    max_concurrent: PositiveInt = 2
    results: str | None = None

    @model_validator(mode="after")
    def _check(self):
        empty = [k for k, v in self.axes.items() if not v]
        if empty:
            raise ValueError(f"axes {empty} have no values")
        return self

    def loads(self) -> dict[str, str]:
        return {m.model_uri: "mlrsnet" for m in self.methods if m.model_uri}


class RayConfig(Strict):
    """Where Ray runs: ``address`` None starts a local Ray with ``num_cpus``."""

    address: str | None = None
    num_cpus: PositiveInt | None = None
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    max_failures: NonNegInt = 1


class MlflowConfig(Strict):
    """Tracking: None means ``$MLFLOW_TRACKING_URI`` or a local SQLite store in the cwd.
    ``allow_pickle``: also load registered meta-learners that an older raymeta stored as
    pickles (loading a pickle runs code from the store: only for stores you trust)."""

    tracking_uri: str | None = None
    experiment: str = "raymeta"
    allow_pickle: bool = False


class PipelineConfig(Strict):
    """A declarative workflow (``raymeta run``); its sections run in this order, each optional
    but at least one present:

    - ``meta_train``: meta-train MLR-SNet and register it;
    - ``transfer``: train a task with registered meta-learners and hand-designed schedules;
    - ``longtail`` (old name ``mfm``, still accepted): the long-tail study (MFM, its
      baselines, registration of the modulator network and its transfer);
    - ``mfm_search``: the MFM design search (Ray Tune + Optuna on a development long-tailed
      task, selected on its balanced validation split);
    - ``compare``: a schedule comparison (Ray Tune + Optuna; also ``raymeta compare``);
    - ``study``: a transfer study (a grid of tasks; also ``raymeta study``);
    - ``suite``: the transfer benchmark (a schedule comparison on each of its tasks, with a
      verdict for the learned schedule).

    ``meta_train_workers``: Ray Train workers of meta-training (default ``ray.num_workers``;
    with ``meta_train.tasks``, a multiple of the number of tasks).
    """

    name: str
    output_dir: str = "outputs"
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    meta_train: MetaTrainConfig | None = None
    meta_train_workers: PositiveInt | None = None
    transfer: TransferConfig | None = None
    longtail: LongTailStudyConfig | None = Field(
        None, validation_alias=AliasChoices("longtail", "mfm")
    )
    mfm_search: MFMSearchConfig | None = None
    compare: CompareConfig | None = None
    study: TransferStudyConfig | None = None
    suite: TransferSuiteConfig | None = None

    @model_validator(mode="after")
    def _check(self):
        if all(getattr(self, s) is None for s in SECTIONS):
            raise ValueError(f"a pipeline needs {', '.join(SECTIONS)} or several")
        tasks = len(self.meta_train.meta_tasks) if self.meta_train is not None else 1
        workers = self.meta_train_workers or self.ray.num_workers
        if workers % tasks:
            raise ValueError(
                f"meta_train.tasks has {tasks} tasks but meta-training has {workers} Ray Train "
                f"worker(s) (meta_train_workers, else ray.num_workers); accepted: a multiple of "
                f"{tasks}, one group of workers per task"
            )
        return self


# run order
SECTIONS = ("meta_train", "transfer", "longtail", "mfm_search", "compare", "study", "suite")


def format_validation_error(exc: ValidationError, where: str = "") -> str:
    """The first error of a pydantic ``ValidationError`` as ``where: dotted.key: message (got X)``."""
    err = exc.errors()[0]
    loc = [*err["loc"], err["ctx"]["key"]] if err["type"] == "unknown_key" else err["loc"]
    key = ".".join(str(p) for p in loc) or "<root>"
    msg = err["msg"].removeprefix("Value error, ")
    got = "" if err["type"] in ("missing", "unknown_key") else f" (got {err.get('input')!r})"
    if err["type"] == "value_error" or isinstance(err.get("input"), dict):
        got = ""
    return f"{where + ': ' if where else ''}{key}: {msg}{got}"


def parse(model: type[BaseModel], data: Any, where: str = "") -> Any:
    """Validate ``data`` as ``model``; raise a one-line :class:`ConfigError` on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def _unique_key_loader():
    """A ``yaml.SafeLoader`` that refuses a key repeated in one mapping (PyYAML keeps the last
    value silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file; one-line :class:`ConfigError` if missing, malformed or holding a key
    twice in one mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        return yaml.load(path.read_text(), Loader=_unique_key_loader())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{path}:{line} is not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from None


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Load and validate a pipeline YAML file (see ``raymeta/pipelines/quickstart.yaml``)."""
    return parse(PipelineConfig, load_yaml(path), str(path))
