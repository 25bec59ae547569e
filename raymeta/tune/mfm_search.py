"""The MFM design search (the ``mfm_search`` section; docs/mfm.md, "How the defaults were
chosen"): raymeta's own Ray Tune + Optuna search over MFM's design space, on a development
long-tailed task, selecting on a balanced validation split carved from its training data.

1. **Trials.** ``OptunaSearch`` (seeded TPE, define-by-run over
   :class:`~raymeta.config.MFMDesignSpace`: the parameterisation, the modulation sites, the
   base loss, the meta objective, ``meta_every`` categorical, the meta LR log-uniform) proposes
   ``trials`` configurations; each trains MFM on the development task under the section's
   schedule as a Tune function trainable (:func:`raymeta.tune.common.train_trial`, through
   :func:`raymeta.train.build.build_run` and the one training loop) and reports the validation
   accuracy every epoch; optional ASHA stops weak trials early. A trial never sees the test
   split: its data are loaded without it, so no test number exists to look at.
2. **Baselines** (optional): plain long-tailed methods trained once each on the same task, so
   the table shows whether the chosen MFM beats them *on validation* (never used to choose).
3. **Choice.** Per variant (``direct``; ``network``, with or without the class-frequency
   statistic), the trial with the highest validation accuracy after the last epoch (among the
   trials that ran every epoch) is that variant's chosen configuration: the values that
   :data:`raymeta.meta.methods.MFM_DEFAULTS` takes.
4. **Records.** One parent MLflow run ``mfm-search/{name}``, a nested run per trial (Tune's
   MLflow callback) and per baseline, the chosen configurations as params and as
   ``mfm_design_choice.json``, the trials as ``mfm_search_trials.{parquet,md}``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pandas as pd

from raymeta.config import (
    LongTailMethodConfig,
    LongTailTaskConfig,
    MethodConfig,
    MFMSearchConfig,
    PipelineConfig,
)
from raymeta.console import stage
from raymeta.report import to_markdown, write_table
from raymeta.session import Session
from raymeta.spec import longtail_run

STATE_FILE = "mfm_search_state.json"
CHOICE_FILE = "mfm_design_choice.json"

#: a value of the ``modulation`` design choice -> (method, its parameters)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "direct": ("mfm_direct", {}),
    "network": ("mfm_network", {"class_statistics": False}),
    "network+class_statistics": ("mfm_network", {"class_statistics": True}),
}
#: the design choices sampled as categoricals, in sampling order
CATEGORICAL = ("modulation", "sites", "base_loss", "meta_objective", "meta_every")


class DesignSpace:
    """Optuna define-by-run space over an :class:`~raymeta.config.MFMDesignSpace` (its
    ``model_dump``); picklable, so Tune saves the searcher for ``--resume``. Returns
    ``constants`` (passed to the trainable under ``trial``)."""

    def __init__(self, space: dict[str, Any], constants: dict[str, Any]):
        self.space, self.constants = space, constants

    def __call__(self, trial) -> dict[str, Any]:
        for name in CATEGORICAL:
            trial.suggest_categorical(name, list(self.space[name]))
        low, high = self.space["meta_lr"]
        trial.suggest_float("meta_lr", float(low), float(high), log=True)
        return {"trial": self.constants}


def design_method(sampled: dict[str, Any]) -> LongTailMethodConfig:
    """The MFM method of one sampled configuration (``modulation``, ``sites``, ``base_loss``,
    ``meta_objective``, ``meta_every``, ``meta_lr``)."""
    method, extra = VARIANTS[sampled["modulation"]]
    params = {
        "sites": sampled["sites"],
        "base_loss": sampled["base_loss"],
        "meta_objective": sampled["meta_objective"],
        "meta_every": int(sampled["meta_every"]),
        "meta_lr": float(sampled["meta_lr"]),
        **extra,
    }
    return LongTailMethodConfig(method=method, params=params)


def _spec(method: LongTailMethodConfig, task: LongTailTaskConfig, schedule, batch: int):
    spec = longtail_run(method, task, MethodConfig(**schedule), method.label)
    return spec.model_copy(update={"meta_batch_size": batch})


def _without_test(task: LongTailTaskConfig):
    """The task's data with an empty test split (a search trial never evaluates on it)."""
    from raymeta.train.loop import load_task_data

    data = load_task_data(task)
    return dataclasses.replace(data, test_x=data.test_x[:0], test_y=data.test_y[:0])


def _trial_spec(config: dict[str, Any]):
    """The run of one Tune trial: a sampled MFM configuration, or (``baseline`` in
    ``config``) one baseline, on the development task."""
    trial = config["trial"]
    if "baseline" in config:
        method = LongTailMethodConfig(**config["baseline"])
    else:
        method = design_method(config)
    task = LongTailTaskConfig(**trial["task"])
    return _spec(method, task, trial["schedule"], trial["meta_batch_size"])


def _trainable(config: dict[str, Any]) -> None:
    """One Tune trial (:func:`_trial_spec`), trained without the task's test split."""
    import torch
    from ray import tune

    from raymeta.tune.common import train_trial

    torch.set_num_threads(config["trial"]["threads"])
    spec = _trial_spec(config)
    train_trial(spec, tune.report, data=_without_test(spec.task), dead_run_is_result=True)


def _describe(config: dict[str, Any], number: int):
    """The MLflow run of trial ``number``: ``mfm-search/<method>/trial<number>``."""
    from raymeta.tune.common import TrialRun

    spec = _trial_spec(config)
    name = f"mfm-search/{spec.label}/trial{number}"
    return TrialRun.of(spec, "mfm-search", spec.label, name=name, family=spec.schedule.family)


def check_mfm_search(cfg: MFMSearchConfig) -> None:
    """Every data-dependent value of the search, in the driver before Ray starts: the task's
    splits and batches, and every (parameterisation, sites) and base loss of the space built
    once on the CPU.

    Raises:
        ConfigError, DataNotFoundError: one line naming the value.
    """
    from raymeta.errors import ConfigError
    from raymeta.train.build import build_run
    from raymeta.train.loop import check_batches

    data = _without_test(cfg.task)
    check_batches(len(data.train_y), cfg.task.batch_size, 1, cfg.meta_batch_size)
    if cfg.meta_batch_size > len(data.meta_y):
        raise ConfigError(
            f"meta_batch_size={cfg.meta_batch_size} is larger than the meta set "
            f"({len(data.meta_y)} images); accepted: <= {len(data.meta_y)}"
        )
    space = cfg.space
    first = {k: getattr(space, k)[0] for k in CATEGORICAL} | {"meta_lr": space.meta_lr[0]}
    choices = [first | {"modulation": m, "sites": s} for m in space.modulation for s in space.sites]
    choices += [first | {"base_loss": b} for b in space.base_loss[1:]]
    methods = [design_method(c) for c in choices] + list(cfg.baselines)
    schedule = cfg.schedule.model_dump()
    for method in methods:
        try:
            build_run(_spec(method, cfg.task, schedule, cfg.meta_batch_size), data=data)
        except ConfigError as exc:
            raise ConfigError(f"mfm_search: {method.label} ({method.params}): {exc}") from None


def choose(trials: pd.DataFrame, epochs: int) -> dict[str, dict[str, Any]]:
    """The chosen configuration of each variant: the trial with the highest final validation
    accuracy among those that ran ``epochs`` epochs (all of the variant's trials when none
    did).

    Args:
        trials: one row per trial: the sampled design choices, ``val_acc`` (after its last
            epoch), ``epochs`` (epochs it ran).

    Returns:
        ``{"direct": ..., "network": ...}`` (the network covers both parameterisations; a
        variant with no trial is absent), each ``{"method", "params", "val_acc", "trial"}``.
    """
    out = {}
    variant = trials["modulation"].str.partition("+")[0]
    for name in ("direct", "network"):
        mine = trials[variant == name]
        if mine.empty:
            continue
        full = mine[mine["epochs"] >= epochs]
        best = (full if not full.empty else mine)["val_acc"].astype(float).idxmax()
        row = mine.loc[best]
        method = design_method(row.to_dict())
        out[name] = {
            "method": method.method,
            "params": method.params,
            "val_acc": float(row["val_acc"]),
            "trial": row["trial_id"],
        }
    return out


def _rows(grid, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        if r.error is not None:
            raise RuntimeError(f"an MFM design-search trial failed: {r.error}")
        m = r.metrics
        rows.append(
            {
                **{k: r.config[k] for k in keys},
                "val_acc": m.get("val_acc", float("nan")),
                "best_val_acc": float(r.metrics_dataframe["val_acc"].max()),
                "epochs": int(m.get("training_iteration", 0)),
                "dead_run": bool(m.get("dead_run", 0)),
                "wall_s": m.get("time_total_s", float("nan")),
                "trial_id": r.metrics.get("trial_id", ""),
            }
        )
    return rows


def run_mfm_search(cfg: PipelineConfig, session: Session) -> pd.DataFrame:
    """Run the ``mfm_search`` section in ``session`` (module docstring) under the parent run
    ``mfm-search/{name}``; returns the trials table (the chosen configurations are in
    ``output_dir/mfm_design_choice.json`` and the parent run).

    Raises:
        RuntimeError: a trial failed (not a dead run: that is a poor configuration, reported
            with validation accuracy 0).
    """
    import mlflow
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from raymeta.interrupts import fit_tuner
    from raymeta.tracking import as_params
    from raymeta.train.device import trial_resources
    from raymeta.tune.common import make_tuner, trial_dirname, working_dir

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = cfg.mfm_search
    constants = {
        "task": s.task.model_dump(mode="json"),
        "schedule": s.schedule.model_dump(mode="json"),
        "meta_batch_size": s.meta_batch_size,
        "threads": max(1, int(s.cpus_per_trial)),
    }
    params = as_params(
        {"task": s.task.model_dump(mode="json"), "space": s.space.model_dump(mode="json")}
        | {"trials": s.trials, "seed": s.seed, "grace_period": s.grace_period}
        | {"schedule": s.schedule.model_dump(mode="json")}
    )
    t0 = time.perf_counter()
    with session.parent_run("mfm-search", params=params, state_file=STATE_FILE) as parent:

        def tuner(name: str, trainable, tune_config, total: int, param_space=None):
            return make_tuner(
                name,
                trainable,
                tune_dir=session.tune_dir,
                resume=session.resume,
                param_space=param_space or {},
                tune_config=tune_config,
                resources=trial_resources(s.cpus_per_trial, 0.0),
                tracking_uri=session.tracking_uri,
                experiment_id=session.experiment_id,
                parent_run_id=parent.run_id,
                describe=_describe,
                total=total,
            )

        epochs = s.task.epochs
        scheduler = (
            ASHAScheduler(
                metric="val_acc",
                mode="max",
                time_attr="training_iteration",
                max_t=epochs,
                grace_period=min(s.grace_period, epochs),
                reduction_factor=s.reduction_factor,
            )
            if s.grace_period
            else FIFOScheduler()
        )
        searcher = OptunaSearch(
            DesignSpace(s.space.model_dump(mode="json"), constants),
            metric="val_acc",
            mode="max",
            seed=s.seed,
        )
        search = tuner(
            "mfm-design-search",
            _trainable,
            tune.TuneConfig(
                reuse_actors=True,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=s.trials,
                trial_dirname_creator=trial_dirname,
                max_concurrent_trials=s.max_concurrent,
            ),
            s.trials,
        )
        stage(
            f"mfm_search: {s.trials} MFM design trials on {s.task.dataset}-LT "
            f"IF {s.task.imbalance_factor:g} ({s.max_concurrent} at once), selected on "
            f"{s.task.val_per_class} validation images per class"
        )
        with working_dir(session.output_dir):
            grid = fit_tuner(search, s.trials)
        trials = pd.DataFrame(_rows(grid, (*CATEGORICAL, "meta_lr")))
        chosen = choose(trials, epochs)
        baselines = pd.DataFrame()
        if s.baselines:
            stage(f"mfm_search: {len(s.baselines)} baseline(s) on the same task, for reference")
            specs = [b.model_dump(mode="json") for b in s.baselines]
            base = tuner(
                "mfm-search-baselines",
                _trainable,
                tune.TuneConfig(
                    reuse_actors=True,
                    max_concurrent_trials=s.max_concurrent,
                    trial_dirname_creator=trial_dirname,
                ),
                len(specs),
                param_space={"baseline": tune.grid_search(specs), "trial": constants},
            )
            with working_dir(session.output_dir):
                rows = _rows(fit_tuner(base, len(specs)), ("baseline",))
            for row in rows:
                row["method"] = LongTailMethodConfig(**row.pop("baseline")).label
            baselines = pd.DataFrame(rows)
        wall = time.perf_counter() - t0
        record = {
            "chosen": chosen,
            "baselines_val_acc": {r.method: r.val_acc for r in baselines.itertuples()},
            "task": s.task.model_dump(mode="json"),
            "trials": len(trials),
            "wall_s": wall,
            "parent_run_id": parent.run_id,
        }
        out = session.output_dir
        (out / CHOICE_FILE).write_text(json.dumps(record, indent=1))
        table = trials.sort_values("val_acc", ascending=False)
        paths = [*write_table(table, out, "mfm_search_trials"), out / CHOICE_FILE]
        if not baselines.empty:
            paths += write_table(baselines, out, "mfm_search_baselines")
        for path in paths:
            mlflow.log_artifact(str(path))
        for variant, info in chosen.items():
            mlflow.log_params(as_params({f"chosen.{variant}": info["params"]}))
            mlflow.log_metric(f"chosen_val_acc.{variant}", info["val_acc"])
        for row in baselines.itertuples():
            mlflow.log_metric(f"baseline_val_acc.{row.method.replace(' ', '_')}", row.val_acc)
        mlflow.log_metric("mfm_search_wall_time_s", wall)
    print("\n" + to_markdown(table) + "\n")
    if not baselines.empty:
        print(to_markdown(baselines[["method", "val_acc", "epochs", "wall_s"]]) + "\n")
    for variant, info in chosen.items():
        print(f"chosen {variant}: {info['params']} (validation accuracy {info['val_acc']:.2%})")
    print(f"results in {out}; MLflow parent run {parent.run_id} in {session.tracking_uri}")
    return table
