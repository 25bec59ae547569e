"""Compare learned and hand-designed LR schedules fairly (``raymeta compare FILE [--resume]``).

Protocol (docs/design.md section 6):

1. **Search**, per hand-designed family: a Ray Tune ``Tuner`` with ``OptunaSearch`` (TPE,
   seeded, define-by-run space with the family's conditional hyper-parameters,
   :mod:`raymeta.tune.spaces`) and ASHA early stopping on the validation accuracy; the same
   trial budget and epochs per trial for every family; trials are plain function trainables
   with per-trial resources, so several run at once. The online rows (``search.online``: PBT,
   PB2, :mod:`raymeta.tune.online`) train a population of as many members instead.
2. **Final runs**: the best configuration of every family (an online row: its best member's
   per-epoch policy, replayed) is re-trained with ``seeds`` seeds on
   train + validation and evaluated on the untouched test split, beside the learned schedules
   with the same seeds: MLR-SNet (Test), loaded from the MLflow registry by alias (no search,
   no meta-training on this task), and MLR-SNet (Train), meta-trained on this task's own
   training data with its meta set carved from the training split.
3. **Result**: a table per method (mean and std of test accuracy and loss over seeds, search
   trials, search compute in CPU- or GPU-seconds, wall time) as Parquet and Markdown, plots,
   and MLflow: the run ``compare`` (under the pipeline's run) holds one stage run per family
   searched, ``search/<family>`` (its trials ``search/<family>/trial<n>``, the best
   configuration and the search cost), one per online row, ``search/pbt`` or ``search/pb2``
   (its population members ``search/pbt/trial<n>``, the best policy and the cost; a
   member's params are its first LR and momentum, what the scheduler sets later are its
   per-step ``lr`` and per-epoch ``momentum``), and the stage run ``final`` (its runs
   ``final/<method>/seed<k>``). Every trial and final run has the flat tags ``stage``,
   ``method``, ``family``, ``seed`` and ``task``, its run spec as params, its epoch metrics
   (``test_acc``, ``val_acc``, ``lr_epoch_mean``, ...) and per-step ``lr`` and ``train_loss``:
   filter ``tags.stage = 'final'`` and chart ``lr`` or ``test_acc`` grouped by ``method``.

Every Tuner keeps its state under ``output_dir/tune``: ``--resume`` restores them
(``Tuner.restore``), so finished trials are never run again. A family is recorded as searched
(``compare_state.json``, key ``families``) only once its whole budget has run. A search is a
sequence of rounds (Tune experiments ``search-FAMILY``, ``search-FAMILY-2``, ...): a resume
with a larger ``trials_per_family`` adds a round with the missing trials, whose searcher is
told every earlier trial and result (a pre-filled Optuna study; its seed is ``seed + round -
1``, so it does not redraw the first round's random start-up points). Each round's wall time is
saved when it ends (or is interrupted), so a resumed table reports the time really spent.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from raymeta.config import MethodConfig, PipelineConfig, TaskConfig
from raymeta.console import stage
from raymeta.errors import ConfigError
from raymeta.report import plot_accuracy_curves, plot_lr_curves, to_markdown, write_table
from raymeta.session import RESUMABLE, ParentRun, Session
from raymeta.spec import HandRun, LearnedRun, RunSpec, meta_train_run, method_run
from raymeta.tune.common import TrialRun, make_tuner, train_trial, trial_dirname, working_dir
from raymeta.tune.online import (
    ONLINE_LABELS,
    PolicyReplay,
    best_policy,
    initial_population,
    member_run,
    parse_final_run,
    perturbations,
    policy_json,
    population_compute_s,
    replay_policy,
    scheduler,
    train_member,
)
from raymeta.tune.spaces import (
    DefineByRun,
    resolve_choices,
    resolve_online_ranges,
    resolve_ranges,
    to_method,
)

TRIAL_LOG = "trial_starts.jsonl"  # one line per trainable start: the resume test counts them
STATE_FILE = RESUMABLE["compare"].state_file


def _log_start(config: dict, entry: dict) -> None:
    from ray import tune

    with open(config["log"], "a") as f:
        f.write(json.dumps({"trial": tune.get_context().get_trial_id(), **entry}) + "\n")


def _search_spec(config: dict) -> RunSpec:
    """The run of a search trial (``config``: the sampled values and, under ``trial``, the
    family, the task and the trial's settings)."""
    trial = config["trial"]
    sampled = {k: v for k, v in config.items() if k != "trial"}
    return method_run(
        MethodConfig(**to_method(trial["family"], sampled)), TaskConfig(**trial["task"])
    )


def _search_trainable(config: dict) -> None:
    """Tune trial of the search: one sampled configuration of one family."""
    import torch
    from ray import tune

    trial = config["trial"]
    torch.set_num_threads(trial["threads"])
    _log_start(trial, {"family": trial["family"]})
    spec = _search_spec(config)
    train_trial(spec, tune.report, use_gpu=trial["use_gpu"], dead_run_is_result=True)


def _search_run(config: dict, number: int, first: int = 0) -> TrialRun:
    """The MLflow run of trial ``number`` of a search round whose trials are numbered from
    ``first`` (the trials of the family's earlier rounds): ``search/<family>/trial<n>``."""
    family = config["trial"]["family"]
    name = f"search/{family}/trial{first + number}"
    return TrialRun.of(_search_spec(config), "search", family, name=name, family=family)


def _online_trainable(config: dict) -> None:
    """Tune trial of PBT or PB2: one population member (``config``: its LR and momentum, which
    the scheduler mutates, and, under ``trial``, the method, the task and the trial's
    settings)."""
    import torch

    trial = config["trial"]
    torch.set_num_threads(trial["threads"])
    _log_start(trial, {"online": trial["method"]})
    train_member(
        TaskConfig(**trial["task"]),
        config,
        label=ONLINE_LABELS[trial["method"]],
        use_gpu=trial["use_gpu"],
        interval=trial["perturbation_interval"],
    )


def _online_run(config: dict, number: int) -> TrialRun:
    """The MLflow run of population member ``number`` of PBT or PB2:
    ``search/<pbt|pb2>/trial<number>``, method ``PBT``/``PB2``, family ``pbt``/``pb2``; its
    params are the member's first run (:func:`~raymeta.tune.online.member_run`: the LR and
    momentum it starts with), the ones the scheduler sets later are its per-step ``lr`` and
    per-epoch ``momentum``."""
    method = config["trial"]["method"]
    label = ONLINE_LABELS[method]
    spec = member_run(TaskConfig(**config["trial"]["task"]), config, label)
    name = f"search/{method}/trial{number}"
    return TrialRun.of(spec, "search", label, name=name, family=method)


def _final_run(config: dict, number: int) -> TrialRun:
    """The MLflow run of a final run: ``final/<method>/seed<k>``; a searched family's run has
    the family's name as its label (:meth:`Comparison.final_specs`), an online row's replay
    (:class:`~raymeta.tune.online.PolicyReplay`) has ``pbt`` or ``pb2`` as its family."""
    spec = parse_final_run(config["run"])
    if isinstance(spec, PolicyReplay):
        family = {label: name for name, label in ONLINE_LABELS.items()}[spec.label]
    else:
        family = spec.label if isinstance(spec, HandRun) else None
    return TrialRun.of(spec, "final", spec.label, family=family)


def _final_trainable(config: dict, meta_learners: dict[str, Any]) -> None:
    """Tune trial of the final runs: one (method, seed) on train + validation, test split;
    ``meta_learners``: the learned schedules' bundles by URI (loaded in the driver)."""
    import torch
    from ray import tune

    torch.set_num_threads(config["threads"])
    spec = parse_final_run(config["run"])
    _log_start(config, {"final": spec.label})
    if isinstance(spec, PolicyReplay):
        replay_policy(spec, use_gpu=config["use_gpu"])
        return
    meta_learner = meta_learners[spec.model_uri] if isinstance(spec, LearnedRun) else None
    train_trial(spec, tune.report, meta_learner=meta_learner, use_gpu=config["use_gpu"])


class Comparison:
    """One schedule comparison (the ``compare`` section of a pipeline)."""

    def __init__(self, cfg: PipelineConfig):
        if cfg.compare is None:
            raise ConfigError(f"{cfg.name}: the pipeline has no 'compare' section")
        self.cfg, self.cmp = cfg, cfg.compare
        s = self.cmp.search
        self.ranges = {
            fam: resolve_ranges(fam, s.ranges.get(fam), weight_decay=s.search_weight_decay)
            for fam in s.families
        }
        self.online_ranges = {
            method: resolve_online_ranges(
                method, s.ranges.get(method), momentum=s.momentum_choices is not None
            )
            for method in s.online
        }
        unknown = set(s.ranges) - set(s.families) - set(s.online)
        if unknown:
            raise ConfigError(f"search.ranges has families not searched: {sorted(unknown)}")
        pb2_momentum = self.online_ranges.get("pb2", {}).get("momentum")
        if self.cmp.task.nesterov and pb2_momentum and pb2_momentum[0] == 0:
            raise ConfigError(
                "search.ranges.pb2.momentum starts at 0 but task.nesterov is true (Nesterov "
                "needs momentum > 0); raise its low bound or set task.nesterov: false"
            )

    # -- validation before any trial ------------------------------------------------------
    def check_data(self) -> None:
        """Check the data, splits and batch sizes of every run before any trial starts."""
        from raymeta.train.loop import check_task

        check_task(self.cmp.task)
        check_task(self.final_task(0))
        if self.cmp.meta_train is not None:
            check_task(self.meta_task(0), 1, self.cmp.meta_train.meta_batch_size)

    def final_task(self, seed: int) -> TaskConfig:
        """Train + validation merged (no validation split), no meta set, seed ``seed``."""
        return self.cmp.task.model_copy(update={"val_size": 0, "meta_per_class": 0, "seed": seed})

    def meta_task(self, seed: int) -> TaskConfig:
        """MLR-SNet (Train): the meta set is carved from the training split."""
        return self.final_task(seed).model_copy(
            update={"meta_per_class": self.cmp.meta_train.meta_per_class}
        )

    def final_specs(
        self, best: dict[str, dict], online: dict[str, dict] | None = None
    ) -> list[RunSpec | PolicyReplay]:
        """The final runs, seed by seed: every searched family's best configuration, every
        online row's best policy (``online``: label -> :meth:`search_online`), every MLR-SNet
        (Test) and MLR-SNet (Train)."""
        specs: list[RunSpec | PolicyReplay] = []
        for seed in range(self.cmp.seeds):
            task = self.final_task(seed)
            for family, info in best.items():
                specs.append(method_run(MethodConfig(**info["method"]), task, family))
            for label, info in (online or {}).items():
                specs.append(PolicyReplay(label=label, task=task, policy=info["policy"]))
            specs += [method_run(m, task) for m in self.cmp.learned]
            if self.cmp.meta_train is not None:
                specs.append(
                    meta_train_run(self.cmp.meta_train, self.meta_task(seed), "MLR-SNet (Train)")
                )
        return specs

    # -- Ray Tune ------------------------------------------------------------------------
    def _tuner(self, session: Session, parent_run_id: str, name: str, trainable, **options):
        from raymeta.train.device import trial_resources

        s = self.cmp.search
        return make_tuner(
            name,
            trainable,
            tune_dir=session.tune_dir,
            resume=session.resume,
            resources=trial_resources(s.cpus_per_trial, s.gpus_per_trial),
            tracking_uri=session.tracking_uri,
            experiment_id=session.experiment_id,
            parent_run_id=parent_run_id,
            **options,
        )

    def _constants(self, session: Session) -> dict[str, Any]:
        """What every trial gets besides its run: threads, device and the start log."""
        from raymeta.train.device import trial_uses_gpu

        s = self.cmp.search
        return {
            "threads": max(1, int(s.cpus_per_trial)),
            "use_gpu": trial_uses_gpu(s.gpus_per_trial),
            "log": str(session.output_dir / TRIAL_LOG),
        }

    def _search_round(
        self,
        family: str,
        name: str,
        trials: int,
        round_index: int,
        history: list[tuple[dict, float]],
        session: Session,
        stage_run_id: str,
        first_trial: int,
    ):
        """One round of a family's search (a Tune experiment of ``trials`` trials; restored
        when it exists), its searcher told the ``history`` of (sampled, val_acc) pairs of the
        earlier rounds, its trials nested under the stage run ``stage_run_id`` and numbered
        from ``first_trial``; returns its ``ResultGrid``.

        Raises:
            KeyboardInterrupt: interrupted before all its trials ended.
            RuntimeError: a trial failed.
        """
        import optuna
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch

        from raymeta.interrupts import fit_tuner

        optuna.logging.set_verbosity(optuna.logging.WARNING)

        s = self.cmp.search
        trial = {
            "family": family,
            "task": self.cmp.task.model_dump(mode="json"),
            **self._constants(session),
        }
        space = DefineByRun(
            family,
            self.ranges[family],
            {"trial": trial},
            resolve_choices(family, s.momentum_choices),
        )
        storage = None
        if history:  # an Optuna study that already holds the earlier rounds' trials
            storage = optuna.storages.InMemoryStorage()
            study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
            distributions = space.distributions()
            for sampled, value in history:
                study.add_trial(
                    optuna.trial.create_trial(
                        params=sampled, distributions=distributions, value=value
                    )
                )
        searcher = OptunaSearch(
            space,
            metric="val_acc",
            mode="max",
            seed=s.seed + round_index - 1,
            storage=storage,
            study_name=name,
        )
        tune_config = tune.TuneConfig(
            reuse_actors=True,  # trials share resources: skip an actor start per trial
            search_alg=searcher,
            scheduler=ASHAScheduler(
                metric="val_acc",
                mode="max",
                time_attr="training_iteration",
                max_t=self.cmp.task.epochs,
                grace_period=min(s.grace_period, self.cmp.task.epochs),
                reduction_factor=s.reduction_factor,
            ),
            num_samples=trials,
            trial_dirname_creator=trial_dirname,
            max_concurrent_trials=s.max_concurrent,
        )
        tuner = self._tuner(
            session,
            stage_run_id,
            name,
            _search_trainable,
            param_space={},
            tune_config=tune_config,
            describe=functools.partial(_search_run, first=first_trial),
            total=trials,
        )
        with working_dir(session.output_dir):
            grid = fit_tuner(tuner, trials)
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} trial(s) of family {family} failed: {errors[0]}")
        return grid

    def search(self, family: str, session: Session, parent: ParentRun) -> dict[str, Any]:
        """Run (or resume) the family's search up to ``trials_per_family`` trials, round by
        round (module docstring), in the stage run ``search/<family>`` under ``parent`` (the
        comparison's run; its state records the rounds), which gets the best configuration and
        the costs (:func:`_log_search_summary`); returns them.

        Raises:
            KeyboardInterrupt: interrupted (the round's time so far is saved).
        """
        s = self.cmp.search
        with parent.stage(f"search/{family}") as stage_run_id:
            rounds = list(parent.state.get("rounds", {}).get(family, []))  # finished rounds
            grids = []
            done = 0
            for info in rounds:  # restored: their trials are not run again
                grids.append(
                    self._search_round(
                        family, info["name"], info["trials"], len(grids) + 1, [], session,
                        stage_run_id, done,
                    )
                )  # fmt: skip
                done += info["trials"]
            while done < s.trials_per_family:
                k = len(rounds) + 1
                name = f"search-{family}" if k == 1 else f"search-{family}-{k}"
                pending = parent.state.get("pending", {})
                info = pending.get(name) or {
                    "name": name,
                    "trials": s.trials_per_family - done,
                    "wall_s": 0.0,
                }
                parent.save(pending=pending | {name: info})
                history = [
                    ({k: v for k, v in r.config.items() if k != "trial"}, r.metrics["val_acc"])
                    for grid in grids
                    for r in grid
                    if "val_acc" in r.metrics
                ]
                stage(
                    f"compare: searching {family} ({info['trials']} trials, {s.max_concurrent} "
                    f"at once{f', round {k} after {done} trials' if k > 1 else ''})"
                )
                t0 = time.perf_counter()
                try:
                    grid = self._search_round(
                        family, name, info["trials"], k, history, session, stage_run_id, done
                    )
                finally:  # also when interrupted: a resumed table reports the time really spent
                    info = info | {"wall_s": info["wall_s"] + time.perf_counter() - t0}
                    parent.save(pending=parent.state.get("pending", {}) | {name: info})
                rounds.append(info)
                done += info["trials"]
                grids.append(grid)
                pending = {n: v for n, v in parent.state["pending"].items() if n != name}
                rounds_now = parent.state.get("rounds", {}) | {family: rounds}
                parent.save(pending=pending, rounds=rounds_now)
            results = [r for grid in grids for r in grid]
            best = max(
                (r for r in results if "val_acc" in r.metrics),
                key=lambda r: r.metrics_dataframe["val_acc"].max(),
            )
            sampled = {k: v for k, v in best.config.items() if k != "trial"}
            device = "gpu" if s.gpus_per_trial else "cpu"
            per_trial = s.gpus_per_trial or s.cpus_per_trial
            compute = sum(r.metrics.get("time_total_s", 0.0) for r in results) * per_trial
            info = {
                "method": to_method(family, sampled),
                "sampled": sampled,
                "best_config": _rounded_json(sampled),
                "best_val_acc": best.metrics_dataframe["val_acc"].max(),
                "trials": len(results),
                f"search_{device}_s": compute,
                "search_wall_s": sum(info["wall_s"] for info in rounds),
            }
            _log_search_summary(info)
        return info

    def search_online(self, method: str, session: Session, parent: ParentRun) -> dict[str, Any]:
        """Run (or resume) the online schedule learner ``method`` (``pbt`` or ``pb2``,
        :mod:`raymeta.tune.online`) in the stage run ``search/<method>`` under ``parent``: a
        population of ``trials_per_family`` members, each trained the task's epochs (Tune
        experiment ``online-<method>``; a resume with another population size trains a new
        population, ``online-<method>-<size>``); returns the best member's policy and the
        costs, which the stage run also gets (:func:`_log_search_summary`). Its wall time is
        saved when it ends or is interrupted.

        Raises:
            KeyboardInterrupt: interrupted before every member ended.
            RuntimeError: a member failed.
        """
        from ray import tune
        from ray.tune.search import BasicVariantGenerator

        from raymeta.interrupts import fit_tuner

        s, task = self.cmp.search, self.cmp.task
        ranges = self.online_ranges[method]
        trial = {
            "method": method,
            "task": task.model_dump(mode="json"),
            "perturbation_interval": s.perturbation_interval,
            **self._constants(session),
        }
        populations = parent.state.get("populations", {})  # method -> [experiment, size]
        name, size = populations.get(method, (f"online-{method}", s.trials_per_family))
        if size != s.trials_per_family:  # a population cannot grow: train a new one
            name, size = f"online-{method}-{s.trials_per_family}", s.trials_per_family
        parent.save(populations=populations | {method: [name, size]})
        label = ONLINE_LABELS[method]
        with parent.stage(f"search/{method}") as stage_run_id:
            tuner = self._tuner(
                session,
                stage_run_id,
                name,
                _online_trainable,
                param_space=initial_population(method, ranges, s.momentum_choices, task.momentum)
                | {"trial": trial},
                # no max_concurrent_trials: the scheduler needs the whole population; the
                # trials' resources limit how many train at once, and PBT time-shares the rest
                tune_config=tune.TuneConfig(
                    reuse_actors=True,
                    scheduler=scheduler(
                        method, ranges, s.momentum_choices, s.perturbation_interval
                    ),
                    search_alg=BasicVariantGenerator(random_state=s.seed),
                    num_samples=s.trials_per_family,
                    trial_dirname_creator=trial_dirname,
                ),
                describe=_online_run,
                total=s.trials_per_family,
                stop={"training_iteration": task.epochs},  # no perturbation after the last epoch
            )
            stage(
                f"compare: {label}, a population of {s.trials_per_family} trained {task.epochs} "
                f"epochs, perturbed every {s.perturbation_interval}"
            )
            walls = parent.state.get("online_wall_s", {})
            t0 = time.perf_counter()
            try:
                with working_dir(session.output_dir):
                    grid = fit_tuner(tuner, s.trials_per_family)
            finally:  # also when interrupted: a resumed table reports the time really spent
                wall = walls.get(name, 0.0) + time.perf_counter() - t0
                parent.save(online_wall_s=parent.state.get("online_wall_s", {}) | {name: wall})
            errors = [r.error for r in grid if r.error is not None]
            if errors:
                raise RuntimeError(f"{len(errors)} member(s) of {label} failed: {errors[0]}")
            best = grid.get_best_result(metric="val_acc", mode="max", scope="last")
            policy = best_policy(best, task.epochs)
            device = "gpu" if s.gpus_per_trial else "cpu"
            per_trial = s.gpus_per_trial or s.cpus_per_trial
            steps = perturbations(session.tune_dir / name)
            stage(
                f"compare: {label}: {len(steps)} exploit/explore steps; best policy "
                f"{policy_json(policy)}"
            )
            info = {
                "policy": policy,
                "best_config": policy_json(policy),
                "best_val_acc": best.metrics["val_acc"],
                "trials": len(grid),
                f"search_{device}_s": population_compute_s(grid) * per_trial,
                "search_wall_s": wall,
            }
            _log_search_summary(info)
        return info

    def final_runs(
        self,
        best: dict[str, dict],
        session: Session,
        parent: ParentRun,
        online: dict[str, dict] | None = None,
    ) -> pd.DataFrame:
        """Re-train every method with every seed in the stage run ``final`` under ``parent``
        (the comparison's run); returns one row per (method, seed). The Tune experiment is
        ``final`` (restored on resume); when a resume changed a family's best configuration
        (a larger budget), a new one ``final-2``, ... trains the new set.

        Raises:
            KeyboardInterrupt: interrupted before every run ended.
            RuntimeError: a run failed.
        """
        import mlflow
        from ray import tune

        from raymeta.interrupts import fit_tuner

        specs = self.final_specs(best, online)
        key = hashlib.sha1(
            json.dumps([spec.model_dump(mode="json") for spec in specs], sort_keys=True).encode()
        ).hexdigest()[:12]
        experiments = parent.state.get("finals", {})  # specs hash -> experiment name
        name = experiments.get(key) or (
            "final" if not experiments else f"final-{len(experiments) + 1}"
        )
        parent.save(finals=experiments | {key: name})
        with parent.stage("final") as stage_run_id:
            learned = {m.model_uri: session.meta_learner(m.model_uri)[0] for m in self.cmp.learned}
            tuner = self._tuner(
                session,
                stage_run_id,
                name,
                tune.with_parameters(_final_trainable, meta_learners=learned),
                param_space={
                    "run": tune.grid_search([spec.model_dump(mode="json") for spec in specs]),
                    **self._constants(session),
                },
                tune_config=tune.TuneConfig(
                    reuse_actors=True,  # trials share resources: skip an actor start per trial
                    max_concurrent_trials=self.cmp.search.max_concurrent,
                    trial_dirname_creator=trial_dirname,
                ),
                describe=_final_run,
                total=len(specs),
            )
            stage(f"compare: final runs, {len(specs)} (method, seed) pairs on train + validation")
            with working_dir(session.output_dir):
                grid = fit_tuner(tuner, len(specs))
            rows = []
            for r in grid:
                if r.error is not None:
                    raise RuntimeError(f"final run {r.config['run']['label']} failed: {r.error}")
                spec = parse_final_run(r.config["run"])
                rows.append(
                    {
                        "method": spec.label,
                        "seed": spec.task.seed,
                        "test_acc": r.metrics["test_acc"],
                        "test_loss": r.metrics["test_loss"],
                        "wall_time_s": r.metrics["time_total_s"],
                        "lrs": r.metrics["lrs"],
                        "lr_stride_epochs": r.metrics["lr_stride_epochs"],
                        "history": r.metrics_dataframe[["training_iteration", "test_acc"]].to_dict(
                            "records"
                        ),
                    }
                )
            finals = pd.DataFrame(rows)
            mlflow.log_param("runs", len(finals))
        return finals

    # -- the comparison -------------------------------------------------------------------
    def run(self, session: Session) -> pd.DataFrame:
        """Run (or, in a resumed session, resume) the whole comparison in ``session`` under
        its run ``compare`` (nested in the pipeline's run; module docstring); returns the
        per-method table."""

        versions = {m.label: session.meta_learner(m.model_uri)[1] for m in self.cmp.learned}
        params = {
            "families": self.cmp.search.families,
            "online": self.cmp.search.online,
            "trials_per_family": self.cmp.search.trials_per_family,
            "seeds": self.cmp.seeds,
            "task": self.cmp.task.model_dump_json(),
        }
        config = self.cmp.model_dump(mode="json")
        with session.parent_run(
            "compare", params=params, state_file=STATE_FILE, config=config
        ) as parent:
            best = {}
            for family in self.cmp.search.families:
                best[family] = self.search(family, session, parent)
                searched = parent.state.get("families", {})
                done = {"sampled": best[family]["sampled"], "trials": best[family]["trials"]}
                parent.save(families=searched | {family: done})
            online = {}
            for method in self.cmp.search.online:
                label = ONLINE_LABELS[method]
                online[label] = self.search_online(method, session, parent)
                parent.save(
                    online=parent.state.get("online", {}) | {label: online[label]["policy"]}
                )
            finals = self.final_runs(best, session, parent, online)
            table = self._table(best, online, finals, versions)
            self._artifacts(table, finals, session.output_dir)
        print("\n" + to_markdown(table) + "\n")
        print(f"results in {session.output_dir}; MLflow run {parent.run_id} (compare)")
        return table

    def _table(self, best, online, finals: pd.DataFrame, versions) -> pd.DataFrame:
        """One row per method, in the config's order (searched families, online rows, then the
        learned schedules), whatever order the trials ended in."""
        rows = []
        for label in dict.fromkeys(spec.label for spec in self.final_specs(best, online)):
            group = finals[finals["method"] == label]
            info = (best | online).get(label, {})
            rows.append(
                {
                    "method": label,
                    "test_acc_mean": group["test_acc"].mean(),
                    "test_acc_std": group["test_acc"].std(ddof=1) if len(group) > 1 else 0.0,
                    "test_loss_mean": group["test_loss"].mean(),
                    "test_loss_std": group["test_loss"].std(ddof=1) if len(group) > 1 else 0.0,
                    "seeds": len(group),
                    "search_trials": info.get("trials", 0),
                    "best_val_acc": info.get("best_val_acc"),
                    "search_compute_s": info.get("search_cpu_s", info.get("search_gpu_s", 0.0)),
                    "search_wall_s": info.get("search_wall_s", 0.0),
                    "final_wall_s_mean": group["wall_time_s"].mean(),
                    "best_config": info.get("best_config", ""),
                    "meta_learner_version": versions.get(label),
                }
            )
        return pd.DataFrame(rows)

    def _artifacts(self, table: pd.DataFrame, finals: pd.DataFrame, out: Path) -> None:

        from raymeta.tracking import log_results

        parquet, md = write_table(table, out, "comparison")
        seed0 = finals[finals["seed"] == finals["seed"].min()]
        curves = {r.method: (r.lrs, 1 / r.lr_stride_epochs) for r in seed0.itertuples()}
        histories = {}  # test accuracy per epoch, mean over seeds
        for method, group in finals.groupby("method", sort=False):
            per_epoch = pd.DataFrame([h for hist in group["history"] for h in hist])
            mean = per_epoch.groupby("training_iteration")["test_acc"].mean()
            histories[method] = [{"epoch": int(e), "test_acc": v} for e, v in mean.items()]
        pngs = [
            plot_lr_curves(
                curves, out / "comparison_lr_curves.png", "best configuration of each method"
            ),
            plot_accuracy_curves(
                histories,
                out / "comparison_test_accuracy.png",
                title=f"test accuracy per epoch, mean over {self.cmp.seeds} seed(s)",
            ),
            _plot_accuracy_vs_compute(table, out / "accuracy_vs_search_compute.png"),
        ]
        log_results([parquet, md, *pngs])


def _log_search_summary(info: dict[str, Any]) -> None:
    """A search on its (active) stage run: the best configuration as params (``best.<name>``;
    an online row's best policy as ``best.policy``, :func:`~raymeta.tune.online.policy_json`)
    and the search's results and cost as metrics. MLflow params cannot change: when a resume
    with a larger budget found another best configuration, the params keep the first one and
    the tag ``best_config`` (always set) names the current one."""
    import mlflow

    from raymeta.tracking import as_params

    if "sampled" in info:
        params = {f"best.{k}": f"{v:.4g}" for k, v in info["sampled"].items()}
    else:
        params = as_params({"policy": info["best_config"]}, "best.")
    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    if not any(k in logged and logged[k] != v for k, v in params.items()):
        mlflow.log_params(params)
    mlflow.set_tag("best_config", info["best_config"])
    mlflow.log_metrics(
        {k: float(v) for k, v in info.items() if k.startswith("search_") or k == "best_val_acc"}
        | {"trials": float(info["trials"])}
    )


def _rounded_json(sampled: dict[str, float]) -> str:
    """A searched configuration as JSON with 4 significant digits."""
    return json.dumps({k: float(f"{v:.4g}") for k, v in sampled.items()})


def _plot_accuracy_vs_compute(table: pd.DataFrame, path: Path) -> Path:
    from raymeta.report import _figure

    fig, ax = _figure()
    for row in table.itertuples():
        ax.errorbar(
            row.search_compute_s,
            100 * row.test_acc_mean,
            yerr=100 * row.test_acc_std,
            fmt="o",
            capsize=3,
        )
        ax.annotate(
            row.method,
            (row.search_compute_s, 100 * row.test_acc_mean),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set(
        xlabel="search compute (CPU-seconds)",
        ylabel="test accuracy (%)",
        title="accuracy vs search cost",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    fig.clf()
    return path
