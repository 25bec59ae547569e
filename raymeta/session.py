"""The orchestration skeleton every command runs in: ``raymeta run`` (and the ``quickstart``,
``meta-train``, ``transfer`` and ``mfm`` commands, which build a pipeline), ``compare`` and
``study``.

:func:`open_session` owns, in this order:

1. the output folder (made absolute, created);
2. the MLflow tracking store and experiment (:func:`raymeta.tracking.setup`);
3. the registry inputs of the sections it runs: every meta-learner they load but do not
   register themselves is checked (one line naming what the registry accepts) and loaded once
   in the driver; runs receive it beside their spec (:meth:`Session.meta_learner`);
4. the Ray session: a connection to ``ray.address`` / ``$RAY_ADDRESS``, or a local Ray
   (:func:`start_local_ray`), shut down on exit if started here.

:meth:`Session.parent_run` opens a command's (or a stage's) parent MLflow run: resumed by id
from its state file under ``output_dir`` when the session resumes, its params logged once, its
status set on exit (``FINISHED``; ``FAILED`` on an error; ``KILLED`` on Ctrl+C); inside another
parent run it is nested there (the pipeline's run holds its stages). :meth:`ParentRun.stage`
opens a stage's nested run under it the same way. A command::

    with open_session(cfg, ["compare"], resume=resume) as session:
        with session.parent_run("compare", state_file="compare_state.json") as parent:
            ...  # stages: fit(...), Tuners, tables; parent.save(...) records progress

Data-dependent checks (datasets, splits, batch sizes) come before :func:`open_session`: they
need neither MLflow nor Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymeta.config import SECTIONS, PipelineConfig, RayConfig


def start_local_ray(num_cpus: int | None = None, **kwargs) -> str:
    """``ray.init(address="local", ...)`` with the GCS on a free port chosen here, exported to
    every process of the new cluster as ``RAY_ADDRESS`` (job-level ``runtime_env``).

    Why: Ray Train V2's ``PlacementGroupCleaner`` (a detached actor) queries the State API
    without an address; with a second Ray instance on the host it otherwise logs a
    "Found multiple active Ray instances" traceback on every run (training is unaffected).
    Ray Jobs set ``RAY_ADDRESS`` for their drivers the same way. Returns the GCS address.
    """
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by Ray when it starts a head node
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            runtime_env={"env_vars": {"RAY_ADDRESS": address}},
            **kwargs,
        )
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT")
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    return address


def connect_ray(cfg: RayConfig) -> bool:
    """Connect to ``cfg.address`` / ``$RAY_ADDRESS``, or start a local Ray with ``cfg.num_cpus``
    (nothing when Ray is already initialised in this process).

    Returns True if this call started or connected Ray (the caller then shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray(cfg.num_cpus)
    return True


def registry_inputs(cfg: PipelineConfig, sections: Sequence[str]) -> dict[str, str]:
    """The registry URIs that ``sections`` of ``cfg`` load but do not register themselves (an
    earlier section among them registers the model's name), with the kind each must be."""
    from raymeta.tracking import registry_ref

    produced: set[str] = set()
    inputs: dict[str, str] = {}
    for name in sections:
        section = getattr(cfg, name)
        if section is None:
            continue
        if section.registers is not None:  # its own transfer may load what it registers
            produced.add(section.registers)
        for uri, kind in section.loads().items():
            ref = registry_ref(uri)
            if ref is None or ref[0] not in produced:
                inputs.setdefault(uri, kind)
    return inputs


@dataclass
class ParentRun:
    """A command's parent MLflow run and its resume state.

    Attributes:
        run_id: the MLflow run id.
        resumed: True when an earlier, interrupted invocation's run was reopened.
        state: what the command recorded so far (``parent_run_id`` plus its own keys),
            written to ``path`` by :meth:`save`.
    """

    run_id: str
    resumed: bool
    state: dict[str, Any]
    path: Path | None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[str]:
        """A nested MLflow run ``name`` for one stage of this command (e.g. ``search/cosine``,
        ``final``), under this run, which must be the active one; reopened by id when the
        command resumes (the ids are kept in the state under ``stages``). Yields its run id;
        its status is set on exit, and this run is active again."""
        import mlflow

        stages = self.state.get("stages", {})
        active = mlflow.start_run(
            run_id=stages.get(name), run_name=None if name in stages else name, nested=True
        )
        self.save(stages={**stages, name: active.info.run_id})
        with _status_on_exit():
            yield active.info.run_id

    def save(self, **updates: Any) -> None:
        """Record ``updates`` in the state file (written whole, then renamed: a kill during
        the write leaves the previous state)."""
        self.state.update(updates)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state, default=str))
            tmp.replace(self.path)


@dataclass
class Session:
    """What the runs of a command share (see the module docstring); made by
    :func:`open_session`.

    Attributes:
        scope: the part of the command this session runs when a command runs a stage several
            times (a task of the transfer suite, :mod:`raymeta.tune.suite`, which replaces
            ``name``, ``output_dir`` and ``scope``); it names the nested parent runs
            (:meth:`parent_run`).
    """

    name: str
    output_dir: Path
    tracking_uri: str
    experiment: str
    experiment_id: str
    ray: RayConfig
    resume: bool = False
    scope: str | None = None
    _loaded: dict[str, tuple[Any, str | None]] = field(default_factory=dict, repr=False)

    @property
    def storage_path(self) -> Path:
        """Where Ray Train keeps checkpoints."""
        return self.output_dir / "ray_results"

    @property
    def tune_dir(self) -> Path:
        """Where the Ray Tune experiments keep their state (restored by ``--resume``)."""
        return self.output_dir / "tune"

    def meta_learner(self, model_uri: str, kind: str = "mlrsnet") -> tuple[Any, str | None]:
        """The registered meta-learner at ``model_uri`` and its registry version, loaded once
        per session (:func:`raymeta.tracking.load_meta_learner`).

        Raises:
            ConfigError: it does not exist or is not of ``kind`` (one line).
        """
        if model_uri not in self._loaded:
            from raymeta.tracking import check_registered, load_meta_learner

            check_registered(model_uri)
            self._loaded[model_uri] = load_meta_learner(model_uri, kind)
        return self._loaded[model_uri]

    @contextlib.contextmanager
    def parent_run(
        self, stage: str, *, params: dict[str, Any] | None = None, state_file: str | None = None
    ) -> Iterator[ParentRun]:
        """Open the parent MLflow run ``{stage}/{name}`` (module docstring), or, inside another
        parent run (a stage of a pipeline), the nested run ``{stage}`` (``{stage}/{scope}``
        in a scoped session).

        Args:
            stage: the command or stage (``pipeline``, ``compare``, ``study``).
            params: logged once, when the run is created (not again on resume).
            state_file: the resume state under ``output_dir`` (None: never resumed).
        """
        import mlflow

        path = self.output_dir / state_file if state_file else None
        state: dict[str, Any] = {}
        if self.resume and path is not None and path.exists():
            state = json.loads(path.read_text())
        resumed = "parent_run_id" in state
        nested = mlflow.active_run() is not None
        if nested:
            name = f"{stage}/{self.scope}" if self.scope else stage
        else:
            name = f"{stage}/{self.name}"
        active = mlflow.start_run(
            run_id=state.get("parent_run_id"),
            experiment_id=self.experiment_id,
            run_name=None if resumed else name,
            nested=nested,
        )
        parent = ParentRun(active.info.run_id, resumed, state, path)
        parent.save(parent_run_id=parent.run_id)
        with _status_on_exit():
            if params and not resumed:
                mlflow.log_params(params)
            yield parent


@contextlib.contextmanager
def _status_on_exit() -> Iterator[None]:
    """End the active MLflow run on leaving the block: ``FINISHED``; ``FAILED`` on an error;
    ``KILLED`` on Ctrl+C."""
    import mlflow

    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)


@contextlib.contextmanager
def open_session(
    cfg: PipelineConfig, sections: Sequence[str] = SECTIONS, *, resume: bool = False
) -> Iterator[Session]:
    """The skeleton of a command that runs ``sections`` of ``cfg`` (module docstring).

    Args:
        cfg: the pipeline (output folder, tracking, Ray settings and the sections).
        sections: the sections the command runs (their registry inputs are checked).
        resume: reopen the parent runs and Ray Tune experiments of an interrupted command.

    Raises:
        ConfigError: a registry input is missing or of the wrong kind (one line, before Ray
            starts).
    """
    import ray

    from raymeta.tracking import setup

    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri, experiment_id = setup(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    session = Session(cfg.name, out, uri, cfg.mlflow.experiment, experiment_id, cfg.ray, resume)
    for model_uri, kind in registry_inputs(cfg, sections).items():
        session.meta_learner(model_uri, kind)
    started = connect_ray(cfg.ray)
    try:
        yield session
    finally:
        if started:
            ray.shutdown()
    print(
        f"browse the runs: raymeta ui   (or: mlflow ui --backend-store-uri {uri} --host 127.0.0.1)"
    )
