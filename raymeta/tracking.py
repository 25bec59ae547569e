"""MLflow: tracking store, runs, metrics, artifacts and the model registry.

Default store: a SQLite file ``mlflow.db`` plus an artifact folder ``mlartifacts/`` in the
current working directory, resolved to absolute paths in the driver, so that Ray Train workers
and Tune trials (which run in other working directories) write to the same store.
``MLFLOW_TRACKING_URI`` (or an explicit URI, e.g. a tracking server on a cluster) overrides it.

Meta-learners (an MLR-SNet :class:`~raymeta.schedules.MLRSNetBundle`, an MFM
:class:`~raymeta.models.modulation.ModulatorNet`) are logged with ``mlflow.pytorch`` in the
``pickle`` serialization format: a bundle holds several checkpoints and its hyper-parameters as
attributes, and a modulator is applied through forward hooks, neither of which the ``pt2``
(``torch.export``) format can carry. Loading a pickled model
runs code from the store: load only from stores you trust (your own tracking server).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymeta.errors import ConfigError

if TYPE_CHECKING:
    from raymeta.spec import RunSpec


def pip_requirements() -> list[str]:
    """Pins of what a logged meta-learner needs to load, from the installed versions: MLflow's
    own for ``mlflow.pytorch`` (torch, cloudpickle) and ``mlflow``. raymeta is not on a package
    index, so it is not listed: its version is recorded as the ``raymeta_version`` tag."""
    import mlflow

    return [*mlflow.pytorch.get_default_pip_requirements(), f"mlflow=={mlflow.__version__}"]


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use, with any relative SQLite/file path made absolute.

    Order: ``uri``, ``$MLFLOW_TRACKING_URI``, ``sqlite:///<cwd>/mlflow.db``.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def setup(tracking_uri: str | None, experiment: str) -> tuple[str, str]:
    """Point MLflow at the store, create the experiment once (in the driver) and make it active.

    For a local SQLite store the experiment's artifacts go to ``mlartifacts/`` next to the
    database. Returns ``(tracking_uri, experiment_id)``.
    """
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # inherited by Ray workers started from here
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)  # nested runs land here too
    return uri, experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> ``{"a.b.c": value}`` for ``mlflow.log_params``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


PARAM_VALUE_LIMIT = 6000  # characters of an MLflow param value


def as_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested dict (a config section, a run spec's JSON form) as MLflow params:
    :func:`flatten`, values as strings cut to MLflow's limit of 6000 characters."""
    return {k: str(v)[:PARAM_VALUE_LIMIT] for k, v in flatten(d, prefix).items()}


STEP_POINTS = 1000  # per-step curves keep at most about this many points per run and metric

EPOCH_METRIC_NAMES = {
    "lr": "lr_epoch_mean",
    "train_loss": "train_loss_epoch_mean",
    "meta_loss": "meta_loss_epoch_mean",
}
"""The loop's epoch means (:func:`raymeta.train.loop.train`) under their MLflow names: the
plain names ``lr``, ``train_loss`` and ``meta_loss`` are the per-step curves
(:class:`StepCurves`)."""

MetricPoint = tuple[str, float, int]
"""One metric value as logged: ``(key, value, step)``."""


class StepCurves:
    """The per-step curves of one run, subsampled for MLflow: ``lr`` and ``train_loss`` (the
    batch loss averaged across workers) at every ``stride``-th optimisation step, and
    ``meta_loss`` (this worker's) at the first meta step of every ``stride`` steps; step = the
    global optimisation step (0-based, counted across epochs). Pass it as the loop's
    ``on_step`` and :meth:`drain` the points at the end of each epoch.

    Args:
        total_steps: the run's optimisation steps (epochs x steps per epoch).
        points: at most about this many points per curve; ``stride = ceil(total_steps /
            points)``.
    """

    def __init__(self, total_steps: int, points: int = STEP_POINTS):
        self.stride = max(1, math.ceil(total_steps / points))
        self._points: list[MetricPoint] = []
        self._meta_bucket = -1

    def __call__(self, step: int, result) -> None:
        """Record step ``step`` (a :class:`~raymeta.train.rules.StepResult`)."""
        if step % self.stride == 0:
            self._points += [("lr", result.lr, step), ("train_loss", result.loss, step)]
        if result.meta_loss is not None and step // self.stride > self._meta_bucket:
            self._meta_bucket = step // self.stride
            self._points.append(("meta_loss", result.meta_loss, step))

    def drain(self) -> list[MetricPoint]:
        """The points recorded since the last call."""
        points, self._points = self._points, []
        return points


def epoch_points(metrics: dict[str, float]) -> list[MetricPoint]:
    """One epoch's metrics from the loop (step = the 1-based ``metrics["epoch"]``), renamed by
    :data:`EPOCH_METRIC_NAMES`; NaN values (no validation split) are left out."""
    step = int(metrics["epoch"])
    return [
        (EPOCH_METRIC_NAMES.get(k, k), float(v), step)
        for k, v in metrics.items()
        if k != "epoch" and v == v
    ]


def log_points(tracking_uri: str, run_id: str, points: list[MetricPoint]) -> None:
    """Log metric points to a run by id in one ``log_batch`` (MLflow splits it into requests
    of 1000 metrics); NaN values are left out. Used once per epoch by rank 0 of a Ray Train run
    and by the driver for Tune trials, never once per step."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, int(step)) for k, v, step in points if v == v]
    if batch:
        MlflowClient(tracking_uri).log_batch(run_id, metrics=batch)


def run_name(stage: str, method: str, seed: int | str) -> str:
    """A run's name: ``<stage>/<method>/seed<k>``, e.g. ``final/MLR-SNet (Test)/seed0``."""
    return f"{stage}/{method}/seed{seed}"


def run_tags(spec: RunSpec, stage: str, method: str, family: str | None = None) -> dict[str, str]:
    """The flat tags of a training run, with the same names in every stage: ``stage``,
    ``method`` (the label of the results tables), ``family`` (default: the spec's LR schedule
    family; ``mlrsnet`` for a learned or meta-trained MLR-SNet; a comparison passes its search
    family, e.g. ``adam``), ``seed`` and ``task`` (``dataset/model``). Filter with e.g.
    ``tags.method = 'cosine'`` in the MLflow UI."""
    schedule = getattr(spec, "schedule", None)
    task = spec.task
    if family is None:
        family = schedule.family if schedule is not None else "mlrsnet"
    return {
        "stage": stage,
        "method": method,
        "family": family,
        "seed": str(task.seed),
        "task": f"{task.dataset}/{task.model}",
    }


def _registry_metadata(model) -> dict[str, Any]:
    """What the registry records about a meta-learner (shown in the MLflow UI)."""
    from raymeta.models.modulation import Modulation
    from raymeta.schedules.mlrsnet import MLRSNetBundle

    if isinstance(model, MLRSNetBundle):
        return {
            "kind": "mlrsnet",
            "checkpoint_epochs": list(model.checkpoint_epochs),
            "hidden_size": model.hidden_size,
            "mlp_hidden": model.mlp_hidden,
            "gamma_rule": model.gamma_rule,
            "source": model.source,
        }
    if isinstance(model, Modulation):
        return {"kind": "mfm_modulator", "class": type(model).__name__, "config": model.config()}
    raise TypeError(f"cannot register a {type(model).__name__} as a raymeta meta-learner")


def log_meta_learner(
    model,
    registered_model: str,
    alias: str,
    name: str = "meta_learner",
    metadata: dict[str, Any] | None = None,
) -> str:
    """Log a meta-learner to the active run with ``mlflow.pytorch`` (pickle format,
    :func:`pip_requirements`), register it under ``registered_model`` and point ``alias`` at the
    new version, tagged (run and model version) with ``raymeta_version``. Returns the version.

    Args:
        model: an :class:`~raymeta.schedules.MLRSNetBundle` or an MFM
            :class:`~raymeta.models.modulation.Modulation` (log a detached one, e.g. a
            :class:`~raymeta.models.modulation.ModulatorNet` rebuilt from its config and state).
        metadata: extra registry metadata (e.g. where it was meta-trained).

    Raises:
        TypeError: ``model`` is neither.
    """
    import mlflow
    from mlflow import MlflowClient

    from raymeta import __version__

    info = mlflow.pytorch.log_model(
        model,
        name=name,
        serialization_format="pickle",
        pip_requirements=pip_requirements(),
        registered_model_name=registered_model,
        metadata={**_registry_metadata(model), "raymeta_version": __version__, **(metadata or {})},
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.set_registered_model_alias(registered_model, alias, version)
    client.set_model_version_tag(registered_model, version, "raymeta_version", __version__)
    mlflow.set_tag("raymeta_version", __version__)
    return version


def _meta_learner_kinds() -> dict[str, tuple[type, str]]:
    from raymeta.models.modulation import ModulatorNet
    from raymeta.schedules.mlrsnet import MLRSNetBundle

    return {
        "mlrsnet": (MLRSNetBundle, "an MLR-SNet meta-learner"),
        "modulator": (ModulatorNet, "an MFM modulator network"),
    }


def registry_ref(model_uri: str) -> tuple[str, str | None, str | None] | None:
    """``(name, alias, version)`` of ``models:/NAME@ALIAS`` (version None) or
    ``models:/NAME/VERSION`` (alias None); None for a URI outside the registry."""
    if not model_uri.startswith("models:/"):
        return None
    ref = model_uri.removeprefix("models:/")
    name, sep, alias = ref.partition("@")
    if sep:
        return name, alias, None
    name, _, version = ref.partition("/")
    return name, None, version


def check_registered(model_uri: str) -> None:
    """Fail fast, before Ray starts, when a registry URI (``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION``) names nothing in the current tracking store; other URIs pass.

    Raises:
        ConfigError: one line naming the URI, the store and what it accepts (the model's
            aliases and versions, or the registered models).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    parsed = registry_ref(model_uri)
    if parsed is None:
        return
    name, alias, version = parsed
    client = MlflowClient()
    store = mlflow.get_tracking_uri()
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models()) or ["none yet"]
        raise ConfigError(
            f"cannot load meta-learner {model_uri!r}: no registered model {name!r} in {store}; "
            f"accepted: {', '.join(names)}"
        ) from None
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    if alias is not None and alias not in model.aliases:
        accepted = ", ".join(f"@{a}" for a in sorted(model.aliases)) or "no aliases set"
        raise ConfigError(
            f"registered model {name!r} has no alias {alias!r} in {store}; accepted: "
            f"{accepted}, or a version /{versions[-1] if versions else 1}"
        )
    if alias is None and (not version.isdigit() or int(version) not in versions):
        aliases = "".join(f", @{a}" for a in sorted(model.aliases))
        raise ConfigError(
            f"registered model {name!r} has no version {version!r} in {store}; accepted: "
            f"{', '.join(map(str, versions)) or 'no versions yet'}{aliases}"
        )


def load_meta_learner(model_uri: str, kind: str = "mlrsnet"):
    """Load a registered meta-learner by ``models:/NAME@ALIAS`` (or any MLflow model URI).

    Args:
        model_uri: the model's URI.
        kind: ``"mlrsnet"`` (an :class:`~raymeta.schedules.MLRSNetBundle`) or ``"modulator"``
            (an MFM :class:`~raymeta.models.modulation.ModulatorNet`, detached: attach it to a
            classifier).

    Returns ``(model, version)`` where ``version`` is the registry version (``None`` for a
    URI outside the registry), to record which meta-learner a transfer run used.

    Raises:
        ConfigError: the model, version or alias does not exist, or it is not of ``kind``.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    expected, what = _meta_learner_kinds()[kind]
    name, alias, version = registry_ref(model_uri) or (None, None, None)
    try:
        if alias is not None:
            version = str(MlflowClient().get_model_version_by_alias(name, alias).version)
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except (MlflowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load meta-learner {model_uri!r}: {first}") from None
    if not isinstance(model, expected):
        raise ConfigError(f"{model_uri!r} is a {type(model).__name__}, not {what}")
    return model, version
