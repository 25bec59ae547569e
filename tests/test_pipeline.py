"""The quickstart pipeline end to end on a reduced preset: real Fashion-MNIST, real Ray Train
(2 workers for meta-training), real MLflow registry, Parquet table read back."""

import mlflow
import pandas as pd
import pytest
import yaml

from raymeta.config import PipelineConfig, parse
from raymeta.pipeline import run_pipeline
from raymeta.pipelines import find_pipeline

pytestmark = pytest.mark.ray
QUICKSTART = find_pipeline("quickstart.yaml")


def reduced_quickstart(tmp_path) -> PipelineConfig:
    """The shipped quickstart.yaml with small data and budgets, plus a TorchTrainer transfer run."""
    data = yaml.safe_load(QUICKSTART.read_text())
    small = {"train_subset": 1536, "val_size": 500, "epochs": 2}
    data["meta_train"]["task"].update(small, meta_per_class=20)
    data["meta_train"]["meta_batch_size"] = 40
    data["compare"]["task"].update(small)
    data["compare"]["search"].update(trials_per_family=2)
    data["compare"]["seeds"] = 1
    data["transfer"] = {
        "task": data["compare"]["task"] | {"val_size": 0},
        "methods": [
            {
                "name": "MLR-SNet (frozen)",
                "schedule": "mlrsnet",
                "model_uri": "models:/mlrsnet-fashion@champion",
            }
        ],
    }
    data["output_dir"] = str(tmp_path / "out")
    data["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    return parse(PipelineConfig, data, "reduced quickstart")


def test_quickstart_end_to_end(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = reduced_quickstart(tmp_path)
    table = run_pipeline(cfg)
    out = tmp_path / "out"
    rows = pd.read_parquet(out / "results.parquet")
    assert list(rows["method"]) == ["MLR-SNet (meta-training)", "MLR-SNet (frozen)"]
    assert list(rows["model"]) == ["small_cnn", "mlp"] and list(rows["batch_size"]) == [128, 64]
    assert (rows["test_acc"] > 0.5).all() and rows.loc[1, "meta_learner_version"] == "1"
    back = pd.read_parquet(out / "comparison.parquet")
    pd.testing.assert_frame_equal(back, table)
    assert list(back["method"]) == ["fixed", "multistep", "MLR-SNet (Test)"]
    assert list(back["search_trials"]) == [2, 2, 0] and (back["test_acc_mean"] > 0.5).all()
    assert back.loc[2, "meta_learner_version"] == "1"
    for name in (
        "results.md",
        "comparison.md",
        "accuracy_curves.png",
        "lr_curves.png",
        "meta_train_lr.png",
    ):
        assert (out / name).stat().st_size > 0

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}

    def names(run):
        parent = run.info.run_id
        return {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}

    # one tree: the pipeline's run holds its stages, each stage its runs
    pipeline = by_name["pipeline/quickstart"]
    assert names(pipeline) == {"meta-train", "transfer", "compare"}
    meta_name = f"meta-train/MLR-SNet (meta-training)/seed{cfg.meta_train.task.seed}"
    transfer_name = f"transfer/MLR-SNet (frozen)/seed{cfg.transfer.task.seed}"
    assert names(by_name["meta-train"]) == {meta_name}
    assert names(by_name["transfer"]) == {transfer_name}
    assert names(by_name["compare"]) == {"search/fixed", "search/multistep", "final"}
    assert len(names(by_name["search/fixed"])) == 2 and len(names(by_name["final"])) == 3
    meta_run, transfer_run = by_name[meta_name], by_name[transfer_name]
    assert meta_run.data.tags["stage"] == "meta-train" and meta_run.data.tags["family"] == "mlrsnet"
    assert transfer_run.data.tags["method"] == "MLR-SNet (frozen)"

    # rank 0 of a Ray Train run: epoch metrics at step = epoch, per-step curves at step = the
    # global optimisation step
    history = client.get_metric_history(meta_run.info.run_id, "test_acc")
    assert [m.step for m in history] == [1, 2]
    lr = client.get_metric_history(meta_run.info.run_id, "lr")
    meta_loss = client.get_metric_history(meta_run.info.run_id, "meta_loss")
    assert len(lr) > 20 and [m.step for m in lr] == list(range(len(lr)))
    every = cfg.meta_train.meta_every  # under 1000 steps: every step and every meta step
    assert [m.step for m in meta_loss] == [s for s in range(len(lr)) if (s + 1) % every == 0]
    assert len(client.get_metric_history(meta_run.info.run_id, "lr_epoch_mean")) == 2
    assert (
        "lr" in transfer_run.data.metrics and "train_loss_epoch_mean" in transfer_run.data.metrics
    )

    assert transfer_run.data.tags["meta_learner_version"] == "1"
    assert str(client.get_model_version_by_alias("mlrsnet-fashion", "champion").version) == "1"
    assert {"results.parquet", "lr_curves.png"} <= {
        a.path for a in client.list_artifacts(pipeline.info.run_id)
    }
