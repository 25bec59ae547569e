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
(``Tuner.restore``), so finished trials are never run again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from raymeta.config import MethodConfig, PipelineConfig, TaskConfig
from raymeta.console import stage
from raymeta.errors import ConfigError
from raymeta.report import plot_accuracy_curves, plot_lr_curves, to_markdown, write_table
from raymeta.session import Session
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
STATE_FILE = "compare_state.json"


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


def _search_run(config: dict, number: int) -> TrialRun:
    """The MLflow run of search trial ``number``: ``search/<family>/trial<number>``."""
    family = config["trial"]["family"]
    name = f"search/{family}/trial{number}"
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

    def search(self, family: str, session: Session, parent_run_id: str) -> dict[str, Any]:
        """Run (or resume) the family's search, its trials nested under the stage run
        ``parent_run_id``; returns its best config and costs."""
        import optuna
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)

        s = self.cmp.search
        trial = {
            "family": family,
            "task": self.cmp.task.model_dump(mode="json"),
            **self._constants(session),
        }
        searcher = OptunaSearch(
            DefineByRun(
                family,
                self.ranges[family],
                {"trial": trial},
                resolve_choices(family, s.momentum_choices),
            ),
            metric="val_acc",
            mode="max",
            seed=s.seed,
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
            num_samples=s.trials_per_family,
            trial_dirname_creator=trial_dirname,
            max_concurrent_trials=s.max_concurrent,
        )
        tuner = self._tuner(
            session,
            parent_run_id,
            f"search-{family}",
            _search_trainable,
            param_space={},
            tune_config=tune_config,
            describe=_search_run,
            total=s.trials_per_family,
        )
        stage(
            f"compare: searching {family} ({s.trials_per_family} trials, {s.max_concurrent} at once)"
        )
        t0 = time.perf_counter()
        with working_dir(session.output_dir):
            grid = tuner.fit()
        wall = time.perf_counter() - t0
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} trial(s) of family {family} failed: {errors[0]}")
        best = grid.get_best_result(metric="val_acc", mode="max", scope="all")
        sampled = {k: v for k, v in best.config.items() if k != "trial"}
        device = "gpu" if s.gpus_per_trial else "cpu"
        per_trial = s.gpus_per_trial or s.cpus_per_trial
        compute = sum(r.metrics.get("time_total_s", 0.0) for r in grid) * per_trial
        return {
            "method": to_method(family, sampled),
            "sampled": sampled,
            "best_config": _rounded_json(sampled),
            "best_val_acc": best.metrics_dataframe["val_acc"].max(),
            "trials": len(grid),
            f"search_{device}_s": compute,
            "search_wall_s": wall,
        }

    def search_online(self, method: str, session: Session, parent_run_id: str) -> dict[str, Any]:
        """Run (or resume) the online schedule learner ``method`` (``pbt`` or ``pb2``,
        :mod:`raymeta.tune.online`): a population of ``trials_per_family`` members, each
        trained the task's epochs; returns the best member's policy and the costs."""
        from ray import tune
        from ray.tune.search import BasicVariantGenerator

        s, task = self.cmp.search, self.cmp.task
        ranges = self.online_ranges[method]
        trial = {
            "method": method,
            "task": task.model_dump(mode="json"),
            "perturbation_interval": s.perturbation_interval,
            **self._constants(session),
        }
        name = f"online-{method}"
        tuner = self._tuner(
            session,
            parent_run_id,
            name,
            _online_trainable,
            param_space=initial_population(method, ranges, s.momentum_choices, task.momentum)
            | {"trial": trial},
            # no max_concurrent_trials: the scheduler needs the whole population; the trials'
            # resources limit how many train at once, and PBT time-shares the rest
            tune_config=tune.TuneConfig(
                reuse_actors=True,
                scheduler=scheduler(method, ranges, s.momentum_choices, s.perturbation_interval),
                search_alg=BasicVariantGenerator(random_state=s.seed),
                num_samples=s.trials_per_family,
                trial_dirname_creator=trial_dirname,
            ),
            describe=_online_run,
            total=s.trials_per_family,
            stop={"training_iteration": task.epochs},  # no perturbation after the last epoch
        )
        label = ONLINE_LABELS[method]
        stage(
            f"compare: {label}, a population of {s.trials_per_family} trained {task.epochs} "
            f"epochs, perturbed every {s.perturbation_interval}"
        )
        t0 = time.perf_counter()
        with working_dir(session.output_dir):
            grid = tuner.fit()
        wall = time.perf_counter() - t0
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} member(s) of {label} failed: {errors[0]}")
        best = grid.get_best_result(metric="val_acc", mode="max", scope="last")
        policy = best_policy(best, task.epochs)
        device = "gpu" if s.gpus_per_trial else "cpu"
        per_trial = s.gpus_per_trial or s.cpus_per_trial
        steps = perturbations(session.tune_dir / name)
        stage(
            f"compare: {label}: {len(steps)} exploit/explore steps; best policy {policy_json(policy)}"
        )
        return {
            "policy": policy,
            "best_config": policy_json(policy),
            "best_val_acc": best.metrics["val_acc"],
            "trials": len(grid),
            f"search_{device}_s": population_compute_s(grid) * per_trial,
            "search_wall_s": wall,
        }

    def final_runs(
        self,
        best: dict[str, dict],
        session: Session,
        parent_run_id: str,
        online: dict[str, dict] | None = None,
    ) -> pd.DataFrame:
        """Re-train every method with every seed, nested under the stage run
        ``parent_run_id``; returns one row per (method, seed)."""
        from ray import tune

        specs = self.final_specs(best, online)
        learned = {m.model_uri: session.meta_learner(m.model_uri)[0] for m in self.cmp.learned}
        tuner = self._tuner(
            session,
            parent_run_id,
            "final",
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
            grid = tuner.fit()
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
        return pd.DataFrame(rows)

    # -- the comparison -------------------------------------------------------------------
    def run(self, session: Session) -> pd.DataFrame:
        """Run (or, in a resumed session, resume) the whole comparison in ``session`` under
        its run ``compare`` (nested in the pipeline's run; module docstring); returns the
        per-method table."""
        import mlflow

        versions = {m.label: session.meta_learner(m.model_uri)[1] for m in self.cmp.learned}
        params = {
            "families": self.cmp.search.families,
            "online": self.cmp.search.online,
            "trials_per_family": self.cmp.search.trials_per_family,
            "seeds": self.cmp.seeds,
            "task": self.cmp.task.model_dump_json(),
        }
        with session.parent_run("compare", params=params, state_file=STATE_FILE) as parent:
            best = {}
            for family in self.cmp.search.families:
                with parent.stage(f"search/{family}") as stage_run_id:
                    best[family] = self.search(family, session, stage_run_id)
                    _log_search_summary(best[family])
                searched = parent.state.get("families", {})
                parent.save(families=searched | {family: {"sampled": best[family]["sampled"]}})
            online = {}
            for method in self.cmp.search.online:
                label = ONLINE_LABELS[method]
                with parent.stage(f"search/{method}") as stage_run_id:
                    online[label] = self.search_online(method, session, stage_run_id)
                    _log_search_summary(online[label])
                parent.save(
                    online=parent.state.get("online", {}) | {label: online[label]["policy"]}
                )
            with parent.stage("final") as stage_run_id:
                finals = self.final_runs(best, session, stage_run_id, online)
                mlflow.log_param("runs", len(finals))
            table = self._table(best | online, finals, versions)
            self._artifacts(table, finals, session.output_dir)
        print("\n" + to_markdown(table) + "\n")
        print(f"results in {session.output_dir}; MLflow run {parent.run_id} (compare)")
        return table

    def _table(self, best, finals: pd.DataFrame, versions) -> pd.DataFrame:
        rows = []
        for label, group in finals.groupby("method", sort=False):
            info = best.get(label, {})
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
        import mlflow

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
        for path in (parquet, md, *pngs):
            mlflow.log_artifact(str(path))


def _log_search_summary(info: dict[str, Any]) -> None:
    """A search on its stage run: the best configuration as params (``best.<name>``; an
    online row's best policy as ``best.policy``, :func:`~raymeta.tune.online.policy_json`)
    and the search's results and cost as metrics."""
    import mlflow

    from raymeta.tracking import as_params

    if "sampled" in info:
        mlflow.log_params({f"best.{k}": f"{v:.4g}" for k, v in info["sampled"].items()})
    else:
        mlflow.log_params(as_params({"policy": info["best_config"]}, "best."))
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
