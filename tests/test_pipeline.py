"""The quickstart pipeline end to end on a reduced preset: real Fashion-MNIST, real Ray Train
(2 workers for meta-training), real MLflow registry, Parquet table read back."""

from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from raymeta.config import PipelineConfig, parse
from raymeta.pipeline import run_pipeline

pytestmark = pytest.mark.ray
QUICKSTART = Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.yaml"


def reduced_quickstart(tmp_path) -> PipelineConfig:
    data = yaml.safe_load(QUICKSTART.read_text())
    small = {"train_subset": 1536, "val_size": 500, "epochs": 2}
    data["meta_train"]["task"].update(small, meta_per_class=20)
    data["meta_train"]["meta_batch_size"] = 40
    data["transfer"]["task"].update(small)
    data["output_dir"] = str(tmp_path / "out")
    data["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    return parse(PipelineConfig, data, "reduced quickstart")


def test_quickstart_end_to_end(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = reduced_quickstart(tmp_path)
    df = run_pipeline(cfg)
    out = tmp_path / "out"
    back = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(back, df)
    assert list(back["method"]) == [
        "MLR-SNet (meta-training)",
        "MLR-SNet (frozen)",
        "fixed LR",
        "MultiStep",
    ]
    assert {
        "test_acc",
        "test_loss",
        "wall_time_s",
        "meta_learner_version",
        "model",
        "batch_size",
    } <= set(back.columns)
    assert (back["test_acc"] > 0.5).all() and (back["wall_time_s"] > 0).all()
    assert list(back["model"]) == ["small_cnn", "mlp", "mlp", "mlp"]
    assert back.loc[1, "meta_learner_version"] == "1"
    for name in ("results.md", "accuracy_curves.png", "lr_curves.png", "meta_train_lr.png"):
        assert (out / name).stat().st_size > 0

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 5
    children = {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    assert set(children) == {
        "meta-train",
        "transfer/MLR-SNet (frozen)",
        "transfer/fixed LR",
        "transfer/MultiStep",
    }
    history = client.get_metric_history(children["transfer/fixed LR"].info.run_id, "test_acc")
    assert [m.step for m in history] == [1, 2]
    assert children["transfer/MLR-SNet (frozen)"].data.tags["meta_learner_version"] == "1"
    assert str(client.get_model_version_by_alias("mlrsnet-fashion", "champion").version) == "1"
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"results.parquet", "results.md", "lr_curves.png"} <= artifacts
