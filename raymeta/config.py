"""Validated configs (pydantic) for tasks, methods, meta-training, transfer and pipelines.

Every model forbids unknown keys; :func:`load_pipeline` turns any validation failure into a
one-line :class:`~raymeta.errors.ConfigError` naming the key, e.g.
``pipelines/x.yaml: meta_train.task.epochs: Input should be greater than 0 (got -1)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raymeta.errors import ConfigError

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(Strict):
    """One supervised training task: data, model and the inner-loop optimiser.

    ``batch_size`` is the global batch per optimisation step, split evenly across the
    data-parallel workers. ``epochs`` counts passes over the training split.
    """

    dataset: Literal["fashion_mnist", "digits", "cifar10", "cifar100"] = "fashion_mnist"
    model: str = "small_cnn"
    batch_size: PositiveInt = 128
    epochs: PositiveInt = 3
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    weight_decay: NonNegFloat = 5e-4
    val_size: NonNegInt = 5000
    meta_per_class: NonNegInt = 100
    train_subset: PositiveInt | None = None
    seed: int = 0


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

    @model_validator(mode="after")
    def _check(self):
        from raymeta.schedules.hand import FAMILIES

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


class MetaTrainConfig(Strict):
    """MLR-SNet meta-training (paper Sec. 4.1) on one task.

    ``t_val``: a look-ahead meta step every ``t_val`` optimisation steps, counted globally across
    epochs. ``checkpoint_epochs``: 1-based epochs at which the meta-learner is saved (default:
    first, middle, last), used by the three-phase meta-test protocol.
    """

    task: TaskConfig = TaskConfig()
    t_val: PositiveInt = 1
    meta_lr: PositiveFloat = 1e-3
    meta_weight_decay: NonNegFloat = 1e-4
    meta_batch_size: PositiveInt = 100
    hidden_size: PositiveInt = 50
    mlp_hidden: PositiveInt = 25
    checkpoint_epochs: list[PositiveInt] | None = None
    registered_model: str = "mlrsnet"
    alias: str = "champion"

    @model_validator(mode="after")
    def _check(self):
        if self.task.meta_per_class == 0:
            raise ValueError("task.meta_per_class must be > 0 for meta-training")
        late = [e for e in self.checkpoint_epochs or [] if e > self.task.epochs]
        if late:
            raise ValueError(f"checkpoint_epochs {late} exceed task.epochs={self.task.epochs}")
        return self

    @property
    def saved_epochs(self) -> list[int]:
        e = self.task.epochs
        return sorted(set(self.checkpoint_epochs or [1, (e + 1) // 2, e]))


class TransferConfig(Strict):
    """Train one task with each method (a frozen meta-learner and hand-designed baselines)."""

    task: TaskConfig = TaskConfig(model="mlp", batch_size=64, meta_per_class=0)
    methods: list[MethodConfig] = Field(min_length=1)


class RayConfig(Strict):
    """Where Ray runs: ``address`` None starts a local Ray with ``num_cpus``."""

    address: str | None = None
    num_cpus: PositiveInt | None = None
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    max_failures: NonNegInt = 1


class MlflowConfig(Strict):
    """Tracking: None means ``$MLFLOW_TRACKING_URI`` or a local SQLite store in the cwd."""

    tracking_uri: str | None = None
    experiment: str = "raymeta"


class PipelineConfig(Strict):
    """A declarative workflow: optional meta-training, then optional transfer."""

    name: str
    output_dir: str = "outputs"
    ray: RayConfig = RayConfig()
    mlflow: MlflowConfig = MlflowConfig()
    meta_train: MetaTrainConfig | None = None
    meta_train_workers: PositiveInt | None = None
    transfer: TransferConfig | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.meta_train is None and self.transfer is None:
            raise ValueError("a pipeline needs meta_train, transfer or both")
        return self


def format_validation_error(exc: ValidationError, where: str = "") -> str:
    """The first error of a pydantic ``ValidationError`` as ``where: dotted.key: message (got X)``."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    msg = err["msg"].removeprefix("Value error, ")
    got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err.get('input')!r})"
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    if err["type"] == "value_error" or isinstance(err.get("input"), dict):
        got = ""
    return f"{where + ': ' if where else ''}{key}: {msg}{got}"


def parse(model: type[BaseModel], data: Any, where: str = "") -> Any:
    """Validate ``data`` as ``model``; raise a one-line :class:`ConfigError` on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file; one-line :class:`ConfigError` if missing or malformed."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{path}:{line} is not valid YAML ({getattr(exc, 'problem', exc)})"
        ) from None


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Load and validate a pipeline YAML file (see ``pipelines/quickstart.yaml``)."""
    return parse(PipelineConfig, load_yaml(path), str(path))
