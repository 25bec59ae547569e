"""MLflow: tracking store, runs, metrics, artifacts and the model registry.

Default store: a SQLite file ``mlflow.db`` plus an artifact folder ``mlartifacts/`` in the
current working directory, resolved to absolute paths in the driver, so that Ray Train workers
and Tune trials (which run in other working directories) write to the same store.
``MLFLOW_TRACKING_URI`` (or an explicit URI, e.g. a tracking server on a cluster) overrides it.
:func:`setup` checks the store before anything else runs (a tracking server must answer
within :data:`STORE_TIMEOUT_S`; a SQLite file must be creatable): one line otherwise.

**Outages.** A training run never dies of a logging failure: :func:`log_points` keeps
what it could not write, warns once, retries with the next epoch and :func:`flush_metrics`
tries a last time when the run ends. Results files are written to ``output_dir`` first and
logged with :func:`log_results`, which warns instead of failing.

**Registered meta-learners** (an MLR-SNet :class:`~raymeta.schedules.MLRSNetBundle`, an MFM
:class:`~raymeta.models.modulation.ModulatorNet`) are stored as data, never as code: a folder
with ``weights.pt`` (a flat state dict of tensors, read with ``torch.load(weights_only=True)``),
``config.json`` (the kind and the hyper-parameters that rebuild the module) and an ``MLmodel``
file (flavor ``raymeta``, the input signature). Loading one runs no code from the store.
Versions that older raymeta releases logged with ``mlflow.pytorch`` as pickles are read only
with ``allow_pickle`` (``mlflow.allow_pickle: true`` or ``--allow-pickle``): unpickling runs
code from the store. Each version carries a description and tags (kind, task, source run,
metrics, raymeta version); the registered model a description of how to use it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymeta.errors import ConfigError

if TYPE_CHECKING:
    from raymeta.spec import RunSpec

STORE_TIMEOUT_S = 5.0  # a tracking server must answer the start-up check within this
# MLflow's HTTP client retries a failed request 7 times with exponential back-off (265 s of
# silence before the first error); raymeta's calls retry less (workers inherit these).
HTTP_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


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


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def check_store(uri: str, timeout: float = STORE_TIMEOUT_S) -> None:
    """Check that the tracking store ``uri`` can be used, before anything else runs.

    A tracking server (``http(s)://``) must answer ``/health`` within ``timeout`` seconds (any
    HTTP answer counts); a SQLite store's folder must exist or be creatable and the file must
    not be a folder. Other stores are left to MLflow.

    Raises:
        ConfigError: one line naming the store and what is accepted.
    """
    import urllib.error
    import urllib.request

    accepted = "accepted: a running tracking server or a local store such as sqlite:///mlflow.db"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # it answered: a server (or a proxy in front of one) is there
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)  # URLError wraps the socket's error
            if isinstance(reason, OSError) and reason.strerror:
                reason = reason.strerror
            raise ConfigError(
                f"MLflow tracking server {uri} did not answer within {timeout:g} s ({reason}); "
                f"{accepted}"
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            blocker = next((p for p in [db.parent, *db.parent.parents] if p.is_file()), db.parent)
            raise ConfigError(
                f"tracking store {uri}: {blocker} is a file, not a folder; {accepted} in a folder"
            ) from None
        if db.is_dir():
            raise ConfigError(f"tracking store {uri}: {db} is a folder, not a SQLite file")


def setup(tracking_uri: str | None, experiment: str) -> tuple[str, str]:
    """Point MLflow at the store (checked first: :func:`check_store`), create the experiment
    once (in the driver) and make it active.

    For a local SQLite store the experiment's artifacts go to ``mlartifacts/`` next to the
    database. Returns ``(tracking_uri, experiment_id)``.

    Raises:
        ConfigError: the store cannot be used (one line).
    """
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    for key, value in HTTP_RETRY_ENV.items():
        os.environ.setdefault(key, value)
    check_store(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # inherited by Ray workers started from here
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
        else:
            experiment_id = exp.experiment_id
    except Exception as exc:  # any store failure (SQLAlchemy, HTTP, MLflow) is one line here
        raise ConfigError(f"tracking store {uri} cannot be used: {_first_line(exc)}") from None
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


def _warn(message: str) -> None:
    print(f"raymeta: warning: {message}", file=sys.stderr, flush=True)


def warn_store_failure(what: str, exc: BaseException) -> None:
    """One warning line for a store call that failed where training goes on: ``what`` and
    the first line of the error."""
    _warn(f"{what} ({_first_line(exc)})")


_PENDING: dict[tuple[str, str], list] = {}  # (tracking URI, run id) -> metrics not yet written
_FAILING: set[tuple[str, str]] = set()  # runs whose last write failed (warned once)
BATCH_LIMIT = 1000  # metrics per MLflow log_batch call (MLflow's limit)

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


def log_points(tracking_uri: str, run_id: str, points: list[MetricPoint]) -> bool:
    """Log metric points to a run by id, in ``log_batch`` calls of at most
    :data:`BATCH_LIMIT` metrics; NaN values are left out. Used once per epoch by rank 0 of a
    Ray Train run and by the driver for Tune trials, never once per step.

    Never raises for a store failure: the points stay buffered, one warning line is printed
    when the store first fails, and every later call (and :func:`flush_metrics` at the end of
    the run) writes the buffer first. Returns whether everything buffered is now written.
    """
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, int(step)) for k, v, step in points if v == v]
    _PENDING.setdefault((tracking_uri, run_id), []).extend(batch)
    return flush_metrics(tracking_uri, run_id)


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


def flush_metrics(tracking_uri: str, run_id: str, *, final: bool = False) -> bool:
    """Write the metrics :func:`log_points` buffered for ``run_id``; with ``final``
    (the run has ended) a failure drops them with a warning naming how many were lost.
    Returns whether nothing is left buffered."""
    from mlflow import MlflowClient

    key = (tracking_uri, run_id)
    pending = _PENDING.get(key, [])
    try:
        while pending:
            MlflowClient(tracking_uri).log_batch(run_id, metrics=pending[:BATCH_LIMIT])
            del pending[:BATCH_LIMIT]
    except Exception as exc:  # any store failure (SQLAlchemy, HTTP, MLflow): training goes on
        if final:
            _warn(
                f"MLflow store {tracking_uri} still fails ({_first_line(exc)}); {len(pending)} "
                f"metric value(s) of run {run_id} were not logged (the results files have them)"
            )
            _PENDING.pop(key, None)
        elif key not in _FAILING:
            _warn(
                f"MLflow logging to {tracking_uri} failed ({_first_line(exc)}); training goes "
                "on, the metrics are kept and retried at the next epoch"
            )
        _FAILING.add(key)
        return False
    if key in _FAILING:
        _FAILING.discard(key)
        _warn(f"MLflow logging to {tracking_uri} works again; the buffered metrics are written")
    _PENDING.pop(key, None)
    return True


def log_results(paths: Iterable[str | Path], run_id: str | None = None) -> None:
    """Log results files (already written to ``output_dir``) as artifacts of the active run
    (or of ``run_id``); a store failure is a warning line, never the end of the command."""
    import mlflow

    paths = [str(p) for p in paths]
    try:
        for path in paths:
            if run_id is None:
                mlflow.log_artifact(path)
            else:
                mlflow.MlflowClient().log_artifact(run_id, path)
    except Exception as exc:  # any store failure: the files are in output_dir
        _warn(
            f"could not log {len(paths)} results file(s) to MLflow ({_first_line(exc)}); "
            f"they are in {Path(paths[0]).parent}"
        )


FORMAT_VERSION = 1  # of the stored meta-learner folder (config.json "format_version")
WEIGHTS, CONFIG = "weights.pt", "config.json"
KINDS = {"mlrsnet": "an MLR-SNet meta-learner", "modulator": "an MFM modulator network"}
DESCRIPTIONS = {
    "mlrsnet": "MLR-SNet meta-learner: a learned LR schedule (Shu et al., TPAMI 2022), an LSTM "
    "cell mapping the batch training loss to the unit LR of each step, as several checkpoints "
    "of one meta-training run. Use it frozen on a new task with `schedule: mlrsnet` and "
    "`model_uri: models:/NAME@ALIAS` (raymeta transfer, compare, study). Stored as a state dict "
    "plus JSON hyper-parameters (raymeta flavor); loading it runs no code from the store.",
    "modulator": "MFM modulator network (raymeta's reading of meta feature modulation for "
    "long-tailed recognition): maps a channel's (mean, std) to its (scale, shift). Attach it "
    "frozen to a new classifier with `raymeta mfm transfer --model-uri models:/NAME@ALIAS`. "
    "Stored as a state dict plus JSON hyper-parameters (raymeta flavor); loading it runs no "
    "code from the store.",
}


def _kind_of(model) -> str:
    from raymeta.models.modulation import ModulatorNet
    from raymeta.schedules.mlrsnet import MLRSNetBundle

    if isinstance(model, MLRSNetBundle):
        return "mlrsnet"
    if isinstance(model, ModulatorNet):
        return "modulator"
    raise TypeError(f"cannot register a {type(model).__name__} as a raymeta meta-learner")


def _hyper_parameters(model, kind: str) -> dict[str, Any]:
    """What rebuilds ``model`` before its weights are loaded (``config.json``)."""
    if kind == "mlrsnet":
        return {
            "checkpoint_epochs": list(model.checkpoint_epochs),
            "hidden_size": model.hidden_size,
            "mlp_hidden": model.mlp_hidden,
            "gamma_rule": model.gamma_rule,
        }
    return model.config()


def _signature(kind: str):
    """The MLflow input/output signature: MLR-SNet maps ``(T,)`` batch losses to ``(T,)`` unit
    LRs (before gamma); the modulator maps ``(N, 2)`` channel (mean, std) to ``(N, 2)``
    (scale - 1, shift)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    f32 = np.dtype("float32")
    if kind == "mlrsnet":
        shapes = (("training_loss", (-1,)), ("unit_lr", (-1,)))
    else:
        shapes = (("channel_mean_std", (-1, 2)), ("scale_minus_one_shift", (-1, 2)))
    (i_name, i_shape), (o_name, o_shape) = shapes
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, i_shape, i_name)]),
        outputs=Schema([TensorSpec(f32, o_shape, o_name)]),
    )


def save_meta_learner(model, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``folder`` in raymeta's safe format (module docstring): ``weights.pt``,
    ``config.json``, ``MLmodel`` and ``requirements.txt``; returns ``folder``. Also the local
    copy a command keeps in its ``output_dir`` before registering.

    Raises:
        TypeError: ``model`` is neither an MLRSNetBundle nor a ModulatorNet.
    """
    import torch
    from mlflow.models import Model

    from raymeta import __version__

    kind = _kind_of(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, folder / WEIGHTS)
    config = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "class": type(model).__name__,
        "hyper_parameters": _hyper_parameters(model, kind),
        "source": getattr(model, "source", ""),
        "raymeta_version": __version__,
        **(metadata or {}),
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=1, default=str))
    flavor = {"format_version": FORMAT_VERSION, "kind": kind, "weights": WEIGHTS, "config": CONFIG}
    Model(flavors={"raymeta": flavor}, signature=_signature(kind)).save(str(folder / "MLmodel"))
    import mlflow

    pins = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    (folder / "requirements.txt").write_text("\n".join(pins) + "\n")
    return folder


def read_meta_learner(folder: str | Path, where: str):
    """Rebuild a meta-learner from a folder :func:`save_meta_learner` wrote; no code is run
    (``torch.load(weights_only=True)``, JSON).

    Raises:
        ConfigError: the folder is not in that format or its files are unreadable (one line
            naming ``where``).
    """
    import torch

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
        state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
        kind, hp = config["kind"], config["hyper_parameters"]
        if kind == "mlrsnet":
            from raymeta.schedules.mlrsnet import MLRSNetBundle

            epochs = hp["checkpoint_epochs"]
            cells = [
                {k.removeprefix(f"cells.{i}."): v for k, v in state.items()
                 if k.startswith(f"cells.{i}.")}
                for i in range(len(epochs))
            ]  # fmt: skip
            model = MLRSNetBundle(
                cells, epochs, hp["hidden_size"], hp["mlp_hidden"], source=config["source"]
            )
        elif kind == "modulator":
            from raymeta.models.modulation import ModulatorNet

            model = ModulatorNet(**hp)
            model.load_state_dict(state)
            model.source = config["source"]
        else:
            raise ValueError(f"unknown kind {kind!r}")
    except Exception as exc:  # truncated, corrupt or foreign files: one line, not a traceback
        raise ConfigError(
            f"{where}: the stored meta-learner is unreadable ({_first_line(exc)}); accepted: a "
            "folder with config.json and weights.pt written by raymeta"
        ) from None
    return model


def log_meta_learner(
    model,
    registered_model: str,
    alias: str,
    name: str = "meta_learner",
    metadata: dict[str, Any] | None = None,
) -> str:
    """Log a meta-learner to the active run in raymeta's safe format
    (:func:`save_meta_learner`), register it as a new version of ``registered_model`` and point
    ``alias`` at it. Returns the version.

    The registered model gets a description of its kind and how to use it (when it is
    created); the version a description (its ``source``) and tags: ``kind``,
    ``raymeta_version``, ``source_run`` (the active run) and every ``metadata`` item (e.g.
    ``task``, final metrics such as ``test_acc``). The run is tagged with ``raymeta_version``.

    Args:
        model: an :class:`~raymeta.schedules.MLRSNetBundle` or an MFM
            :class:`~raymeta.models.modulation.ModulatorNet` (a detached one).
        name: the artifact folder in the run.
        metadata: what the version records about where it comes from (JSON values).

    Raises:
        TypeError: ``model`` is neither.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from raymeta import __version__

    run = mlflow.active_run()
    kind = _kind_of(model)
    with tempfile.TemporaryDirectory() as d:
        folder = save_meta_learner(model, Path(d) / name, metadata)
        mlflow.log_artifacts(str(folder), name)
    client = MlflowClient()
    try:
        client.get_registered_model(registered_model)
    except MlflowException:
        client.create_registered_model(
            registered_model, tags={"kind": kind}, description=DESCRIPTIONS[kind]
        )
    tags = {"kind": kind, "raymeta_version": __version__, "source_run": run.info.run_id}
    tags |= {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    version = client.create_model_version(
        registered_model,
        source=f"{run.info.artifact_uri}/{name}",
        run_id=run.info.run_id,
        tags=tags,
        description=getattr(model, "source", "") or None,
    ).version
    client.set_registered_model_alias(registered_model, alias, str(version))
    mlflow.set_tag("raymeta_version", __version__)
    return str(version)


def register_meta_learner(
    model,
    registered_model: str,
    alias: str,
    keep: str | Path,
    name: str = "meta_learner",
    metadata: dict[str, Any] | None = None,
) -> str:
    """Save ``model`` to the local folder ``keep`` (:func:`save_meta_learner`), then
    :func:`log_meta_learner` it; returns the version.

    Raises:
        RegistrationError: the store failed; the message says where the local copy is.
    """
    from raymeta.errors import RegistrationError

    save_meta_learner(model, keep, metadata)
    try:
        return log_meta_learner(model, registered_model, alias, name, metadata)
    except Exception as exc:  # any store failure: the trained meta-learner must not be lost
        raise RegistrationError(
            f"{registered_model} was not registered ({_first_line(exc)}); the trained "
            f"meta-learner is kept in {keep}"
        ) from None


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


def load_meta_learner(model_uri: str, kind: str = "mlrsnet", *, allow_pickle: bool = False):
    """Load a registered meta-learner by ``models:/NAME@ALIAS`` (or any MLflow model URI).

    Args:
        model_uri: the model's URI.
        kind: ``"mlrsnet"`` (an :class:`~raymeta.schedules.MLRSNetBundle`) or ``"modulator"``
            (an MFM :class:`~raymeta.models.modulation.ModulatorNet`, detached: attach it to a
            classifier).
        allow_pickle: also read a version that an older raymeta logged as a pickle with
            ``mlflow.pytorch`` (unpickling runs code from the store: only for stores you trust).

    Returns ``(model, version)`` where ``version`` is the registry version (``None`` for a
    URI outside the registry), to record which meta-learner a transfer run used.

    Raises:
        ConfigError: the model, version or alias does not exist, its files are unreadable, it
            is a pickle and ``allow_pickle`` is False, or it is not of ``kind``.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, version = registry_ref(model_uri) or (None, None, None)
    try:
        if alias is not None:
            version = str(MlflowClient().get_model_version_by_alias(name, alias).version)
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except (MlflowException, OSError) as exc:
        raise ConfigError(f"cannot load meta-learner {model_uri!r}: {_first_line(exc)}") from None
    if (folder / CONFIG).is_file():
        model = read_meta_learner(folder, model_uri)
    elif not allow_pickle:
        raise ConfigError(
            f"{model_uri!r} is stored as a pickle (logged by an older raymeta): loading it runs "
            "code from the store; if you trust this store, allow it with mlflow.allow_pickle: "
            "true or --allow-pickle"
        )
    else:
        try:
            model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
        except Exception as exc:  # a corrupt or foreign pickle: one line
            raise ConfigError(
                f"cannot load meta-learner {model_uri!r}: {_first_line(exc)}"
            ) from None
    from raymeta.models.modulation import ModulatorNet
    from raymeta.schedules.mlrsnet import MLRSNetBundle

    expected = {"mlrsnet": MLRSNetBundle, "modulator": ModulatorNet}[kind]
    if not isinstance(model, expected):
        raise ConfigError(f"{model_uri!r} is a {type(model).__name__}, not {KINDS[kind]}")
    return model, version
