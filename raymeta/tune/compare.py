"""Compare learned and hand-designed LR schedules fairly (``raymeta compare FILE [--resume]``).

Protocol (docs/design.md section 6):

1. **Search**, per hand-designed family: a Ray Tune ``Tuner`` with ``OptunaSearch`` (TPE,
   seeded, define-by-run space with the family's conditional hyper-parameters,
   :mod:`raymeta.tune.spaces`) and ASHA early stopping on the validation accuracy; the same
   trial budget and epochs per trial for every family; trials are plain function trainables
   with per-trial resources, so several run at once.
2. **Final runs**: the best configuration of every family is re-trained with ``seeds`` seeds on
   train + validation and evaluated on the untouched test split, beside the learned schedules
   with the same seeds: MLR-SNet (Test), loaded from the MLflow registry by alias (no search,
   no meta-training on this task), and MLR-SNet (Train), meta-trained on this task's own
   training data with its meta set carved from the training split.
3. **Result**: a table per method (mean and std of test accuracy and loss over seeds, search
   trials, search compute in CPU- or GPU-seconds, wall time) as Parquet and Markdown, plots,
   and MLflow: one parent run, nested runs for every trial and every final run.

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
from raymeta.spec import LearnedRun, RunSpec, meta_train_run, method_run, parse_run
from raymeta.tune.common import make_tuner, train_trial, trial_dirname, working_dir
from raymeta.tune.spaces import DefineByRun, resolve_ranges, to_method

TRIAL_LOG = "trial_starts.jsonl"  # one line per trainable start: the resume test counts them
STATE_FILE = "compare_state.json"


def _log_start(config: dict, entry: dict) -> None:
    from ray import tune

    with open(config["log"], "a") as f:
        f.write(json.dumps({"trial": tune.get_context().get_trial_id(), **entry}) + "\n")


def _search_trainable(config: dict) -> None:
    """Tune trial of the search: one sampled configuration of one family (``config``: the
    sampled values and, under ``trial``, the family, the task and the trial's settings)."""
    import torch
    from ray import tune

    trial = config["trial"]
    torch.set_num_threads(trial["threads"])
    family = trial["family"]
    sampled = {k: v for k, v in config.items() if k != "trial"}
    _log_start(trial, {"family": family})
    spec = method_run(MethodConfig(**to_method(family, sampled)), TaskConfig(**trial["task"]))
    train_trial(spec, tune.report, use_gpu=trial["use_gpu"], dead_run_is_result=True)


def _final_trainable(config: dict, meta_learners: dict[str, Any]) -> None:
    """Tune trial of the final runs: one (method, seed) on train + validation, test split;
    ``meta_learners``: the learned schedules' bundles by URI (loaded in the driver)."""
    import torch
    from ray import tune

    torch.set_num_threads(config["threads"])
    spec = parse_run(config["run"])
    _log_start(config, {"final": spec.label})
    meta_learner = meta_learners[spec.model_uri] if isinstance(spec, LearnedRun) else None
    train_trial(spec, tune.report, meta_learner=meta_learner, use_gpu=config["use_gpu"])


class Comparison:
    """One schedule comparison (the ``compare`` section of a pipeline)."""

    def __init__(self, cfg: PipelineConfig):
        if cfg.compare is None:
            raise ConfigError(f"{cfg.name}: the pipeline has no 'compare' section")
        self.cfg, self.cmp = cfg, cfg.compare
        self.ranges = {
            fam: resolve_ranges(
                fam,
                self.cmp.search.ranges.get(fam),
                momentum=self.cmp.search.search_momentum,
                weight_decay=self.cmp.search.search_weight_decay,
            )
            for fam in self.cmp.search.families
        }
        unknown = set(self.cmp.search.ranges) - set(self.cmp.search.families)
        if unknown:
            raise ConfigError(f"search.ranges has families not searched: {sorted(unknown)}")

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

    def final_specs(self, best: dict[str, dict]) -> list[RunSpec]:
        """The final runs, seed by seed: every searched family's best configuration, every
        MLR-SNet (Test) and MLR-SNet (Train)."""
        specs: list[RunSpec] = []
        for seed in range(self.cmp.seeds):
            task = self.final_task(seed)
            for family, info in best.items():
                specs.append(method_run(MethodConfig(**info["method"]), task, family))
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
            experiment=session.experiment,
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
        """Run (or resume) the family's search; returns its best config and costs."""
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
            DefineByRun(family, self.ranges[family], {"trial": trial}),
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
            "best_val_acc": best.metrics_dataframe["val_acc"].max(),
            "trials": len(grid),
            f"search_{device}_s": compute,
            "search_wall_s": wall,
        }

    def final_runs(
        self, best: dict[str, dict], session: Session, parent_run_id: str
    ) -> pd.DataFrame:
        """Re-train every method with every seed; returns one row per (method, seed)."""
        from ray import tune

        specs = self.final_specs(best)
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
            total=len(specs),
        )
        stage(f"compare: final runs, {len(specs)} (method, seed) pairs on train + validation")
        with working_dir(session.output_dir):
            grid = tuner.fit()
        rows = []
        for r in grid:
            if r.error is not None:
                raise RuntimeError(f"final run {r.config['run']['label']} failed: {r.error}")
            spec = parse_run(r.config["run"])
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
        its parent run ``compare/{name}``; returns the per-method table."""
        versions = {m.label: session.meta_learner(m.model_uri)[1] for m in self.cmp.learned}
        params = {
            "families": self.cmp.search.families,
            "trials_per_family": self.cmp.search.trials_per_family,
            "seeds": self.cmp.seeds,
            "task": self.cmp.task.model_dump_json(),
        }
        with session.parent_run("compare", params=params, state_file=STATE_FILE) as parent:
            best = {}
            for family in self.cmp.search.families:
                best[family] = self.search(family, session, parent.run_id)
                searched = parent.state.get("families", {})
                parent.save(families=searched | {family: {"sampled": best[family]["sampled"]}})
            finals = self.final_runs(best, session, parent.run_id)
            table = self._table(best, finals, versions)
            self._artifacts(table, finals, session.output_dir)
        print("\n" + to_markdown(table) + "\n")
        print(
            f"results in {session.output_dir}; MLflow parent run {parent.run_id} in "
            f"{session.tracking_uri}"
        )
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
                    "best_config": _rounded_json(info["sampled"]) if info else "",
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
        for row in table.itertuples():
            key = row.method.replace(" ", "_").replace("(", "").replace(")", "")
            mlflow.log_metric(f"test_acc_mean.{key}", row.test_acc_mean)


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
