"""A tiny real comparison (Ray Tune + OptunaSearch + ASHA, MLflow, Parquet), its resume after
the driver is killed, its validation errors, and seeded reproducibility."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from raymeta.config import PipelineConfig, parse
from raymeta.errors import ConfigError
from raymeta.pipeline import run_pipeline
from raymeta.schedules import MLRSNet, MLRSNetBundle
from raymeta.tracking import log_meta_learner, setup
from raymeta.tune.compare import TRIAL_LOG
from raymeta.tune.spaces import resolve_ranges, to_method

pytestmark = pytest.mark.ray


def tiny(tmp_path, out="out") -> dict:
    return {
        "name": "tiny-compare",
        "output_dir": str(tmp_path / out),
        "mlflow": {"experiment": "tiny-compare", "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "compare": {
            "task": {
                "dataset": "digits",
                "model": "mlp",
                "batch_size": 32,
                "epochs": 2,
                "val_size": 300,
                "meta_per_class": 0,
            },
            "search": {
                "families": ["fixed", "cosine"],
                "trials_per_family": 3,
                "max_concurrent": 2,
                "seed": 7,
            },
            "seeds": 1,
            "learned": [
                {
                    "name": "MLR-SNet (Test)",
                    "schedule": "mlrsnet",
                    "model_uri": "models:/tiny-mlrsnet@champion",
                }
            ],
            "meta_train": {"meta_every": 5, "meta_per_class": 10, "meta_batch_size": 40},
        },
    }


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    uri, exp = setup(f"sqlite:///{root}/mlflow.db", "tiny-compare")
    torch.manual_seed(0)
    with mlflow.start_run(experiment_id=exp):
        log_meta_learner(MLRSNetBundle([MLRSNet().state_dict()], [1]), "tiny-mlrsnet", "champion")
    yield root
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def first_run(ray_local, registry):
    cfg = parse(PipelineConfig, tiny(registry), "tiny")
    table = run_pipeline(cfg, ["compare"])
    return cfg, table


def test_tiny_comparison_table_and_mlflow_runs(first_run):
    cfg, table = first_run
    out = Path(cfg.output_dir)
    back = pd.read_parquet(out / "comparison.parquet")
    pd.testing.assert_frame_equal(back, table)
    assert list(back["method"]) == ["fixed", "cosine", "MLR-SNet (Test)", "MLR-SNet (Train)"]
    expected = {
        "test_acc_mean",
        "test_acc_std",
        "test_loss_mean",
        "search_trials",
        "search_compute_s",
        "search_wall_s",
        "final_wall_s_mean",
        "best_config",
    }
    assert expected <= set(back.columns)
    assert list(back["search_trials"]) == [3, 3, 0, 0]
    assert (back.loc[:1, "search_compute_s"] > 0).all() and (
        back.loc[2:, "search_compute_s"] == 0
    ).all()
    assert (back["test_acc_mean"] > 0.2).all()
    assert back.loc[2, "meta_learner_version"] == "1"
    for png in (
        "comparison_lr_curves.png",
        "comparison_test_accuracy.png",
        "accuracy_vs_search_compute.png",
    ):
        assert (out / png).stat().st_size > 0
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("tiny-compare")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == "compare/tiny-compare"]
    assert len(parents) == 1
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    stages = [r.data.tags["raymeta.stage"] for r in nested]
    assert (
        stages.count("search-fixed") == 3
        and stages.count("search-cosine") == 3
        and stages.count("final") == 4
    )
    assert "comparison.parquet" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}


def _finished_trials(tune_dir: Path) -> set[str]:
    done = set()
    for result in tune_dir.glob("*/trial_*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines and lines[-1].get("done"):
            done.add(lines[-1]["trial_id"])
    return done


def test_killed_study_resumes_without_repeating_finished_trials(
    first_run, registry, ray_local, tmp_path
):
    data = tiny(registry, out="resumed")
    cfg_file = tmp_path / "compare.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    out = Path(data["output_dir"])
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "raymeta.cli", "compare", str(cfg_file), "--address", address]
    env = {**os.environ, "RAY_ADDRESS": address}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(_finished_trials(out / "tune")) < 2:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = _finished_trials(out / "tune")
    assert len(finished_before) >= 2
    res = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    starts = [json.loads(line)["trial"] for line in (out / TRIAL_LOG).read_text().splitlines()]
    for trial in finished_before:
        assert starts.count(trial) == 1, trial
    table = pd.read_parquet(out / "comparison.parquet")
    assert list(table["search_trials"]) == [3, 3, 0, 0]
    # same seed, same search: the resumed study chose the same configurations as the first run
    first_cfg, first_table = first_run
    assert list(table["best_config"]) == list(first_table["best_config"])


def test_search_space_validation():
    with pytest.raises(
        ConfigError, match="unknown search family 'step'; accepted: fixed, multistep"
    ):
        resolve_ranges("step", None, momentum=False, weight_decay=False)
    with pytest.raises(
        ConfigError, match=r"search.ranges.cosine.lr: empty or inverted range \[0.5, 0.1\]"
    ):
        resolve_ranges("cosine", {"lr": [0.5, 0.1]}, momentum=False, weight_decay=False)
    with pytest.raises(
        ConfigError, match=r"search.ranges.fixed.lr: empty or inverted range \[0.1, 0.1\]"
    ):
        resolve_ranges("fixed", {"lr": [0.1, 0.1]}, momentum=False, weight_decay=False)
    with pytest.raises(
        ConfigError, match="search.ranges.fixed.decay: unknown parameter; accepted: lr"
    ):
        resolve_ranges("fixed", {"decay": [0.1, 0.5]}, momentum=False, weight_decay=False)
    assert "momentum" in resolve_ranges("multistep", None, momentum=True, weight_decay=False)
    method = to_method(
        "multistep", {"lr": 0.1, "decay": 0.2, "first_milestone": 0.5, "second_milestone": 0.8}
    )
    assert method["params"] == {"decay": 0.2, "milestones": [0.5, 0.8]}
    adam = to_method("adam", {"lr": 0.01, "beta1": 0.9, "beta2": 0.99})
    assert adam["optimizer"] == {"optimizer": "adam", "betas": [0.9, 0.99]}


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (
            {"search": {"trials_per_family": 0}},
            "compare.search.trials_per_family: Input should be greater than 0",
        ),
        ({"search": {"families": ["fixed", "bogus"]}}, "unknown search family 'bogus'"),
        (
            {"search": {"families": ["fixed"], "ranges": {"fixed": {"lr": [1.0, 0.1]}}}},
            "empty or inverted range",
        ),
        (
            {"learned": [{"schedule": "mlrsnet", "model_uri": "models:/absent@champion"}]},
            "cannot load meta-learner 'models:/absent@champion'",
        ),
    ],
)
def test_bad_comparison_is_one_line_error_before_any_trial(tmp_path, patch, expected):
    data = tiny(tmp_path)
    data["compare"]["learned"] = []
    for key, value in patch.items():
        data["compare"][key] = (
            {**data["compare"][key], **value} if isinstance(value, dict) else value
        )
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    res = subprocess.run(
        [sys.executable, "-m", "raymeta.cli", "compare", str(cfg_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], res.stderr
    assert not (tmp_path / "out" / "tune").exists()


@pytest.mark.parametrize("damaged", ["experiment_state", "tuner.pkl", "tuner.pkl bytes"])
def test_a_state_truncated_by_a_kill_reruns_the_stage_instead_of_forgetting_trials(
    first_run, tmp_path, capsys, damaged
):
    """Tune writes its state files in place: a driver killed mid-write leaves them empty, and
    a restore from them silently drops the finished trials (seen once under heavy load:
    3 trials became 1), or fails with an EOFError traceback (an emptied tuner.pkl). Such a
    stage is run again from the start instead, after one line."""
    from ray import tune

    from raymeta.tune.common import make_tuner, saved_state_is_intact

    cfg, _ = first_run
    saved = tmp_path / "tune" / "search-fixed"
    shutil.copytree(Path(cfg.output_dir) / "tune" / "search-fixed", saved)
    assert saved_state_is_intact(saved)
    if damaged == "experiment_state":
        newest = sorted(saved.glob("experiment_state-*.json"))[-1]
        newest.write_text("")  # what SIGKILL during json.dump leaves
        assert not saved_state_is_intact(saved)
    elif damaged == "tuner.pkl":
        (saved / "tuner.pkl").write_bytes(b"")  # the case: EOFError on restore
        assert not saved_state_is_intact(saved)
    else:
        (saved / "tuner.pkl").write_bytes(b"\x80\x05 not a pickle")  # passes the size check
    tuner = make_tuner(
        "search-fixed",
        lambda config: None,
        tune_dir=tmp_path / "tune",
        resume=True,
        param_space={},
        tune_config=tune.TuneConfig(num_samples=1),
        resources={"cpu": 1},
        tracking_uri=cfg.mlflow.tracking_uri,
        experiment="tiny-compare",
        parent_run_id="none",
        total=1,
    )
    assert isinstance(tuner, tune.Tuner)  # a new experiment: the old trials and state are gone
    assert not list(saved.glob("trial_*")) and not list(saved.glob("experiment_state-*"))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"search-fixed: the saved Tune state in {saved} ")
    assert line.endswith("running this stage again from the start")
