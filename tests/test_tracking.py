"""MLflow registry round trip on a real local SQLite store (no mocks)."""

import mlflow
import pytest
import torch

from raymeta.errors import ConfigError
from raymeta.schedules import MLRSNet, MLRSNetBundle
from raymeta.tracking import (
    check_registered,
    load_meta_learner,
    log_meta_learner,
    resolve_tracking_uri,
    setup,
)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, exp = setup(None, "test-registry")
    yield uri, exp
    mlflow.set_tracking_uri(None)


def test_default_store_is_absolute_sqlite_with_artifacts_beside_it(store, tmp_path):
    uri, exp = store
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert mlflow.get_experiment(exp).artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert resolve_tracking_uri("sqlite:///rel/x.db") == f"sqlite:///{tmp_path}/rel/x.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_register_and_load_by_alias_gives_identical_lrs(store):
    torch.manual_seed(0)
    bundle = MLRSNetBundle([MLRSNet().state_dict() for _ in range(3)], [1, 2, 3], source="test")
    with mlflow.start_run(experiment_id=store[1]):
        v1 = log_meta_learner(bundle, "mlrsnet-test", "champion")
    torch.manual_seed(1)
    other = MLRSNetBundle([MLRSNet().state_dict()], [5])
    with mlflow.start_run(experiment_id=store[1]):
        v2 = log_meta_learner(other, "mlrsnet-test", "challenger")
    assert (v1, v2) == ("1", "2")
    loaded, version = load_meta_learner("models:/mlrsnet-test@champion")
    assert version == "1" and loaded.checkpoint_epochs == [1, 2, 3]
    losses = torch.linspace(2.3, 0.1, 50)
    for k in range(3):
        assert torch.equal(loaded(losses, k), bundle(losses, k))
    assert load_meta_learner("models:/mlrsnet-test@challenger")[1] == "2"
    assert load_meta_learner("models:/mlrsnet-test/1")[1] == "1"  # by version, recorded too


def test_registered_model_pins_the_installed_packages_and_tags_raymeta(store):
    """requirements.txt pins what is installed (no hard-coded versions); raymeta itself, on no
    package index, is a tag of the run and of the model version instead of a requirement."""
    from importlib.metadata import version
    from pathlib import Path

    import raymeta

    with mlflow.start_run(experiment_id=store[1]) as run:
        v = log_meta_learner(MLRSNetBundle([MLRSNet().state_dict()], [1]), "pins", "champion")
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/pins@champion"))
    lines = set(requirements.read_text().split())
    assert {f"{p}=={version(p)}" for p in ("torch", "cloudpickle", "mlflow")} <= lines
    assert not any(line.startswith("raymeta") for line in lines)
    client = mlflow.MlflowClient()
    assert client.get_model_version("pins", v).tags["raymeta_version"] == raymeta.__version__
    assert client.get_run(run.info.run_id).data.tags["raymeta_version"] == raymeta.__version__


def test_missing_alias_and_wrong_model_are_one_line_errors(store):
    with mlflow.start_run(experiment_id=store[1]):
        mlflow.pytorch.log_model(
            torch.nn.Linear(2, 1),
            name="m",
            serialization_format="pickle",
            pip_requirements=["torch"],
            registered_model_name="not-a-schedule",
        )
    mlflow.MlflowClient().set_registered_model_alias("not-a-schedule", "champion", "1")
    with pytest.raises(ConfigError, match="is a Linear, not an MLR-SNet meta-learner"):
        load_meta_learner("models:/not-a-schedule@champion")
    with pytest.raises(
        ConfigError, match="cannot load meta-learner 'models:/nothing@champion'"
    ) as err:
        load_meta_learner("models:/nothing@champion")
    assert "\n" not in str(err.value)


def test_registry_inputs_are_checked_before_ray_with_the_accepted_values(store, tmp_path, capsys):
    with mlflow.start_run(experiment_id=store[1]):
        log_meta_learner(MLRSNetBundle([MLRSNet().state_dict()], [1]), "lr-net", "champion")
    check_registered("models:/lr-net@champion")  # exists: no error
    check_registered("models:/lr-net/1")
    check_registered("runs:/abc/model")  # not a registry URI: left to the loader
    cases = {
        "models:/lr-net@champoin": r"no alias 'champoin' .*accepted: @champion, or a version /1",
        "models:/lr-net/7": r"no version '7' .*accepted: 1, @champion$",
        "models:/lr-nett@champion": r"no registered model 'lr-nett' .*accepted: lr-net",
    }
    for uri, message in cases.items():
        with pytest.raises(ConfigError, match=message) as err:
            check_registered(uri)
        assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    # the CLI fails with that line before starting Ray (exit code 2, no traceback)
    from raymeta.cli import main

    argv = ["mfm", "transfer", "--model-uri", "models:/lr-net@champoin", "--dataset", "digits"]
    capsys.readouterr()  # drop the registration's MLflow warnings
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raymeta: error: registered model 'lr-net' has no alias 'champoin'")
    assert "\n" not in err


def test_step_curves_keep_at_most_the_point_budget_on_the_global_step():
    from raymeta.tracking import StepCurves, epoch_points
    from raymeta.train.rules import StepResult

    curves = StepCurves(total_steps=2500, points=1000)  # stride 3
    assert curves.stride == 3
    for step in range(2500):
        meta = float(step) if step % 2 == 0 else None  # a meta step every 2 steps
        curves(
            step, StepResult(loss=1.0 / (step + 1), lr=0.1 * 0.5 ** (step // 1000), meta_loss=meta)
        )
    points = curves.drain()
    assert curves.drain() == []
    lr = [(step, v) for k, v, step in points if k == "lr"]
    assert len(lr) == 834 and lr[0] == (0, 0.1) and lr[-1][0] == 2499
    assert [s for s, _ in lr[:3]] == [0, 3, 6]
    assert (999, 0.1) in lr and (1002, 0.05) in lr  # the step of a MultiStep-like drop shows
    meta = [step for k, _, step in points if k == "meta_loss"]
    assert len(meta) == 833 and meta[:3] == [0, 4, 6]  # first meta step of each stride
    loss = {step: v for k, v, step in points if k == "train_loss"}
    assert loss[3] == 0.25
    epoch = epoch_points(
        {"epoch": 2, "lr": 0.05, "train_loss": 0.3, "val_acc": float("nan"), "test_acc": 0.9}
    )
    assert epoch == [
        ("lr_epoch_mean", 0.05, 2),
        ("train_loss_epoch_mean", 0.3, 2),
        ("test_acc", 0.9, 2),
    ]


def test_points_and_tags_land_in_one_run(store):
    from raymeta.config import MethodConfig, TaskConfig
    from raymeta.spec import method_run
    from raymeta.tracking import log_points, run_name, run_tags

    task = TaskConfig(dataset="digits", model="mlp", seed=3)
    spec = method_run(MethodConfig(schedule="multistep", lr=0.1), task)
    tags = run_tags(spec, "final", "multistep")
    assert tags == {
        "stage": "final",
        "method": "multistep",
        "family": "multistep",
        "seed": "3",
        "task": "digits/mlp",
    }
    learned = method_run(MethodConfig(schedule="mlrsnet", model_uri="models:/x@champion"), task)
    assert run_tags(learned, "transfer", "MLR-SNet")["family"] == "mlrsnet"
    name = run_name("final", "MLR-SNet (Test)", 0)
    assert name == "final/MLR-SNet (Test)/seed0"
    with mlflow.start_run(experiment_id=store[1], run_name=name, tags=tags) as run:
        pass
    points = [("lr", 0.1, s) for s in range(1500)] + [
        ("test_acc", 0.5, 1),
        ("val_acc", float("nan"), 1),
    ]
    log_points(store[0], run.info.run_id, points)  # > 1000: MLflow splits the batch
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 1500
    found = mlflow.search_runs([store[1]], filter_string="tags.method = 'multistep'")
    assert list(found["tags.mlflow.runName"]) == [name]
    assert set(client.get_run(run.info.run_id).data.metrics) == {"lr", "test_acc"}
