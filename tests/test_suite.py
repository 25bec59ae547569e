"""The transfer suite: its verdicts (computed from comparison tables), its config, and a tiny
real suite of two digits tasks (Ray Tune + Optuna, MLflow)."""

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


@pytest.mark.ray
def test_tiny_suite_runs_every_task_and_writes_the_verdicts(ray_local, tmp_path):
    from raymeta.pipeline import run_pipeline
    from raymeta.schedules import MLRSNet, MLRSNetBundle
    from raymeta.tracking import log_meta_learner, setup

    cfg = parse(PipelineConfig, config_dict(tmp_path, families=["cosine"]), "suite")
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
