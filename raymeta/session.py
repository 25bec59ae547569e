"""The orchestration skeleton every command runs in: ``raymeta run`` (and the ``quickstart``,
``meta-train``, ``transfer`` and ``mfm`` commands, which build a pipeline), ``compare`` and
``study``.

:func:`open_session` owns, in this order:

1. the output folder (made absolute, created);
2. the MLflow tracking store and experiment (:func:`raymeta.tracking.setup`);
3. the registry inputs of the sections it runs: every meta-learner they load but do not
   register themselves is checked (one line naming what the registry accepts) and loaded once
   in the driver; runs receive it beside their spec (:meth:`Session.meta_learner`). With
   ``resume``, a meta-training that the interrupted invocation finished and registered is not
   run again: that version is loaded, for every load of its ``models:/NAME@ALIAS``
   (:meth:`Session.reuse_meta_learner`);
4. the Ray session: a connection to ``ray.address`` / ``$RAY_ADDRESS``, or a local Ray
   (:func:`start_local_ray`), shut down on exit if started here.

Before Ray starts it checks the output folder (a folder, creatable), the tracking store
(:func:`raymeta.tracking.setup`), the sizes (:func:`check_resources`: Ray Train workers and
trials against the local CPUs and GPUs; a remote cluster's resources right after connecting)
and, with ``resume``, the saved state (:func:`resume_state`: present, readable, and saved with
a config the new one may continue, and a finished meta-training saved with the same config,
:func:`finished_meta_train`; checked first, so that a refused resume creates nothing). Inside
the session SIGTERM is handled as SIGINT
(:mod:`raymeta.interrupts`): either stops the command with ``KeyboardInterrupt``.

:meth:`Session.parent_run` opens a command's (or a stage's) parent MLflow run: resumed by id
from its state file under ``output_dir`` when the session resumes, its params logged once, its
status set on exit (``FINISHED``; ``FAILED`` on an error; ``KILLED`` on Ctrl+C, also for every
run under it still RUNNING); inside another parent run it is nested there (the pipeline's run
holds its stages). :meth:`ParentRun.stage` opens a stage's nested run under it the same way. A
run that was FINISHED before a resume stays FINISHED whatever happens later. A command::

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
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymeta.config import SECTIONS, PipelineConfig, RayConfig
from raymeta.errors import ConfigError


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


def check_output_dir(path: str | Path) -> Path:
    """``path`` made absolute and created.

    Raises:
        ConfigError: it, or a folder above it, is a file, or it cannot be created (one line).
    """
    out = Path(path).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in [out, *out.parents] if p.exists() and not p.is_dir())
        raise ConfigError(
            f"output_dir {path}: {blocker} is a file, not a folder; accepted: a folder (created "
            "if missing)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"output_dir {path} cannot be created ({exc.strerror})") from None
    return out


def resource_needs(cfg: PipelineConfig, sections: Sequence[str]) -> list[tuple[str, float, float]]:
    """What each unit of work of ``sections`` reserves at once, as ``(setting, CPUs, GPUs)``: a
    Ray Train worker group (one CPU, and one GPU with ``use_gpu``, per worker;
    :func:`raymeta.train.device.worker_resources`) or one Ray Tune trial."""
    from raymeta.train.device import worker_resources

    per_worker = worker_resources(cfg.ray.use_gpu)
    groups = []
    if "meta_train" in sections:
        key = "meta_train_workers" if cfg.meta_train_workers else "ray.num_workers"
        groups.append((key, cfg.meta_train_workers or cfg.ray.num_workers))
    if "transfer" in sections:
        groups.append(("ray.num_workers", cfg.ray.num_workers))
    if "longtail" in sections:
        key = "longtail.num_workers" if cfg.longtail.num_workers else "ray.num_workers"
        groups.append((key, cfg.longtail.num_workers or cfg.ray.num_workers))
    needs = [
        (f"{key}={n} (Ray Train workers)", n * per_worker["CPU"], n * per_worker.get("GPU", 0))
        for key, n in dict(groups).items()
    ]
    if "compare" in sections:
        s = cfg.compare.search
        needs.append((f"compare.search.cpus_per_trial={s.cpus_per_trial:g}", s.cpus_per_trial, 0.0))
        needs.append((f"compare.search.gpus_per_trial={s.gpus_per_trial:g}", 0.0, s.gpus_per_trial))
    if "study" in sections:
        r = cfg.study.resources
        needs.append((f"study.resources.cpus_per_task={r.cpus_per_task:g}", r.cpus_per_task, 0.0))
        needs.append((f"study.resources.gpus_per_task={r.gpus_per_task:g}", 0.0, r.gpus_per_task))
    return needs


def check_resources(
    cfg: PipelineConfig, sections: Sequence[str], cpus: float, gpus: float, where: str
) -> None:
    """Refuse work that can never be scheduled: Ray would wait for it forever (Ray Train
    retries its worker start-up every 60 s; a Tune trial stays pending).

    Args:
        cpus, gpus: what the Ray session has (``where`` names it in the message).

    Raises:
        ConfigError: one line naming the setting, what it needs and what there is.
    """
    for setting, need_cpus, need_gpus in resource_needs(cfg, sections):
        for need, have, unit in ((need_cpus, cpus, "CPU"), (need_gpus, gpus, "GPU")):
            if need <= have:
                continue
            if unit == "GPU" and have == 0:
                accepted = "no GPU work here (ray.use_gpu false, gpus_per_trial 0)"
            else:
                accepted = f"at most {have:g} {unit}(s)"
                if unit == "CPU" and "num_cpus" in where:
                    accepted += ", or a larger ray.num_cpus"
            raise ConfigError(
                f"{setting} needs {need:g} {unit}(s) at once but {where} has {have:g}; "
                f"accepted: {accepted}"
            )


def local_resources(cfg: RayConfig) -> tuple[float, float, str]:
    """``(CPUs, GPUs, description)`` of the local Ray that :func:`connect_ray` would start."""
    import torch

    cpus = cfg.num_cpus or os.cpu_count() or 1
    where = f"the local Ray (ray.num_cpus={cfg.num_cpus})" if cfg.num_cpus else "this machine"
    return float(cpus), float(torch.cuda.device_count()), where


@dataclass(frozen=True)
class ResumeRule:
    """How a resumable section (``compare``, ``study``; and a finished ``meta_train``,
    :data:`META_TRAIN_RESUME`) resumes.

    Attributes:
        state_file: its state under ``output_dir``.
        may_grow: config keys whose value may grow on a resume (the missing work is done).
        free: config keys (or key prefixes) that may change on a resume.
        accepted: the accepted changes, as the error message states them.
    """

    state_file: str
    may_grow: tuple[str, ...]
    free: tuple[str, ...]
    accepted: str


RESUMABLE = {
    "compare": ResumeRule(
        "compare_state.json",
        may_grow=("search.trials_per_family",),
        free=("search.max_concurrent",),
        accepted="a larger search.trials_per_family, another search.max_concurrent",
    ),
    "study": ResumeRule(
        "study_state.json",
        may_grow=(),
        free=("axes", "extra_tasks", "methods", "exclude", "max_concurrent", "resources"),
        accepted="more tasks (axes, extra_tasks, methods, exclude), another max_concurrent "
        "or resources",
    ),
}


def _changed_keys(saved: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, new value)}`` of the keys whose values differ."""
    from raymeta.tracking import flatten

    a, b = flatten(saved), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _read_state(path: Path) -> dict[str, Any]:
    """The saved state at ``path`` (an existing file) with its ``parent_run_id``.

    Raises:
        ConfigError: it is truncated or corrupt (one line).
    """
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("parent_run_id"), str):
            raise ValueError("no parent_run_id")
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--resume: the saved state {path} is unreadable (truncated or corrupt: "
            f"{' '.join(str(exc).split())[:120]}); accepted: a state file written by raymeta; "
            "run without --resume (or with another output_dir) to start again"
        ) from None
    return state


def _refuse_changes(
    rule: ResumeRule, saved: dict, config: dict, differs: str, prefix: str = ""
) -> None:
    """Refuse a resume whose ``config`` changed ``saved`` beyond what ``rule`` accepts.

    Raises:
        ConfigError: one line, ``--resume: {differs} in {prefix}KEY (OLD -> NEW), ...``, with
            the accepted changes.
    """

    def allowed(key: str, old: Any, new: Any) -> bool:
        if key in rule.may_grow:
            return isinstance(old, int) and isinstance(new, int) and new >= old
        return any(key == f or key.startswith(f + ".") for f in rule.free)

    changed = _changed_keys(saved, config)
    bad = {k: v for k, v in changed.items() if not allowed(k, *v)}
    if bad:
        listed = ", ".join(f"{prefix}{k} ({old!r} -> {new!r})" for k, (old, new) in bad.items())
        raise ConfigError(
            f"--resume: {differs} in {listed}; accepted changes: {rule.accepted}; run without "
            "--resume (or with another output_dir) to start again"
        )


def resume_state(output_dir: Path, section: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state of ``section`` under ``output_dir`` for ``--resume``, checked: None when
    there is none; else readable, and saved with a config that ``config`` (the section's
    config now, JSON form) may continue (:data:`RESUMABLE`).

    Raises:
        ConfigError: the state file is truncated or corrupt, or the config changed in a way
            the saved work cannot continue (one line listing the keys that differ).
    """
    rule = RESUMABLE[section]
    path = output_dir / rule.state_file
    if not path.exists():
        return None
    state = _read_state(path)
    saved = state.get("config")
    if saved is not None:  # None: saved by a raymeta that did not record the config
        differs = f"the {section} config differs from the saved one"
        _refuse_changes(rule, saved, config, differs, prefix=f"{section}.")
    return state


#: the pipeline's state under ``output_dir``: its run's id and stages (reopened by
#: ``--resume``) and, once its meta-training registered a version, that meta-training's record
#: (:func:`meta_train_record`)
PIPELINE_STATE_FILE = "pipeline_state.json"

#: a finished meta-training is reused on ``--resume`` only with the config it ran with
META_TRAIN_RESUME = ResumeRule(
    PIPELINE_STATE_FILE,
    may_grow=(),
    free=(),
    accepted="none (the resumed sections go on with the meta-learner it registered)",
)


def meta_train_record(
    cfg: PipelineConfig, version: str, rows: list[dict], histories: dict[str, list[dict]]
) -> dict[str, Any]:
    """What the pipeline state keeps (key ``meta_train``) of a meta-training that registered
    ``version`` of ``cfg.meta_train.registered_model``: the registry reference, the ``meta_train``
    section (JSON form; its number of workers is not part of it: they split the same global
    batches), and its results-table ``rows`` and per-epoch ``histories``
    (label -> the epochs' metrics, plotted), so that a resumed pipeline reuses it
    (:func:`finished_meta_train`) and still reports it."""
    return {
        "registered_model": cfg.meta_train.registered_model,
        "alias": cfg.meta_train.alias,
        "version": str(version),
        "config": cfg.meta_train.model_dump(mode="json"),
        "rows": rows,
        "histories": histories,
    }


def finished_meta_train(cfg: PipelineConfig, output_dir: Path) -> dict[str, Any] | None:
    """The record (:func:`meta_train_record`) of the meta-training that the interrupted
    invocation of ``cfg`` finished and registered, from the pipeline state under
    ``output_dir``; None when it did not get that far (meta-training then runs again).

    Raises:
        ConfigError: the state is unreadable, or ``cfg``'s meta-training differs from the one
            that registered the version (one line listing the keys).
    """
    path = output_dir / PIPELINE_STATE_FILE
    record = _read_state(path).get("meta_train") if path.exists() else None
    if record is not None:
        uri = f"models:/{record['registered_model']} version {record['version']}"
        differs = f"the meta-training config differs from the one that registered {uri}"
        config = cfg.meta_train.model_dump(mode="json")
        _refuse_changes(META_TRAIN_RESUME, record["config"], config, differs, "meta_train.")
    return record


def check_resume(cfg: PipelineConfig, sections: Sequence[str], output_dir: Path) -> None:
    """``--resume`` needs saved work: the state of at least one resumable section of
    ``sections`` (each checked with :func:`resume_state`; the ``suite`` section resumes each
    task's comparison, saved under ``output_dir/<task>``). A ``meta_train`` section that
    finished is checked too (:func:`finished_meta_train`).

    Raises:
        ConfigError: nothing is saved, or a state file is unreadable or does not fit.
    """
    states = []  # (folder, section, config now) of every resumable state
    for s in sections:
        if s in RESUMABLE:
            states.append((output_dir, s, getattr(cfg, s).model_dump(mode="json")))
        elif s == "suite":
            states += [
                (output_dir / task.name, "compare", cfg.suite.compare(task).model_dump(mode="json"))
                for task in cfg.suite.tasks
            ]
    if not states:
        raise ConfigError(
            "--resume: nothing to resume: only compare, study and suite sections resume (the "
            "other sections run again); run without --resume"
        )
    found = [s for folder, s, config in states if resume_state(folder, s, config) is not None]
    if not found:
        files = " or ".join(
            dict.fromkeys(str((folder / RESUMABLE[s].state_file).relative_to(output_dir))
                          for folder, s, _ in states)
        )  # fmt: skip
        raise ConfigError(
            f"--resume: nothing to resume in {output_dir} (no {files}); run without --resume "
            "to start"
        )
    if "meta_train" in sections:
        finished_meta_train(cfg, output_dir)


def can_resume(cfg: PipelineConfig, sections: Sequence[str]) -> bool:
    """Whether ``--resume`` would continue ``sections`` of ``cfg`` now: :func:`check_resume`
    passes on its output folder (a resumable section saved its state there)."""
    try:
        check_resume(cfg, sections, Path(cfg.output_dir).resolve())
    except ConfigError:
        return False
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
        its status is set on exit as :meth:`Session.parent_run`'s (a stage FINISHED before a
        resume stays FINISHED), and this run is active again."""
        import mlflow

        stages = self.state.get("stages", {})
        run_id = stages.get(name)
        was_finished = (
            run_id is not None and mlflow.MlflowClient().get_run(run_id).info.status == "FINISHED"
        )
        active = mlflow.start_run(run_id=run_id, run_name=None if run_id else name, nested=True)
        self.save(stages={**stages, name: active.info.run_id})
        with _status_on_exit(was_finished=was_finished):
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
        reused_meta_train: in a resumed session, the record of the meta-training that the
            interrupted invocation finished (:func:`finished_meta_train`), reused instead of
            run again (:meth:`reuse_meta_learner`); else None.
    """

    name: str
    output_dir: Path
    tracking_uri: str
    experiment: str
    experiment_id: str
    ray: RayConfig
    resume: bool = False
    allow_pickle: bool = False
    scope: str | None = None
    reused_meta_train: dict[str, Any] | None = None
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
            self._loaded[model_uri] = load_meta_learner(
                model_uri, kind, allow_pickle=self.allow_pickle
            )
        return self._loaded[model_uri]

    def reuse_meta_learner(self, record: dict[str, Any]) -> str:
        """Reuse the version that a finished meta-training registered (``record``,
        :func:`meta_train_record`): loaded by version, it is what every load of
        ``models:/NAME@ALIAS`` (its name and alias) gets in this session, even where the alias
        has moved since: the resumed sections go on with the meta-learner that the
        interrupted run's finished work used. Sets :attr:`reused_meta_train`.

        Returns the line that says so.

        Raises:
            ConfigError: that version cannot be loaded any more (one line).
        """
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        name, alias, version = record["registered_model"], record["alias"], record["version"]
        pinned = f"models:/{name}/{version}"
        try:
            self.meta_learner(pinned)
        except ConfigError as exc:
            raise ConfigError(
                f"--resume: the meta-learner {pinned} that the interrupted run registered "
                f"cannot be loaded ({exc}); run without --resume to meta-train again"
            ) from None
        self._loaded[f"models:/{name}@{alias}"] = self._loaded[pinned]
        self.reused_meta_train = record
        try:
            now = str(MlflowClient().get_model_version_by_alias(name, alias).version)
        except MlflowException:  # the alias was deleted
            now = None
        line = f"meta-train: reusing models:/{name} version {version} from the interrupted run"
        if now != version:
            where = "is no longer set" if now is None else f"now points at version {now}"
            line += f" (the alias @{alias} {where}; this run loads version {version} for it)"
        return line

    def saved_state(self, section: str) -> dict[str, Any] | None:
        """The saved state of a resumable section when the session resumes (checked before
        Ray started, :func:`check_resume`), else None."""
        if not self.resume:
            return None
        path = self.output_dir / RESUMABLE[section].state_file
        return json.loads(path.read_text()) if path.exists() else None

    @contextlib.contextmanager
    def parent_run(
        self,
        stage: str,
        *,
        params: dict[str, Any] | None = None,
        state_file: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> Iterator[ParentRun]:
        """Open the parent MLflow run ``{stage}/{name}`` (module docstring), or, inside another
        parent run (a stage of a pipeline), the nested run ``{stage}`` (``{stage}/{scope}``
        in a scoped session).

        Args:
            stage: the command or stage (``pipeline``, ``compare``, ``study``).
            params: logged once, when the run is created (not again on resume).
            state_file: the resume state under ``output_dir`` (None: never resumed).
            config: the section's config (JSON form), saved in the state for the next
                ``--resume`` to compare (:func:`resume_state`).
        """
        import mlflow

        path = self.output_dir / state_file if state_file else None
        state: dict[str, Any] = {}
        if self.resume and path is not None and path.exists():
            state = json.loads(path.read_text())  # checked by check_resume
        resumed = "parent_run_id" in state
        was_finished = False
        if resumed:
            try:
                saved_run = mlflow.MlflowClient().get_run(state["parent_run_id"])
            except mlflow.exceptions.MlflowException:
                raise ConfigError(
                    f"--resume: the saved parent run {state['parent_run_id']} ({path}) is not in "
                    f"the tracking store {self.tracking_uri}; accepted: the store it was "
                    "created in (--tracking-uri)"
                ) from None
            was_finished = saved_run.info.status == "FINISHED"
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
        parent.save(parent_run_id=parent.run_id, **({"config": config} if config else {}))
        with _status_on_exit(was_finished=was_finished):
            if params and not resumed:
                mlflow.log_params(params)
            yield parent


@contextlib.contextmanager
def nested_run(*, was_finished: bool = False, **start_run_args: Any) -> Iterator[Any]:
    """``mlflow.start_run(nested=True, **start_run_args)`` (a run under the active one, e.g. a
    Ray Train run of a stage; a top-level run when none is active), yielding its
    ``ActiveRun``, and ended as the session's runs end (:func:`_status_on_exit`):
    ``FINISHED``, ``FAILED`` on an error, ``KILLED`` on Ctrl+C (MLflow's own context manager
    ends it ``FAILED`` on any exception, Ctrl+C included). ``was_finished``: a finished run
    reopened (``run_id``) to log more stays ``FINISHED`` whatever happens."""
    import mlflow

    run = mlflow.start_run(nested=True, **start_run_args)
    with _status_on_exit(was_finished=was_finished):
        yield run


@contextlib.contextmanager
def _status_on_exit(*, was_finished: bool = False) -> Iterator[None]:
    """End the active MLflow run on leaving the block: ``FINISHED``; ``FAILED`` on an error;
    ``KILLED`` on Ctrl+C, also for every run under it still RUNNING and any nested run the
    failure left active. ``was_finished``: the run was FINISHED before a resume and stays so.
    A store failure here is a warning line (the real error goes on)."""
    import mlflow

    active = mlflow.active_run()
    run_id, experiment_id = active.info.run_id, active.info.experiment_id
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            end_running_children(experiment_id, run_id, status)
        outcome = "FINISHED" if was_finished else status  # a finished run stays finished
        try:
            while (active := mlflow.active_run()) and active.info.run_id != run_id:
                mlflow.end_run(status)  # a nested run the failure left open
            mlflow.end_run(outcome)
        except Exception as exc:  # the store went away: say so, keep the real error
            print(
                f"raymeta: warning: could not set MLflow run {run_id} to {outcome} "
                f"({' '.join(str(exc).split())[:200]})",
                file=sys.stderr,
            )


def end_running_children(experiment_id: str, run_id: str, status: str) -> None:
    """Set every run under ``run_id`` (nested at any depth, by ``mlflow.parentRunId``) that is
    still RUNNING to ``status`` (``KILLED`` after Ctrl+C, ``FAILED`` after an error): trials
    and Ray Train runs that an interrupt or a failure cut short. A store failure is a warning."""
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        frontier = [run_id]
        while frontier:
            parent = frontier.pop()
            children = client.search_runs(
                [experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                max_results=50_000,
            )
            for child in children:
                frontier.append(child.info.run_id)
                if child.info.status == "RUNNING":
                    client.set_terminated(child.info.run_id, status)
    except Exception as exc:  # the store went away: the runs cannot be reached
        print(
            f"raymeta: warning: could not end the runs under {run_id} "
            f"({' '.join(str(exc).split())[:200]})",
            file=sys.stderr,
        )


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
        ConfigError: the output folder, the tracking store, a registry input, the sizes or the
            saved state do not fit (one line, before Ray starts; a remote cluster's sizes right
            after connecting).
        KeyboardInterrupt: Ctrl+C or SIGTERM (the Ray started here is shut down).
    """
    from raymeta.interrupts import sigterm_as_sigint
    from raymeta.tracking import resolve_tracking_uri, setup

    default_uri = resolve_tracking_uri(None)  # `raymeta ui`'s store (setup exports the new one)
    if resume:  # before the folder is created: a refused resume leaves nothing behind
        check_resume(cfg, sections, Path(cfg.output_dir).resolve())
    import ray  # after the resume check: a refused --resume needs neither Ray nor MLflow

    out = check_output_dir(cfg.output_dir)
    uri, experiment_id = setup(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    session = Session(
        cfg.name,
        out,
        uri,
        cfg.mlflow.experiment,
        experiment_id,
        cfg.ray,
        resume,
        cfg.mlflow.allow_pickle,
    )
    if resume and "meta_train" in sections:
        record = finished_meta_train(cfg, out)
        if record is not None:
            print(session.reuse_meta_learner(record))
    for model_uri, kind in registry_inputs(cfg, sections).items():
        session.meta_learner(model_uri, kind)
    local = not (ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if local:
        cpus, gpus, where = local_resources(cfg.ray)
        check_resources(cfg, sections, cpus, gpus, where)
    started = connect_ray(cfg.ray)
    with sigterm_as_sigint():  # after ray.init, which installs its own SIGTERM handler
        try:
            if not local:
                total = ray.cluster_resources()
                where = f"the Ray cluster at {ray.get_runtime_context().gcs_address}"
                check_resources(cfg, sections, total.get("CPU", 0.0), total.get("GPU", 0.0), where)
            yield session
        finally:
            if started:
                ray.shutdown()
    print(browse_hint(uri, default_uri))


def browse_hint(uri: str, default_uri: str) -> str:
    """The line a command ends with: how to browse the runs of the store ``uri`` with
    ``raymeta ui`` (with ``--tracking-uri`` unless ``uri`` is ``default_uri``, the store
    ``raymeta ui`` opens without it: ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``) or with
    ``mlflow ui``."""
    import shlex

    flag = "" if uri == default_uri else f" --tracking-uri {shlex.quote(uri)}"
    return (
        f"browse the runs: raymeta ui{flag}   (or: mlflow ui --backend-store-uri "
        f"{shlex.quote(uri)} --host 127.0.0.1)"
    )
