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
from raymeta.errors import ConfigError
from raymeta.pipeline import stage
from raymeta.report import plot_accuracy_curves, plot_lr_curves, to_markdown, write_table
from raymeta.tune.common import make_tuner, trial_dirname, working_dir
from raymeta.tune.spaces import DefineByRun, resolve_ranges, to_method

TRIAL_LOG = "trial_starts.jsonl"  # one line per trainable start: the resume test counts them
LR_POINTS = 400  # LR curves are subsampled to this many points in the reported metrics


def run_task(task: TaskConfig, method: MethodConfig, *, report, bundle=None, meta=None) -> None:
    """Train ``task`` in this process with ``method`` and call ``report(metrics)`` every epoch
    (Tune's ``tune.report``). The last report also carries ``lrs`` (subsampled LR curve).

    Args:
        bundle: the frozen meta-learner for ``schedule: mlrsnet``.
        meta: settings of MLR-SNet (Train): meta-train on this task (``t_val``, ...).
    """
    from raymeta.data.batches import steps_per_epoch
    from raymeta.train.loop import Workers, build_task_model, load_task_data, train
    from raymeta.train.ray_train import build_schedule
    from raymeta.train.rules import rule_for_task

    task = method.apply_optimizer(task)
    data = load_task_data(task)
    model = build_task_model(task, data, "cpu")
    spe = steps_per_epoch(len(data.train_y), task.batch_size)
    if meta is not None:
        job = {"kind": "meta_train", **meta}
    elif method.schedule == "mlrsnet":
        job = {"kind": "mlrsnet", "bundle": bundle, "gamma": method.gamma}
    else:
        job = {"kind": method.schedule, "lr": method.lr, "params": method.params}
    schedule = build_schedule(job, task, data, spe, Workers())

    def on_epoch_end(metrics, state, optimizer):
        out = {k: v for k, v in metrics.items() if v == v}  # NaN val metrics on train+val runs
        if metrics["epoch"] == task.epochs:
            stride = max(1, len(state.lrs) // LR_POINTS)
            out["lrs"] = state.lrs[::stride]
            out["lr_stride_epochs"] = stride / spe
        report(out)

    train(
        task, data, model, schedule, rule=rule_for_task(task, schedule), on_epoch_end=on_epoch_end
    )


def _search_trainable(config: dict) -> None:
    """Tune trial of the search: one sampled configuration of one family."""
    import torch
    from ray import tune

    torch.set_num_threads(config["threads"])
    family = config["family"]
    sampled = {k: v for k, v in config.items() if k not in ("family", "task", "threads", "log")}
    with open(config["log"], "a") as f:
        f.write(json.dumps({"trial": tune.get_context().get_trial_id(), "family": family}) + "\n")
    method = MethodConfig(**to_method(family, sampled))
    run_task(TaskConfig(**config["task"]), method, report=tune.report)


def _final_trainable(config: dict) -> None:
    """Tune trial of the final runs: one (method, seed) on train + validation, test split."""
    import torch
    from ray import tune

    torch.set_num_threads(config["threads"])
    run = config["run"]
    task = TaskConfig(**run["task"])
    with open(config["log"], "a") as f:
        f.write(
            json.dumps({"trial": tune.get_context().get_trial_id(), "final": run["label"]}) + "\n"
        )
    bundle = None
    if run["method"]["schedule"] == "mlrsnet":
        import mlflow

        from raymeta.tracking import load_meta_learner

        mlflow.set_tracking_uri(config["tracking_uri"])
        bundle, _ = load_meta_learner(run["method"]["model_uri"])
    run_task(
        task, MethodConfig(**run["method"]), report=tune.report, bundle=bundle, meta=run.get("meta")
    )


class Comparison:
    """One comparison study: its config, output folder and MLflow parent run."""

    def __init__(self, cfg: PipelineConfig, resume: bool = False):
        if cfg.compare is None:
            raise ConfigError(f"{cfg.name}: the pipeline has no 'compare' section")
        self.cfg, self.cmp, self.resume = cfg, cfg.compare, resume
        self.out = Path(cfg.output_dir).resolve()
        self.tune_dir = self.out / "tune"
        self.state_file = self.out / "compare_state.json"
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

    def check_registry(self) -> dict[str, str]:
        """Load every learned schedule from the registry (one-line error if missing or not an
        MLR-SNet); returns label -> registry version."""
        from raymeta.tracking import load_meta_learner

        return {m.label: load_meta_learner(m.model_uri)[1] for m in self.cmp.learned}

    def final_task(self, seed: int) -> TaskConfig:
        """Train + validation merged (no validation split), no meta set, seed ``seed``."""
        return self.cmp.task.model_copy(update={"val_size": 0, "meta_per_class": 0, "seed": seed})

    def meta_task(self, seed: int) -> TaskConfig:
        """MLR-SNet (Train): the meta set is carved from the training split."""
        return self.final_task(seed).model_copy(
            update={"meta_per_class": self.cmp.meta_train.meta_per_class}
        )

    # -- Ray Tune ------------------------------------------------------------------------
    def _tuner(
        self,
        name: str,
        trainable,
        *,
        param_space: dict,
        tune_config,
        parent_run_id: str,
        uri: str,
        total: int,
    ):
        s = self.cmp.search
        return make_tuner(
            name,
            trainable,
            tune_dir=self.tune_dir,
            resume=self.resume,
            param_space=param_space,
            tune_config=tune_config,
            resources={"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial},
            tracking_uri=uri,
            experiment=self.cfg.mlflow.experiment,
            parent_run_id=parent_run_id,
            total=total,
        )

    def search(self, family: str, parent_run_id: str, uri: str) -> dict[str, Any]:
        """Run (or resume) the family's search; returns its best config and costs."""
        import optuna
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)

        s = self.cmp.search
        constants = {
            "family": family,
            "task": self.cmp.task.model_dump(),
            "threads": max(1, int(s.cpus_per_trial)),
            "log": str(self.out / TRIAL_LOG),
        }
        searcher = OptunaSearch(
            DefineByRun(family, self.ranges[family], constants),
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
            f"search-{family}",
            _search_trainable,
            param_space={},
            tune_config=tune_config,
            parent_run_id=parent_run_id,
            uri=uri,
            total=s.trials_per_family,
        )
        stage(
            f"compare: searching {family} ({s.trials_per_family} trials, {s.max_concurrent} at once)"
        )
        t0 = time.perf_counter()
        with working_dir(self.out):
            grid = tuner.fit()
        wall = time.perf_counter() - t0
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} trial(s) of family {family} failed: {errors[0]}")
        best = grid.get_best_result(metric="val_acc", mode="max", scope="all")
        sampled = {k: v for k, v in best.config.items() if k not in constants}
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

    def final_runs(self, best: dict[str, dict], parent_run_id: str, uri: str) -> pd.DataFrame:
        """Re-train every method with every seed; returns one row per (method, seed)."""
        from ray import tune

        runs = []
        for seed in range(self.cmp.seeds):
            for family, info in best.items():
                runs.append(
                    {
                        "label": family,
                        "method": info["method"],
                        "task": self.final_task(seed).model_dump(),
                    }
                )
            for learned in self.cmp.learned:
                runs.append(
                    {
                        "label": learned.label,
                        "method": learned.model_dump(),
                        "task": self.final_task(seed).model_dump(),
                    }
                )
            if self.cmp.meta_train is not None:
                mt = self.cmp.meta_train
                runs.append(
                    {
                        "label": "MLR-SNet (Train)",
                        "method": {"name": "MLR-SNet (Train)", "schedule": "fixed", "lr": 1.0},
                        "task": self.meta_task(seed).model_dump(),
                        "meta": mt.model_dump(exclude={"meta_per_class"}),
                    }
                )
        s = self.cmp.search
        tuner = self._tuner(
            "final",
            _final_trainable,
            param_space={
                "run": tune.grid_search(runs),
                "tracking_uri": uri,
                "threads": max(1, int(s.cpus_per_trial)),
                "log": str(self.out / TRIAL_LOG),
            },
            tune_config=tune.TuneConfig(
                reuse_actors=True,  # trials share resources: skip an actor start per trial
                max_concurrent_trials=s.max_concurrent,
                trial_dirname_creator=trial_dirname,
            ),
            parent_run_id=parent_run_id,
            uri=uri,
            total=len(runs),
        )
        stage(f"compare: final runs, {len(runs)} (method, seed) pairs on train + validation")
        with working_dir(self.out):
            grid = tuner.fit()
        rows = []
        for r in grid:
            if r.error is not None:
                raise RuntimeError(f"final run {r.config['run']['label']} failed: {r.error}")
            run = r.config["run"]
            rows.append(
                {
                    "method": run["label"],
                    "seed": run["task"]["seed"],
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

    # -- the study ----------------------------------------------------------------------
    def run(self) -> pd.DataFrame:
        """Run (or resume) the whole comparison; returns the per-method table."""
        import mlflow
        import ray

        from raymeta.pipeline import init_ray
        from raymeta.tracking import setup

        self.check_data()
        self.out.mkdir(parents=True, exist_ok=True)
        uri, experiment_id = setup(self.cfg.mlflow.tracking_uri, self.cfg.mlflow.experiment)
        versions = self.check_registry()
        state = (
            json.loads(self.state_file.read_text())
            if self.resume and self.state_file.exists()
            else {}
        )
        started = init_ray(self.cfg.ray)
        try:
            with mlflow.start_run(
                run_id=state.get("parent_run_id"),
                experiment_id=experiment_id,
                run_name=None if state else f"compare/{self.cfg.name}",
            ) as parent:
                state["parent_run_id"] = parent.info.run_id
                self.state_file.write_text(json.dumps(state))
                if "families" not in state:
                    mlflow.log_params(
                        {
                            "families": self.cmp.search.families,
                            "trials_per_family": self.cmp.search.trials_per_family,
                            "seeds": self.cmp.seeds,
                            "task": self.cmp.task.model_dump_json(),
                        }
                    )
                best = {}
                for family in self.cmp.search.families:
                    best[family] = self.search(family, parent.info.run_id, uri)
                    state.setdefault("families", {})[family] = {"sampled": best[family]["sampled"]}
                    self.state_file.write_text(json.dumps(state, default=str))
                finals = self.final_runs(best, parent.info.run_id, uri)
                table = self._table(best, finals, versions)
                self._artifacts(table, finals)
        finally:
            if started:
                ray.shutdown()
        print("\n" + to_markdown(table) + "\n")
        print(f"results in {self.out}; MLflow parent run {state['parent_run_id']} in {uri}")
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
                    "search_compute_s": info.get("search_cpu_s", info.get("search_gpu_s", 0.0)),
                    "search_wall_s": info.get("search_wall_s", 0.0),
                    "final_wall_s_mean": group["wall_time_s"].mean(),
                    "best_config": _rounded_json(info["sampled"]) if info else "",
                    "meta_learner_version": versions.get(label),
                }
            )
        return pd.DataFrame(rows)

    def _artifacts(self, table: pd.DataFrame, finals: pd.DataFrame) -> None:
        import mlflow

        parquet, md = write_table(table, self.out, "comparison")
        seed0 = finals[finals["seed"] == finals["seed"].min()]
        curves = {r.method: (r.lrs, 1 / r.lr_stride_epochs) for r in seed0.itertuples()}
        histories = {}  # test accuracy per epoch, mean over seeds
        for method, group in finals.groupby("method", sort=False):
            per_epoch = pd.DataFrame([h for hist in group["history"] for h in hist])
            mean = per_epoch.groupby("training_iteration")["test_acc"].mean()
            histories[method] = [{"epoch": int(e), "test_acc": v} for e, v in mean.items()]
        pngs = [
            plot_lr_curves(
                curves, self.out / "comparison_lr_curves.png", "best configuration of each method"
            ),
            plot_accuracy_curves(
                histories,
                self.out / "comparison_test_accuracy.png",
                title=f"test accuracy per epoch, mean over {self.cmp.seeds} seed(s)",
            ),
            _plot_accuracy_vs_compute(table, self.out / "accuracy_vs_search_compute.png"),
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


def run_compare(cfg: PipelineConfig, resume: bool = False) -> pd.DataFrame:
    """Entry point of ``raymeta compare``."""
    return Comparison(cfg, resume).run()
