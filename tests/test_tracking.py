"""MLflow registry round trip on a real local SQLite store (no mocks)."""

import contextlib

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


def schema(path) -> set[tuple[str, str, frozenset[str]]]:
    """The tables, indexes and triggers of a SQLite file, and its MLflow schema revision: each
    statement as the set of its lines without commas (MLflow's migrations put a table's
    constraints in an order that varies from one store they make to the next)."""
    import sqlite3

    query = (
        "SELECT type, name, sql FROM sqlite_master "
        "UNION ALL SELECT 'revision', version_num, '' FROM alembic_version"
    )
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute(query).fetchall()
    return {
        (kind, name, frozenset((sql or "").replace(",", "").split("\n")))
        for kind, name, sql in rows
    }


@pytest.fixture
def store(tmp_path, monkeypatch, new_store):
    """The default store (./mlflow.db in the test's folder), empty: ``(uri, experiment id)``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    new_store(tmp_path / "mlflow.db")
    uri, exp = setup(None, "test-registry")
    yield uri, exp
    mlflow.set_tracking_uri(None)


def test_default_store_is_absolute_sqlite_with_artifacts_beside_it(
    tmp_path, monkeypatch, new_store
):
    """setup makes the default store; a copy of the tests' migrated store (``new_store``) opens
    as the same store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        uri, exp = setup(None, "test-registry")
        assert uri == f"sqlite:///{tmp_path}/mlflow.db"
        assert mlflow.get_experiment(exp).artifact_location == (tmp_path / "mlartifacts").as_uri()
        made = {e.experiment_id: e.name for e in mlflow.search_experiments()}
        default = mlflow.get_experiment("0").artifact_location  # MLflow's, under the cwd
        _, copy_exp = setup(new_store(tmp_path / "copy" / "mlflow.db"), "test-registry")
        assert (
            mlflow.get_experiment(copy_exp).artifact_location
            == (tmp_path / "copy" / "mlartifacts").as_uri()
        )
        assert {e.experiment_id: e.name for e in mlflow.search_experiments()} == made
        assert mlflow.get_experiment("0").artifact_location == default
    finally:
        mlflow.set_tracking_uri(None)
    made_schema = schema(tmp_path / "mlflow.db")
    assert len(made_schema) > 30 and schema(tmp_path / "copy" / "mlflow.db") == made_schema
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


def test_registered_meta_learner_is_data_with_its_story(store):
    """A registered meta-learner is a state dict plus JSON (no pickle: loading runs no code),
    with an input signature, pinned requirements, a description and tags that say where it
    comes from (issue 12 item 9, issue 13 item 4)."""
    import json
    from importlib.metadata import version
    from pathlib import Path

    import raymeta

    bundle = MLRSNetBundle([MLRSNet().state_dict()] * 2, [1, 3], source="meta-trained on digits")
    with mlflow.start_run(experiment_id=store[1]) as run:
        v = log_meta_learner(
            bundle, "story", "champion", metadata={"task": "digits/mlp", "test_acc": 0.91}
        )
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/story@champion"))
    assert {"MLmodel", "weights.pt", "config.json", "requirements.txt"} <= {
        p.name for p in folder.iterdir()
    }
    weights = torch.load(folder / "weights.pt", weights_only=True)  # plain tensors only
    assert set(weights) == {f"cells.{i}.{k}" for i in (0, 1) for k in MLRSNet().state_dict()}
    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == "mlrsnet" and config["hyper_parameters"]["checkpoint_epochs"] == [1, 3]
    info = mlflow.models.get_model_info("models:/story@champion")
    assert set(info.flavors) == {"raymeta"}  # no pytorch (pickle) flavor
    assert info.signature.inputs.input_names() == ["training_loss"]
    assert info.signature.outputs.input_names() == ["unit_lr"]
    pins = set((folder / "requirements.txt").read_text().split())
    assert pins == {f"torch=={version('torch').split('+')[0]}", f"mlflow=={version('mlflow')}"}
    client = mlflow.MlflowClient()
    mv = client.get_model_version("story", v)
    assert mv.tags == {
        "kind": "mlrsnet",
        "raymeta_version": raymeta.__version__,
        "source_run": run.info.run_id,
        "task": "digits/mlp",
        "test_acc": "0.91",
    }
    assert mv.description == "meta-trained on digits"
    assert client.get_registered_model("story").description.startswith("MLR-SNet meta-learner")
    assert client.get_run(run.info.run_id).data.tags["raymeta_version"] == raymeta.__version__


def test_pickled_versions_load_only_when_allowed_and_damaged_ones_are_one_line(store):
    """Versions an older raymeta logged as pickles run code when loaded: refused unless
    allow_pickle; a damaged stored meta-learner is one line, not a traceback."""
    from pathlib import Path

    torch.manual_seed(0)
    bundle = MLRSNetBundle([MLRSNet().state_dict()], [1])
    with mlflow.start_run(experiment_id=store[1]):
        for model, name in ((bundle, "old-pickle"), (torch.nn.Linear(2, 1), "not-a-schedule")):
            mlflow.pytorch.log_model(
                model,
                name=name,
                serialization_format="pickle",
                pip_requirements=["torch"],
                registered_model_name=name,
            )
            mlflow.MlflowClient().set_registered_model_alias(name, "champion", "1")
    with pytest.raises(ConfigError) as err:
        load_meta_learner("models:/old-pickle@champion")
    assert str(err.value) == (
        "'models:/old-pickle@champion' is stored as a pickle (logged by an older raymeta): "
        "loading it runs code from the store; if you trust this store, allow it with "
        "mlflow.allow_pickle: true or --allow-pickle"
    )
    loaded, version = load_meta_learner("models:/old-pickle@champion", allow_pickle=True)
    losses = torch.linspace(2.3, 0.1, 20)
    assert version == "1" and torch.equal(loaded(losses), bundle(losses))
    with pytest.raises(ConfigError, match="is a Linear, not an MLR-SNet meta-learner"):
        load_meta_learner("models:/not-a-schedule@champion", allow_pickle=True)

    with mlflow.start_run(experiment_id=store[1]):
        log_meta_learner(bundle, "damaged", "champion")
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/damaged@champion"))
    (folder / "weights.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError) as err:
        load_meta_learner("models:/damaged@champion")
    assert str(err.value).startswith(
        "models:/damaged@champion: the stored meta-learner is unreadable ("
    ) and "\n" not in str(err.value)


def test_missing_model_is_a_one_line_error(store):
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
