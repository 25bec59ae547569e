"""Transfer-study specs, grid expansion, a tiny real study, its resume and its report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raymeta.config import TransferStudyConfig, load_pipeline, parse
from raymeta.errors import ConfigError
from raymeta.tune.study import TASK_LOG, expand, read_results

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny_study.yaml"


def study(**overrides) -> TransferStudyConfig:
    base = {
        "methods": [
            {"name": "fixed", "schedule": "fixed", "lr": 0.1},
            {"name": "cos", "schedule": "cosine", "lr": 0.1},
        ]
    }
    return parse(TransferStudyConfig, base | overrides, "study")


def test_grid_expansion_with_exclusions():
    s = study(
        axes={
            "model": ["mlp", "small_cnn"],
            "batch_size": [32, 64],
            "label_noise": [None, {"type": "pair", "rate": 0.2}],
        },
        exclude=[
            {"model": "small_cnn", "batch_size": 64},
            {"label_noise": {"type": "pair"}, "method": "cos"},
        ],
        extra_tasks=[{"dataset": "tinyshakespeare", "model": "char_lstm", "batch_size": 16}],
    )
    tasks = expand(s)
    combos = {
        (
            t["task"]["model"],
            t["task"]["batch_size"],
            bool(t["task"]["label_noise"]),
            t["method"]["name"],
        )
        for t in tasks
    }
    # 2 x 2 x 2 settings x 2 methods = 16, minus small_cnn/64 (4), minus noisy cosine among the rest (3), plus text x 2
    assert len(tasks) == 16 - 4 - 3 + 2 == len({t["id"] for t in tasks})
    assert ("small_cnn", 64, False, "fixed") not in combos and (
        "mlp",
        32,
        True,
        "cos",
    ) not in combos
    assert ("mlp", 32, True, "fixed") in combos
    assert [t["task"]["dataset"] for t in tasks].count("tinyshakespeare") == 2
    assert expand(s) == tasks  # ids are stable


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"axes": {"batchsize": [32]}}, "study.axes.batchsize: unknown axis"),
        (
            {"axes": {"batch_size": [32, 0]}},
            "study task batch_size=0: batch_size: Input should be greater than 0",
        ),
        (
            {"axes": {"label_noise": [{"type": "gaussian", "rate": 0.1}]}},
            "label_noise.type: Input should be 'uniform' or 'pair'",
        ),
        ({"axes": {"epochs": []}}, "axes ['epochs'] have no values"),
        ({"exclude": [{"colour": "red"}]}, "study.exclude[0]: unknown key(s) ['colour']"),
        (
            {"axes": {"batch_size": [32]}, "exclude": [{"batch_size": 32}]},
            "the study expands to no task",
        ),
    ],
)
def test_bad_study_spec_is_one_line_error(overrides, expected):
    with pytest.raises(ConfigError) as err:
        expand(study(**overrides))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_tiny_study_file_is_valid():
    cfg = load_pipeline(TINY)
    assert len(expand(cfg.study)) == 3


@pytest.mark.ray
def test_study_resumes_without_repeating_finished_tasks_and_reports(ray_local, tmp_path, new_store):
    address = ray_local.get_runtime_context().gcs_address
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "raymeta.cli", "study", str(TINY), "--address", address,
           "--output-dir", str(out), "--tracking-uri", new_store(tmp_path / "mlflow.db")]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": address}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 180
    while time.time() < deadline and not list((out / "results").glob("*.parquet")):
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.stem for p in (out / "results").glob("*.parquet")}
    assert done_before
    res = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    starts = [json.loads(line)["task"] for line in (out / TASK_LOG).read_text().splitlines()]
    for task in done_before:
        assert starts.count(task) == 1, task
    table = read_results(str(out / "results"))
    assert len(table) == 3 and set(table["task_id"]) == {
        t["id"] for t in expand(load_pipeline(TINY).study)
    }
    assert sorted(zip(table["batch_size"], table["method"], strict=True)) == [
        (32, "cosine"),
        (32, "fixed"),
        (64, "fixed"),
    ]
    assert (table["test_acc"] > 0.5).all() and (table["wall_time_s"] > 0).all()
    report = subprocess.run(
        [sys.executable, "-m", "raymeta.cli", "report", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    md = (out / "report.md").read_text()
    assert "### By batch_size" in md and (out / "by_batch_size.png").stat().st_size > 0
    pivot = table.pivot_table(index="batch_size", columns="method", values="test_acc")
    assert f"{100 * pivot.loc[32, 'fixed']:.2f}" in md


@pytest.mark.ray
def test_raymeta_run_runs_a_study_only_pipeline(ray_local, tmp_path, new_store):
    """Every section of a pipeline runs under `raymeta run`, the transfer study included."""
    from raymeta.config import MlflowConfig
    from raymeta.pipeline import run_pipeline

    cfg = load_pipeline(TINY).model_copy(
        update={
            "output_dir": str(tmp_path / "out"),
            "mlflow": MlflowConfig(experiment="s", tracking_uri=new_store(tmp_path / "m.db")),
        }
    )
    table = run_pipeline(cfg)
    assert len(table) == 3 and (table["test_acc"] > 0.5).all()
    assert (tmp_path / "out" / "report.md").stat().st_size > 0
    # MLflow: pipeline/tiny-study -> study -> a run per task, named and tagged like every run
    import mlflow

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    study = by_name["study"]
    assert study.data.tags["mlflow.parentRunId"] == by_name["pipeline/tiny-study"].info.run_id
    tasks = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study.info.run_id]
    assert sorted(r.info.run_name for r in tasks) == [
        "study/cosine/digits/mlp/b32/2ep/seed0",
        "study/fixed/digits/mlp/b32/2ep/seed0",
        "study/fixed/digits/mlp/b64/2ep/seed0",
    ]
    for run in tasks:
        tags = run.data.tags
        assert (tags["stage"], tags["task"], tags["seed"]) == ("study", "digits/mlp", "0")
        assert tags["family"] == tags["method"]  # the methods are named after their families
        assert {"lr", "train_loss", "test_acc", "lr_epoch_mean"} <= set(run.data.metrics)
        assert not {"batch_size", "epochs", "seed", "noise_rate"} & set(run.data.metrics)
