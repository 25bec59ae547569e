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
