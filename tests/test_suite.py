"""The transfer suite: its verdicts (computed from comparison tables), its config, and a tiny
real suite of two digits tasks (Ray Tune + Optuna, MLflow)."""

import json
import math

import mlflow
import pandas as pd
import pytest
import torch

from raymeta.config import PipelineConfig, parse
from raymeta.errors import ConfigError
from raymeta.tune.suite import suite_verdict, task_verdict

LEARNED = {"name": "MLR-SNet (Test)", "schedule": "mlrsnet", "model_uri": "models:/tiny@champion"}


def table(learned, families):
    rows = [
        {
            "method": "MLR-SNet (Test)",
            "test_acc_mean": learned,
            "test_acc_std": 0.01,
            "search_trials": 0,
            "search_compute_s": 0.0,
            "best_val_acc": None,
        }
    ]
    for name, (val, test) in families.items():
        rows.append(
            {
                "method": name,
                "test_acc_mean": test,
                "test_acc_std": 0.02,
                "search_trials": 20,
                "search_compute_s": 100.0,
                "best_val_acc": val,
            }
        )
    return pd.DataFrame(rows)


def test_best_family_is_chosen_on_validation_not_test():
    # cosine has the better test accuracy but multistep the better validation accuracy:
    # the learned row is compared with multistep
    t = table(0.900, {"multistep": (0.95, 0.898), "cosine": (0.94, 0.930)})
    v = task_verdict(t, "MLR-SNet (Test)", 0.003)
    assert v["family"] == "multistep" and v["verdict"] == "win"
    assert v["diff"] == pytest.approx(0.002)


@pytest.mark.parametrize(
    ("learned", "verdict"), [(0.91, "win"), (0.90, "win"), (0.8975, "within"), (0.896, "loss")]
)
def test_verdict_thresholds(learned, verdict):
    t = table(learned, {"multistep": (0.95, 0.90)})
    assert task_verdict(t, "MLR-SNet (Test)", 0.003)["verdict"] == verdict


def test_online_rows_are_reported_but_not_the_best_family():
    t = table(0.90, {"multistep": (0.90, 0.89)})
    t.loc[len(t)] = ["PBT", 0.95, 0.01, 20, 300.0, 0.99]
    v = task_verdict(t, "MLR-SNet (Test)", 0.003)
    assert v["family"] == "multistep" and v["pbt_mean"] == 0.95 and v["pbt_compute_s"] == 300.0


def test_suite_verdict_line():
    cfg = parse(PipelineConfig, config_dict("/tmp/x", n_tasks=4), "suite")
    verdicts = pd.DataFrame(
        {"verdict": ["win", "win", "within", "win"], "diff": [0.01, 0, -0.002, 0.003]}
    )
    assert suite_verdict(verdicts, cfg.suite).startswith("target MET: learned schedule wins 3 of 4")
    verdicts.loc[0] = ["loss", -0.01]
    line = suite_verdict(verdicts, cfg.suite)
    assert line.startswith("target NOT MET") and "worst difference -1.00 points" in line


def config_dict(out, n_tasks=2, **search):
    task = {"dataset": "digits", "model": "mlp", "epochs": 2, "val_size": 300, "meta_per_class": 0}
    return {
        "name": "tiny-suite",
        "output_dir": str(out),
        "mlflow": {"experiment": "tiny-suite", "tracking_uri": f"sqlite:///{out}/mlflow.db"},
        "suite": {
            "learned": LEARNED,
            "search": {
                "families": ["fixed", "cosine"],
                "trials_per_family": 2,
                "seed": 3,
                **search,
            },
            "seeds": 1,
            "tasks": [
                {"name": f"t{i}", "task": {**task, "batch_size": 32 * (i + 1)}}
                for i in range(n_tasks)
            ],
        },
    }


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"tasks": []}, "suite.tasks: List should have at least 1 item"),
        ({"wins_needed": 5}, "wins_needed=5 exceeds the 2 tasks"),
        (
            {"tasks": [{"name": "a", "task": {"val_size": 0}}]},
            "tasks.0 (a): task.val_size must be > 0",
        ),
        ({"tasks": [{"name": "../x", "task": {}}]}, "suite.tasks.0.name: String should match"),
    ],
)
def test_bad_suite_config_is_one_line(tmp_path, patch, message):
    data = config_dict(tmp_path)
    data["suite"].update(patch)
    with pytest.raises(ConfigError) as err:
        parse(PipelineConfig, data, "suite")
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def verdicts_of(seeds: int, tmp_path, capsys, monkeypatch, smoke=False):
    """``run_transfer_suite`` on two tasks whose comparisons return hand-made tables (no Ray):
    ``(printed lines, the written verdict table)``."""
    from raymeta.session import Session
    from raymeta.tune import compare, suite

    tables = iter(
        [
            table(0.9012, {"multistep": (0.95, 0.8950), "cosine": (0.94, 0.93)}),
            table(0.8000, {"multistep": (0.90, 0.8100)}),
        ]
    )
    monkeypatch.setattr(compare.Comparison, "run", lambda self, session: next(tables))
    data = config_dict(tmp_path)
    data["suite"].update(seeds=seeds, smoke=smoke)
    cfg = parse(PipelineConfig, data, "suite")
    session = Session("tiny-suite", tmp_path, "sqlite:///x.db", "e", "0", cfg.ray)
    suite.run_transfer_suite(cfg, session)
    return capsys.readouterr().out.strip().splitlines(), pd.read_parquet(
        tmp_path / "transfer_suite.parquet"
    )


def test_the_verdict_table_is_in_percent_and_points(tmp_path, capsys, monkeypatch):
    lines, written = verdicts_of(3, tmp_path, capsys, monkeypatch)
    assert list(written.columns) == [
        "task", "learned_mean (%)", "learned_std (%)", "family", "family_mean (%)",
        "family_std (%)", "diff (points)", "family_trials", "family_compute_s", "verdict",
    ]  # fmt: skip
    first = written.iloc[0]
    assert first["learned_mean (%)"] == pytest.approx(90.12)
    assert first["family_std (%)"] == pytest.approx(2.0) and first["family"] == "multistep"
    assert first["diff (points)"] == pytest.approx(0.62)
    assert list(written["verdict"]) == ["win", "loss"]
    row = (tmp_path / "transfer_suite.md").read_text().splitlines()[2]  # tabulate drops 0s
    assert [cell.strip() for cell in row.split("|")[1:-1]] == [
        "t0", "90.12", "1", "multistep", "89.5", "2", "0.62", "20", "100", "win"
    ]  # fmt: skip
    assert lines[-3] == (
        "t0: learned 90.12 +- 1.00 vs multistep 89.50 +- 2.00 (+0.62 points; search 20 "
        "trials, 100 CPU-s) -> win"
    )
    assert lines[-1].startswith("target NOT MET")


def test_one_seed_has_no_spread_and_a_smoke_run_says_its_numbers_mean_nothing(
    tmp_path, capsys, monkeypatch
):
    lines, written = verdicts_of(1, tmp_path, capsys, monkeypatch, smoke=True)
    assert lines[-4].startswith("t0: learned 90.12 n/a (1 seed) vs multistep 89.50 n/a (1 seed)")
    assert written["learned_std (%)"].isna().all() and written["family_std (%)"].isna().all()
    assert lines[-2] == "smoke run: tiny budgets, the numbers mean nothing"
    assert lines[-1].startswith("target NOT MET")


def test_online_rows_are_labelled_as_reference_in_the_task_line():
    from raymeta.tune.suite import task_line

    t = table(0.90, {"multistep": (0.90, 0.89)})
    t.loc[len(t)] = ["PBT", 0.7562, 0.0012, 20, 300.0, 0.99]
    line = task_line({"task": "t", **task_verdict(t, "MLR-SNet (Test)", 0.003)}, seeds=3)
    assert line.endswith(", PBT 75.62 +- 0.12 (reference) -> win"), line


def test_the_benchmark_resumes_and_stops_on_ctrl_c_as_the_cli(tmp_path, monkeypatch, capsys):
    """benchmarks/transfer_suite.py --smoke --resume: the shrunk suite, marked smoke, resumed;
    Ctrl+C in it ends with the command line's interrupted line and exit status 130."""
    import importlib.util
    from pathlib import Path

    import raymeta.pipeline
    from raymeta.interrupts import Interrupted

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "transfer_suite.py"
    spec = importlib.util.spec_from_file_location("transfer_suite_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    calls = []

    def run_pipeline(cfg, resume=False):
        calls.append((cfg, resume))
        raise Interrupted(resumable=True)

    monkeypatch.setattr(raymeta.pipeline, "run_pipeline", run_pipeline)
    status = benchmark.main(["--smoke", "--resume", "--output-dir", str(tmp_path)])
    assert status == 130
    assert capsys.readouterr().err == "raymeta: interrupted; resume with --resume\n"
    ((cfg, resume),) = calls
    assert resume and cfg.suite.smoke and cfg.suite.seeds == 1
    assert cfg.output_dir == str(tmp_path) and cfg.meta_train.task.train_subset == 3000
    assert {t.task.train_subset for t in cfg.suite.tasks} == {1500, None}  # digits: all of it


@pytest.mark.ray
def test_tiny_suite_runs_every_task_and_writes_the_verdicts(ray_local, tmp_path, new_store):
    from raymeta.pipeline import run_pipeline
    from raymeta.schedules import MLRSNet, MLRSNetBundle
    from raymeta.tracking import log_meta_learner, setup

    cfg = parse(PipelineConfig, config_dict(tmp_path, families=["cosine"]), "suite")
    new_store(tmp_path / "mlflow.db")
    _, exp = setup(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    torch.manual_seed(0)
    with mlflow.start_run(experiment_id=exp):
        log_meta_learner(MLRSNetBundle([MLRSNet().state_dict()], [1]), "tiny", "champion")
    try:
        verdicts = run_pipeline(cfg)
    finally:
        mlflow.set_tracking_uri(None)
    assert list(verdicts["task"]) == ["t0", "t1"]
    for name, row in verdicts.set_index("task").iterrows():
        comparison = pd.read_parquet(tmp_path / name / "comparison.parquet")
        expected = task_verdict(comparison, "MLR-SNet (Test)", 0.003)
        assert row["family"] == expected["family"] == "cosine"
        assert row["diff"] == pytest.approx(expected["diff"])
        assert row["family_trials"] == 2 and row["family_compute_s"] > 0
        assert 0.1 < row["learned_mean"] <= 1 and not math.isnan(row["family_mean"])
    saved = pd.read_parquet(tmp_path / "transfer_suite.parquet")
    assert list(saved["verdict"]) == list(verdicts["verdict"])
    # one MLflow tree: pipeline -> compare/<task> -> search/cosine, final -> runs; each task's
    # resume state in its folder
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    runs = client.search_runs([exp])
    children = {}
    for r in runs:
        children.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    (pipeline,) = [r for r in runs if r.info.run_name == "pipeline/tiny-suite"]
    tasks = {r.info.run_name: r for r in children[pipeline.info.run_id]}
    assert sorted(tasks) == ["compare/t0", "compare/t1"]
    for name, run in tasks.items():
        state = json.loads(
            (tmp_path / name.removeprefix("compare/") / "compare_state.json").read_text()
        )
        assert state["parent_run_id"] == run.info.run_id
        stages = {r.info.run_name: r for r in children[run.info.run_id]}
        assert sorted(stages) == ["final", "search/cosine"]
        trials = sorted(r.info.run_name for r in children[stages["search/cosine"].info.run_id])
        assert trials == ["search/cosine/trial0", "search/cosine/trial1"]
        finals = sorted(r.info.run_name for r in children[stages["final"].info.run_id])
        assert finals == ["final/MLR-SNet (Test)/seed0", "final/cosine/seed0"]


@pytest.mark.ray
def test_resume_after_meta_training_reuses_the_registered_version(
    ray_local, tmp_path, monkeypatch, capsys, new_store
):
    """Interrupted after meta-training registered ``tiny`` version 1, as the suite's task
    starts its final runs: ``--resume`` does not meta-train again, the final runs load version
    1, and the results table keeps the meta-training row. Resumed again after the alias moved
    to another version, the pipeline still loads version 1 and says so; a changed
    meta-training config is refused."""
    from raymeta.errors import ConfigError
    from raymeta.interrupts import Interrupted
    from raymeta.pipeline import META_TRAIN_LABEL, run_pipeline
    from raymeta.schedules import MLRSNet, MLRSNetBundle
    from raymeta.session import check_resume, open_session
    from raymeta.tracking import log_meta_learner
    from raymeta.tune.compare import Comparison

    data = config_dict(tmp_path, n_tasks=1, families=["fixed"], trials_per_family=1)
    task = {"dataset": "digits", "model": "mlp", "batch_size": 32, "epochs": 2,
            "val_size": 300, "meta_per_class": 10}  # fmt: skip
    data["meta_train"] = {"task": task, "meta_every": 5, "meta_batch_size": 40,
                          "registered_model": "tiny", "alias": "champion"}  # fmt: skip
    cfg = parse(PipelineConfig, data, "suite")
    new_store(tmp_path / "mlflow.db")
    final_runs = Comparison.final_runs

    def interrupted_once(self, *args, **kwargs):  # Ctrl+C as the final runs start
        if not interrupts:
            interrupts.append("final")
            raise KeyboardInterrupt
        return final_runs(self, *args, **kwargs)

    interrupts = []
    monkeypatch.setattr(Comparison, "final_runs", interrupted_once)
    try:
        with pytest.raises(Interrupted) as err:
            run_pipeline(cfg)
        assert err.value.resumable and interrupts == ["final"]
        before = pd.read_parquet(tmp_path / "results.parquet")
        (tmp_path / "accuracy_curves.png").unlink()
        capsys.readouterr()
        verdicts = run_pipeline(cfg, resume=True)
        reused = "meta-train: reusing models:/tiny version 1 from the interrupted run"
        assert reused in capsys.readouterr().out.splitlines()
        client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
        assert [v.version for v in client.search_model_versions("name='tiny'")] == [1]
        experiment = client.get_experiment_by_name("tiny-suite").experiment_id
        trained = client.search_runs(
            [experiment], "attributes.run_name = 'meta-train/MLR-SNet (meta-training)/seed0'"
        )
        assert len(trained) == 1  # meta-trained once
        after = pd.read_parquet(tmp_path / "results.parquet")
        pd.testing.assert_frame_equal(after, before)
        assert list(after["method"]) == [META_TRAIN_LABEL]
        assert list(after["meta_learner_version"]) == ["1"] and after["test_acc"][0] > 0.2
        assert (tmp_path / "accuracy_curves.png").stat().st_size > 0  # from the saved history
        state = json.loads((tmp_path / "pipeline_state.json").read_text())
        history = state["meta_train"]["histories"][META_TRAIN_LABEL]
        assert [h["epoch"] for h in history] == [1, 2]
        assert history[-1]["test_acc"] == after["test_acc"][0]
        assert list(verdicts["task"]) == ["t0"]
        comparison = pd.read_parquet(tmp_path / "t0" / "comparison.parquet").set_index("method")
        assert comparison.loc["MLR-SNet (Test)", "meta_learner_version"] == "1"
        assert comparison.loc["fixed", "search_trials"] == 1  # searched before the interrupt

        torch.manual_seed(1)  # another meta-learner takes the alias
        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        with mlflow.start_run(experiment_id=experiment):
            log_meta_learner(MLRSNetBundle([MLRSNet().state_dict()], [1]), "tiny", "champion")
        capsys.readouterr()
        with open_session(cfg, ["meta_train", "suite"], resume=True) as session:
            assert session.meta_learner(LEARNED["model_uri"])[1] == "1"
        moved = " (the alias @champion now points at version 2; this run loads version 1 for it)"
        assert reused + moved in capsys.readouterr().out.splitlines()

        data["meta_train"]["task"]["epochs"] = 3
        changed = parse(PipelineConfig, data, "suite")
        with pytest.raises(ConfigError) as err:
            check_resume(changed, ["meta_train", "suite"], tmp_path)
        assert str(err.value) == (
            "--resume: the meta-training config differs from the one that registered "
            "models:/tiny version 1 in meta_train.task.epochs (2 -> 3); accepted changes: none "
            "(the resumed sections go on with the meta-learner it registered); run without "
            "--resume (or with another output_dir) to start again"
        )
    finally:
        mlflow.set_tracking_uri(None)
