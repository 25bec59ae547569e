"""The MFM design search (the ``mfm_search`` section; docs/mfm.md, "How the defaults were
chosen"): raymeta's own Ray Tune + Optuna search over MFM's design space, on a development
long-tailed task, selecting on a balanced validation split carved from its training data.

1. **Trials.** For each variant a default is chosen for (:data:`VARIANT_GROUPS`: ``direct``;
   ``network``, with or without the class-frequency statistic), its own ``OptunaSearch``
   (seeded TPE, define-by-run over :class:`~raymeta.config.MFMDesignSpace` restricted to the
   variant's parameterisations: the modulation sites, the base loss, the meta objective,
   ``meta_every`` categorical, the meta LR log-uniform) proposes ``trials_per_variant``
   configurations, so no variant's default rests on the few trials one shared search
   happened to give it. Each trains MFM on the development task under the section's schedule
   as a Tune function trainable (:func:`raymeta.tune.common.train_trial`, through
   :func:`raymeta.train.build.build_run` and the one training loop) and reports the
   validation accuracy every epoch; optional ASHA stops weak trials early. A trial never sees
   the test split: its data are loaded without it, so no test number exists to look at.
2. **Confirmation.** The ``confirm_top`` best trials of each variant and the baselines are
   re-trained ``repeats`` times over seeds and class orders (:func:`repeat_task`), one Tune
   grid; the baselines show whether the chosen MFM beats them *on validation* (never used to
   choose).
3. **Choice** (:func:`choose`). Per variant, the configuration with the highest final
   validation accuracy: the mean over the repeats of its confirmed candidates (with
   ``confirm_top: 0``, its best trial's single run) is that variant's chosen configuration:
   the values that :data:`raymeta.meta.methods.MFM_DEFAULTS` takes.
4. **Records.** One parent MLflow run ``mfm-search/{name}``, a nested run per trial and per
   confirmation run (Tune's MLflow callback), the chosen configurations as params and as
   ``mfm_design_choice.json``, the trials as ``mfm_search_trials.{parquet,md}``, the
   confirmation (one row per candidate or baseline: mean, std and per-repeat validation
   accuracy) as ``mfm_search_confirmation.{parquet,md}``.
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
#: a variant a default is chosen for -> the ``modulation`` choices it covers
VARIANT_GROUPS: dict[str, tuple[str, ...]] = {
    "direct": ("direct",),
    "network": ("network", "network+class_statistics"),
}
#: the design choices sampled as categoricals, in sampling order
CATEGORICAL = ("modulation", "sites", "base_loss", "meta_objective", "meta_every")
DESIGN = (*CATEGORICAL, "meta_lr")


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


def repeat_task(task: LongTailTaskConfig, k: int) -> LongTailTaskConfig:
    """The development task of repeat ``k`` of the confirmation: training seed
    ``task.seed + k`` and, when the class order is fixed, ``task.order_seed + k`` (repeat 0 is
    the task itself)."""
    order = None if task.order_seed is None else task.order_seed + k
    return task.model_copy(update={"seed": task.seed + k, "order_seed": order})


def _trial_spec(config: dict[str, Any]):
    """The run of one Tune trial on the development task: a sampled MFM configuration (the
    design choices in ``config``), or a confirmation run (``candidate``: ``{"design": ...}``
    or ``{"baseline": ...}``, on repeat ``repeat``)."""
    trial = config["trial"]
    candidate = config.get("candidate", {"design": config})
    if "baseline" in candidate:
        method = LongTailMethodConfig(**candidate["baseline"])
    else:
        method = design_method(candidate["design"])
    task = repeat_task(LongTailTaskConfig(**trial["task"]), config.get("repeat", 0))
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
    """The MLflow run of trial ``number``: ``mfm-search/<method>/trial<number>``; of a
    confirmation run: ``mfm-search/<method>/<candidate>/seed<k>`` (``candidate`` the confirmed
    trial's id, or ``baseline``)."""
    from raymeta.tune.common import TrialRun

    spec = _trial_spec(config)
    name = f"mfm-search/{spec.label}/trial{number}"
    if "candidate" in config:
        which = config["candidate"].get("design", {}).get("trial_id", "baseline")
        name = f"mfm-search/{spec.label}/{which}/seed{spec.task.seed}"
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
    """The chosen configuration of each variant: the row with the highest ``val_acc`` among
    those that ran ``epochs`` epochs (all of the variant's rows when none did). A tie (the same
    number of validation images right: equal to 6 decimals) goes to the cheaper configuration,
    the larger ``meta_every`` (fewer look-ahead steps), then to the smaller ``val_acc_std``.

    Args:
        trials: one row per trial, or per confirmed candidate (:func:`confirmed`): the design
            choices, ``val_acc`` (after the last epoch; a candidate's mean over the repeats),
            ``epochs`` (epochs it ran; a candidate's fewest), ``trial_id``.

    Returns:
        ``{"direct": ..., "network": ...}`` (the network covers both parameterisations; a
        variant with no row is absent), each ``{"method", "params", "val_acc", "trial"}``.
    """
    out = {}
    for name, mine in _by_variant(trials):
        full = mine[mine["epochs"] >= epochs]
        pool = (full if not full.empty else mine).assign(
            _acc=lambda d: d["val_acc"].astype(float).round(6),
            _every=lambda d: d["meta_every"].astype(float),
            _std=lambda d: d["val_acc_std"].astype(float) if "val_acc_std" in d else 0.0,
        )
        order = pool.sort_values(["_acc", "_every", "_std"], ascending=[False, False, True])
        row = mine.loc[order.index[0]]
        method = design_method(row.to_dict())
        out[name] = {
            "method": method.method,
            "params": method.params,
            "val_acc": float(row["val_acc"]),
            "trial": row["trial_id"],
        }
    return out


def _by_variant(trials: pd.DataFrame):
    """(variant, its rows) for each variant of :data:`VARIANT_GROUPS` with rows."""
    for name, members in VARIANT_GROUPS.items():
        mine = trials[trials["modulation"].isin(members)]
        if not mine.empty:
            yield name, mine


def top_trials(trials: pd.DataFrame, k: int, epochs: int) -> list[dict[str, Any]]:
    """The ``k`` trials of each variant with the highest final validation accuracy, among
    those that ran ``epochs`` epochs (all of the variant's trials when none did): their design
    choices and ``trial_id`` (plain Python
    values), best first within each variant."""
    out = []
    for _, mine in _by_variant(trials):
        full = mine[mine["epochs"] >= epochs]
        pool = full if not full.empty else mine
        for row in pool.sort_values("val_acc", ascending=False).head(k).itertuples():
            design = {d: getattr(row, d) for d in DESIGN} | {"trial_id": row.trial_id}
            out.append(json.loads(pd.Series(design).to_json()))
    return out


def confirmed(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per confirmation candidate or baseline from its runs (one per repeat):
    ``method`` (its label), ``baseline``, the design choices and ``trial_id`` (the confirmed
    trial's; None for a baseline),
    ``val_acc`` (mean over the repeats), ``val_acc_std`` (sample std), ``epochs`` (fewest
    run), ``val_per_repeat`` (text: the validation accuracies in percent, ``a / b / ...``, in
    repeat order), ``repeats``."""
    rows = []
    for _, group in runs.groupby("candidate", sort=False):
        group = group.sort_values("repeat")
        acc = group["val_acc"].astype(float)
        first = group.iloc[0]
        rows.append(
            {
                "method": first["method"],
                "baseline": bool(first["baseline"]),
                **{d: first.get(d) for d in DESIGN},
                "trial_id": None if first["baseline"] else first["trial_id"],
                "val_acc": acc.mean(),
                "val_acc_std": acc.std(),
                "epochs": int(group["epochs"].min()),
                "val_per_repeat": " / ".join(f"{100 * a:.2f}" for a in acc),
                "repeats": len(group),
            }
        )
    return pd.DataFrame(rows)


def _rows(grid, fields) -> list[dict[str, Any]]:
    """One row per finished trial of ``grid``: its results and ``fields(config)``."""
    rows = []
    for r in grid:
        if r.error is not None:
            raise RuntimeError(f"an MFM design-search trial failed: {r.error}")
        m = r.metrics
        rows.append(
            {
                "trial_id": r.metrics.get("trial_id", ""),
                "val_acc": m.get("val_acc", float("nan")),
                "best_val_acc": float(r.metrics_dataframe["val_acc"].max()),
                "epochs": int(m.get("training_iteration", 0)),
                "dead_run": bool(m.get("dead_run", 0)),
                "wall_s": m.get("time_total_s", float("nan")),
                **fields(r.config),  # a confirmed candidate's trial_id: its trial's
            }
        )
    return rows


def _design_fields(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in DESIGN}


def _confirmation_fields(config: dict[str, Any]) -> dict[str, Any]:
    candidate = config["candidate"]
    design = candidate.get("design", {})
    method = _trial_spec(config).label
    kind = {"baseline": "baseline" in candidate}
    return (
        {"candidate": candidate["id"], "repeat": config["repeat"], "method": method} | kind | design
    )


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
    space = s.space.model_dump(mode="json")
    params = as_params(
        {"task": s.task.model_dump(mode="json"), "space": space}
        | {"trials_per_variant": s.trials_per_variant, "seed": s.seed}
        | {"confirm_top": s.confirm_top, "repeats": s.repeats, "grace_period": s.grace_period}
        | {"schedule": s.schedule.model_dump(mode="json")}
    )
    t0 = time.perf_counter()
    with session.parent_run("mfm-search", params=params, state_file=STATE_FILE) as parent:

        def fit(name: str, tune_config, total: int, param_space=None):
            tuner = make_tuner(
                name,
                _trainable,
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
            with working_dir(session.output_dir):
                return fit_tuner(tuner, total)

        epochs = s.task.epochs
        frames = []
        for variant, members in VARIANT_GROUPS.items():
            modulation = [m for m in space["modulation"] if m in members]
            if not modulation:
                continue
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
                DesignSpace(space | {"modulation": modulation}, constants),
                metric="val_acc",
                mode="max",
                seed=s.seed,
            )
            stage(
                f"mfm_search: {s.trials_per_variant} design trials of MFM ({variant}) on "
                f"{s.task.dataset}-LT IF {s.task.imbalance_factor:g} ({s.max_concurrent} at "
                f"once), scored on {s.task.val_per_class} validation images per class"
            )
            grid = fit(
                f"mfm-design-search-{variant}",
                tune.TuneConfig(
                    reuse_actors=True,
                    search_alg=searcher,
                    scheduler=scheduler,
                    num_samples=s.trials_per_variant,
                    trial_dirname_creator=trial_dirname,
                    max_concurrent_trials=s.max_concurrent,
                ),
                s.trials_per_variant,
            )
            frames.append(pd.DataFrame(_rows(grid, _design_fields)))
        trials = pd.concat(frames, ignore_index=True)
        candidates = [{"design": d} for d in top_trials(trials, s.confirm_top, epochs)]
        candidates += [{"baseline": b.model_dump(mode="json")} for b in s.baselines]
        candidates = [c | {"id": i} for i, c in enumerate(candidates)]
        confirmation = pd.DataFrame()
        if candidates:
            total = len(candidates) * s.repeats
            stage(
                f"mfm_search: confirmation, {s.confirm_top} best trial(s) per variant and "
                f"{len(s.baselines)} baseline(s), {s.repeats} seed(s) and class order(s) each"
            )
            grid = fit(
                "mfm-search-confirmation",
                tune.TuneConfig(
                    reuse_actors=True,
                    max_concurrent_trials=s.max_concurrent,
                    trial_dirname_creator=trial_dirname,
                ),
                total,
                param_space={
                    "candidate": tune.grid_search(candidates),
                    "repeat": tune.grid_search(list(range(s.repeats))),
                    "trial": constants,
                },
            )
            confirmation = confirmed(pd.DataFrame(_rows(grid, _confirmation_fields)))
        is_baseline = confirmation.get("baseline", pd.Series(dtype=bool))
        designs = confirmation[~is_baseline] if s.confirm_top else trials
        chosen = choose(designs, epochs)
        baselines = confirmation[is_baseline]
        wall = time.perf_counter() - t0
        record = {
            "chosen": chosen,
            "baselines_val_acc": {r.method: r.val_acc for r in baselines.itertuples()},
            "task": s.task.model_dump(mode="json"),
            "trials": len(trials),
            "confirmed": len(designs) if s.confirm_top else 0,
            "repeats": s.repeats,
            "wall_s": wall,
            "parent_run_id": parent.run_id,
        }
        out = session.output_dir
        (out / CHOICE_FILE).write_text(json.dumps(record, indent=1))
        table = trials.sort_values("val_acc", ascending=False)
        paths = [*write_table(table, out, "mfm_search_trials"), out / CHOICE_FILE]
        if not confirmation.empty:
            confirmation = confirmation.sort_values("val_acc", ascending=False)
            paths += write_table(confirmation, out, "mfm_search_confirmation")
        for path in paths:
            mlflow.log_artifact(str(path))
        for variant, info in chosen.items():
            mlflow.log_params(as_params({f"chosen.{variant}": info["params"]}))
            mlflow.log_metric(f"chosen_val_acc.{variant}", info["val_acc"])
        for row in baselines.itertuples():
            mlflow.log_metric(f"baseline_val_acc.{row.method.replace(' ', '_')}", row.val_acc)
        mlflow.log_metric("mfm_search_wall_time_s", wall)
    print("\n" + to_markdown(table) + "\n")
    if not confirmation.empty:
        shown = ["method", *DESIGN, "val_acc", "val_acc_std", "repeats"]
        print(to_markdown(confirmation[shown]) + "\n")
    for variant, info in chosen.items():
        print(f"chosen {variant}: {info['params']} (validation accuracy {info['val_acc']:.2%})")
    print(f"results in {out}; MLflow parent run {parent.run_id} in {session.tracking_uri}")
    return table
