"""Ray Tune plumbing shared by the comparison and the transfer study: training one run spec in
a trial, resumable ``Tuner``s with per-trial resources and MLflow runs nested under a parent
run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

LR_POINTS = 400  # LR curves are subsampled to this many points in the reported metrics


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
    left out. The last report also carries ``lrs`` (the per-step LR curve subsampled to at most
    about :data:`LR_POINTS` points) and ``lr_stride_epochs`` (epochs between two of them).

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
    from raymeta.train.build import build_run
    from raymeta.train.device import resolve_device

    run = build_run(spec, resolve_device(use_gpu), meta_learner=meta_learner, data=data)
    epochs = spec.task.epochs

    def on_epoch_end(metrics, state, optimizer):
        out = {k: v for k, v in metrics.items() if v == v}
        if metrics["epoch"] == epochs:
            stride = max(1, len(state.lrs) // LR_POINTS)
            out["lrs"] = state.lrs[::stride]
            out["lr_stride_epochs"] = stride / run.steps_per_epoch
        report(out)

    try:
        run.train(on_epoch_end=on_epoch_end)
    except (DeadRunError, NonFiniteLossError) as exc:
        if not dead_run_is_result:
            raise
        print(f"[{spec.label}] stopped: {exc}", flush=True)
        report({"val_acc": 0.0, "dead_run": 1.0})


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
    experiment: str,
    parent_run_id: str,
    total: int,
):
    """A ``Tuner`` whose state lives in ``tune_dir/name``: restored (finished trials kept,
    unfinished and errored ones re-run) when ``resume`` and a state exists, else new; a state
    left truncated by a kill (:func:`saved_state_is_intact`) is discarded and the stage rerun. Every
    trial is an MLflow run tagged as a child of ``parent_run_id`` (``MLflowLoggerCallback``);
    a progress line is printed as each of the ``total`` trials finishes."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

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
        if saved_state_is_intact(path):
            return tune.Tuner.restore(
                str(path), trainable, resume_unfinished=True, resume_errored=True
            )
        # seeded searchers suggest the same trials again: the rerun chooses what the lost
        # run would have chosen, at the cost of repeating its finished trials
        print(
            f"{name}: the saved Tune state in {path} is truncated (the driver was killed while "
            "writing it); running this stage again from the start",
            flush=True,
        )
        shutil.rmtree(path)
    callback = MLflowLoggerCallback(
        tracking_uri=tracking_uri,
        experiment_name=experiment,
        tags={"mlflow.parentRunId": parent_run_id, "raymeta.stage": name},
        save_artifact=False,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(tune_dir),
            callbacks=[callback, progress_callback(name, total)],
            verbose=0,
        ),
    )
