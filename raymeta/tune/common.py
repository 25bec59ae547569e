"""Ray Tune plumbing shared by the comparison and the transfer study: training one run spec in
a trial, resumable ``Tuner``s with per-trial resources and MLflow runs nested under a parent
run.

MLflow: the driver logs every trial (:func:`trial_runs_callback`), not the trials themselves
(a SQLite store takes one writer at a time). A trial puts what its run gets under the
:data:`MLFLOW_METRICS` key of each result (epoch metrics and the per-step curves of the epoch,
:mod:`raymeta.tracking`); the rest of a result (Ray Tune's bookkeeping such as ``pid``,
``timestamp``, ``time_*``, ``training_iteration`` and the ``config``) is never logged, and the
run's params are its run spec, logged once when the trial starts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LR_POINTS = 400  # LR curves are subsampled to this many points in the reported metrics
MLFLOW_METRICS = "mlflow_metrics"  # result key: the run's (key, value, step) points, as JSON


def train_trial(
    spec,
    report: Callable[[dict[str, Any]], None],
    *,
    meta_learner=None,
    use_gpu: bool = False,
    dead_run_is_result: bool = False,
    data=None,
) -> None:
    """Train the run ``spec`` (:mod:`raymeta.spec`) in this process (a Tune trial) and call
    ``report(metrics)`` every epoch (``tune.report``); NaN metrics (no validation split) are
    left out. Every report carries, under :data:`MLFLOW_METRICS`, the points the trial's MLflow
    run gets for the epoch (:func:`raymeta.tracking.epoch_points` and the per-step curves of
    :class:`raymeta.tracking.StepCurves`) as a JSON string, which Tune's own loggers skip.
    The last report also carries ``lrs`` (the per-step
    LR curve subsampled to at most about :data:`LR_POINTS` points, for the plots) and
    ``lr_stride_epochs`` (epochs between two of them).

    Args:
        meta_learner: the registered meta-learner ``spec`` names, loaded in the driver.
        use_gpu: train on the GPU the trial reserved (:func:`raymeta.train.device.resolve_device`).
        dead_run_is_result: a search trial: a run the dead-run guard stops
            (:mod:`raymeta.train.guard`) reports ``val_acc`` 0 and ``dead_run`` 1 as its last
            result and ends, so the search goes on (an Optuna trial that picked a deadly LR is
            a poor configuration, not a failure). Otherwise the one-line error propagates.
        data: the task's data when already loaded (e.g. without its test split); default
            loaded from ``spec.task``.

    Raises:
        DeadRunError, NonFiniteLossError: the run is dead and ``dead_run_is_result`` is False.
    """
    from raymeta.errors import DeadRunError, NonFiniteLossError
    from raymeta.tracking import StepCurves, epoch_points
    from raymeta.train.build import build_run
    from raymeta.train.device import resolve_device

    run = build_run(spec, resolve_device(use_gpu), meta_learner=meta_learner, data=data)
    epochs = spec.task.epochs
    curves = StepCurves(epochs * run.steps_per_epoch)

    def on_epoch_end(metrics, state, optimizer):
        out = {k: v for k, v in metrics.items() if v == v}
        out[MLFLOW_METRICS] = json.dumps(epoch_points(metrics) + curves.drain())
        if metrics["epoch"] == epochs:
            out |= lr_curve(state.lrs, run.steps_per_epoch)
        report(out)

    try:
        run.train(on_epoch_end=on_epoch_end, on_step=curves)
    except (DeadRunError, NonFiniteLossError) as exc:
        if not dead_run_is_result:
            raise
        print(f"[{spec.label}] stopped: {exc}", flush=True)
        points = [("dead_run", 1.0, 0), *curves.drain()]  # with its curves up to the stop
        report({"val_acc": 0.0, "dead_run": 1.0, MLFLOW_METRICS: json.dumps(points)})


def lr_curve(lrs: list[float], steps_per_epoch: int) -> dict[str, Any]:
    """The per-step LR curve ``lrs`` as a trial's last report carries it: ``lrs`` subsampled to
    at most about :data:`LR_POINTS` points and ``lr_stride_epochs`` (epochs between two)."""
    stride = max(1, len(lrs) // LR_POINTS)
    return {"lrs": lrs[::stride], "lr_stride_epochs": stride / steps_per_epoch}


@contextlib.contextmanager
def working_dir(path: Path):
    """Run the block in ``path`` (the study's output folder). A Ray job's driver starts in its
    uploaded working_dir, which Ray re-extracts when the driver connects, leaving the process
    in a removed directory where Tune's bookkeeping (``os.path.abspath``) fails; the old
    directory is restored afterwards only if it still exists."""
    try:
        old = os.getcwd()
    except FileNotFoundError:
        old = None
    os.chdir(path)
    try:
        yield
    finally:
        if old is not None:
            with contextlib.suppress(FileNotFoundError):
                os.chdir(old)


def progress_callback(label: str, total: int):
    """A Tune callback printing one line per finished trial (quiet under CI / RAYMETA_QUIET)."""
    from ray import tune

    from raymeta.console import progress_enabled

    class TrialProgress(tune.Callback):
        def __init__(self):
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            if not progress_enabled():
                return
            r = trial.last_result or {}
            shown = [
                f"{k} {100 * r[k]:.2f}%" for k in ("val_acc", "test_acc") if k in r and r[k] == r[k]
            ]
            print(
                f"[{label}] trial {self.done}/{total} finished after "
                f"{r.get('training_iteration', 0)} epoch(s): {', '.join(shown)}",
                flush=True,
            )

    return TrialProgress()


@dataclass
class TrialRun:
    """What a trial's MLflow run is called and carries: its name, flat tags
    (:func:`raymeta.tracking.run_tags`) and params (its run spec)."""

    name: str
    tags: dict[str, str]
    params: dict[str, str]

    @classmethod
    def of(
        cls, spec, stage: str, method: str, *, name: str | None = None, family: str | None = None
    ) -> TrialRun:
        """The run of ``spec`` in ``stage``, named ``<stage>/<method>/seed<k>`` unless
        ``name`` is given; ``family`` as :func:`raymeta.tracking.run_tags`."""
        from raymeta.tracking import as_params, run_name, run_tags

        return cls(
            name or run_name(stage, method, spec.task.seed),
            run_tags(spec, stage, method, family),
            as_params(spec.model_dump(mode="json")),
        )


def trial_runs_callback(
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    describe: Callable[[dict, int], TrialRun],
):
    """A Tune callback, in the driver, that gives every trial an MLflow run nested under
    ``parent_run_id``: created when the trial starts (name, tags and params from
    ``describe(trial.config, number)``, ``number`` counting the experiment's trials from 0
    in the order they start, plus the tag ``trial_id``), the
    :data:`MLFLOW_METRICS` points of every result logged in one ``log_batch``, ``wall_time_s``
    and the status set when it ends. A store outage never stops the experiment: the points are
    buffered and retried (:func:`raymeta.tracking.log_points`), one warning line is printed. Its trial -> run map is part of the experiment's saved
    state, so a restored experiment logs a resumed trial to the same run."""
    from ray import tune

    class TrialRuns(tune.Callback):
        def __init__(self):
            self.runs: dict[str, str] = {}  # trial id -> MLflow run id

        def on_trial_start(self, iteration, trials, trial, **info):
            from mlflow import MlflowClient
            from mlflow.entities import Param

            if trial.trial_id in self.runs:
                return
            run = describe(trial.config, len(self.runs))
            tags = {"mlflow.parentRunId": parent_run_id, "trial_id": trial.trial_id, **run.tags}
            client = MlflowClient(tracking_uri)
            created = client.create_run(experiment_id, run_name=run.name, tags=tags)
            params = [Param(k, v) for k, v in run.params.items()]
            client.log_batch(created.info.run_id, params=params)
            self.runs[trial.trial_id] = created.info.run_id

        def on_trial_result(self, iteration, trials, trial, result, **info):
            from raymeta.tracking import log_points

            points = json.loads(result.get(MLFLOW_METRICS, "[]"))
            log_points(tracking_uri, self.runs[trial.trial_id], points)

        def _end(self, trial, status: str) -> None:
            from mlflow import MlflowClient

            from raymeta.tracking import flush_metrics, log_points, warn_store_failure

            run_id = self.runs.get(trial.trial_id)
            if run_id is None:
                return
            wall = (trial.last_result or {}).get("time_total_s")
            if wall is not None:
                log_points(tracking_uri, run_id, [("wall_time_s", float(wall), 0)])
            flush_metrics(tracking_uri, run_id, final=True)  # what an MLflow outage held back
            try:
                MlflowClient(tracking_uri).set_terminated(run_id, status)
            except Exception as exc:  # any store failure: the study goes on
                warn_store_failure(f"could not end MLflow run {run_id} as {status}", exc)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, "FAILED")

        def get_state(self) -> dict | None:
            return {"runs": dict(self.runs)} if self.runs else None

        def set_state(self, state: dict) -> None:
            self.runs = dict(state["runs"])

    return TrialRuns()


def trial_dirname(trial) -> str:
    """Short trial folder names (Tune's default embeds the whole config)."""
    return f"trial_{trial.trial_id}"


def saved_state_is_intact(path: Path) -> bool:
    """Whether the newest saved state of the Tune experiment at ``path`` can be restored.

    Tune writes ``experiment_state-<time>.json`` and ``searcher-state-<time>.pkl`` in place, not
    atomically: a driver killed during the write (likely when it is killed right after a trial
    finishes, since that is when the state is saved) leaves them empty or cut short, and a
    restore from them silently forgets the finished trials and the searcher's history.
    """
    states = sorted(path.glob("experiment_state-*.json"))  # names sort by save time
    if not states:
        return False
    try:
        if (path / "tuner.pkl").stat().st_size == 0:  # the Tuner's own pickle, emptied
            return False
        json.loads(states[-1].read_text())
        stamp = states[-1].stem.removeprefix("experiment_state-")
        # the searcher's and search generator's state of the same save (pickles)
        return all(f.stat().st_size > 0 for f in path.glob(f"*-{stamp}.*"))
    except (OSError, ValueError):
        return False


def make_tuner(
    name: str,
    trainable,
    *,
    tune_dir: Path,
    resume: bool,
    param_space: dict,
    tune_config,
    resources: dict[str, float],
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    describe: Callable[[dict, int], TrialRun],
    total: int,
    stop: dict[str, Any] | None = None,
):
    """A ``Tuner`` whose state lives in ``tune_dir/name``: restored (finished trials kept,
    unfinished and errored ones re-run) when ``resume`` and a state exists, else new; a state
    left truncated by a kill (:func:`saved_state_is_intact`) is discarded and the stage rerun. Every
    trial is an MLflow run nested under ``parent_run_id``, named, tagged and with params as
    ``describe(config, number)`` says (:func:`trial_runs_callback`; the params are logged once,
    at the trial's first start: PBT and PB2 restart a trial with a mutated config, whose values
    its run gets as per-step and per-epoch metrics); a progress line is printed as each of the
    ``total`` trials finishes; ``stop``: Tune's stopping criteria (checked before the scheduler
    sees a result)."""
    from ray import tune

    # quiet driver output: no progress tables and no per-result INFO lines (MLflow has it all)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "5")  # MLflow logging of a result takes ~1 s
    # save the experiment (and the searcher) state at every step, so that a study killed at any
    # point resumes with its searcher and trial budget intact
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    path = tune_dir / name
    trainable = tune.with_resources(trainable, resources)
    if resume and tune.Tuner.can_restore(str(path)):
        problem = None if saved_state_is_intact(path) else "is truncated"
        if problem is None:
            try:
                return tune.Tuner.restore(
                    str(path), trainable, resume_unfinished=True, resume_errored=True
                )
            except (EOFError, pickle.UnpicklingError, ValueError, TypeError, OSError) as exc:
                problem = (
                    f"cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:80]})"
                )
        # seeded searchers suggest the same trials again: the rerun chooses what the lost
        # run would have chosen, at the cost of repeating its finished trials
        print(
            f"{name}: the saved Tune state in {path} {problem} (a kill while writing it, or a "
            "damaged file); running this stage again from the start",
            flush=True,
        )
        shutil.rmtree(path)
    callback = trial_runs_callback(tracking_uri, experiment_id, parent_run_id, describe)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(tune_dir),
            callbacks=[callback, progress_callback(name, total)],
            stop=stop,
            verbose=0,
        ),
    )
