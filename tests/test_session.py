"""The session skeleton (:mod:`raymeta.session`) without Ray: how its MLflow runs end, what it
checks before it creates anything, and what it prints at the end."""

import pytest

from raymeta.config import PipelineConfig, RayConfig, parse

TASK = {"dataset": "digits", "model": "mlp", "batch_size": 32, "epochs": 2, "val_size": 300}


@pytest.fixture
def store(tmp_path, monkeypatch, new_store):
    """An empty SQLite store under ``tmp_path``: ``(tracking URI, experiment id)``."""
    import mlflow

    from raymeta.tracking import setup

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_store(tmp_path / "mlflow.db"))
    yield setup(None, "session")
    mlflow.set_tracking_uri(None)


def statuses(experiment_id: str) -> dict[str, str]:
    """Run name -> status of every run of the experiment."""
    import mlflow

    runs = mlflow.MlflowClient().search_runs([experiment_id])
    return {r.info.run_name: r.info.status for r in runs}


@pytest.mark.parametrize(
    ("raised", "status"), [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")]
)
@pytest.mark.parametrize("section", ["meta_train", "transfer"])
def test_a_training_run_ends_killed_on_ctrl_c_and_failed_on_an_error(
    store, tmp_path, monkeypatch, section, raised, status
):
    """Ctrl+C (or an error) while Ray Train trains a stage's run: the training run ends as
    its stage and the pipeline run do (MLflow's own context manager would end it FAILED)."""
    import raymeta.train.ray_train
    from raymeta.pipeline import run_meta_train, run_transfer
    from raymeta.session import Session

    def fit(*args, **kwargs):
        raise raised

    monkeypatch.setattr(raymeta.train.ray_train, "fit", fit)
    data = {
        "meta_train": {"task": TASK | {"meta_per_class": 20}},
        "transfer": {
            "task": TASK | {"meta_per_class": 0},
            "methods": [{"schedule": "fixed", "lr": 0.1}],
        },
    }
    cfg = parse(PipelineConfig, {"name": "p", "output_dir": str(tmp_path), section: data[section]})
    session = Session("p", tmp_path, store[0], "session", store[1], RayConfig())
    stage = {"meta_train": "meta-train", "transfer": "transfer"}[section]
    run_stage = {"meta_train": run_meta_train, "transfer": run_transfer}[section]
    with pytest.raises(raised), session.parent_run("pipeline") as parent, parent.stage(stage):
        run_stage(getattr(cfg, section), session, 1)
    training = {
        "meta_train": "meta-train/MLR-SNet (meta-training)/seed0",
        "transfer": "transfer/fixed/seed0",
    }[section]
    assert statuses(store[1]) == {"pipeline/p": status, stage: status, training: status}


def _pipeline(tmp_path, **update) -> PipelineConfig:
    transfer = {"task": TASK | {"meta_per_class": 0}, "methods": [{"schedule": "fixed", "lr": 0.1}]}
    data = {"name": "p", "output_dir": str(tmp_path / "out"), "transfer": transfer}
    return parse(PipelineConfig, data | update)


@pytest.mark.parametrize("own_store", [False, True])
def test_the_end_line_gives_raymeta_ui_the_store_unless_it_is_the_default(
    tmp_path, monkeypatch, capsys, new_store, own_store
):
    """``raymeta ui`` opens ``$MLFLOW_TRACKING_URI`` or ./mlflow.db: the end line adds
    ``--tracking-uri`` only for another store. The session runs without Ray (its connection
    replaced), on an empty store already there."""
    import mlflow

    import raymeta.session
    from raymeta.session import open_session

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")  # restored after the test, then unset:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # open_session exports the store it uses
    monkeypatch.setattr(raymeta.session, "connect_ray", lambda cfg: False)
    store = new_store(tmp_path / "runs" / "other.db" if own_store else tmp_path / "mlflow.db")
    cfg = _pipeline(tmp_path, mlflow={"tracking_uri": store} if own_store else {})
    try:
        with open_session(cfg, []):
            pass
    finally:
        mlflow.set_tracking_uri(None)
    uri = store if own_store else f"sqlite:///{tmp_path}/mlflow.db"
    flag = f" --tracking-uri {uri}" if own_store else ""
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"browse the runs: raymeta ui{flag}   (or: mlflow ui --backend-store-uri {uri} "
        "--host 127.0.0.1)"
    )


def test_a_refused_resume_creates_no_output_folder(tmp_path, monkeypatch):
    from raymeta.errors import ConfigError
    from raymeta.session import open_session

    monkeypatch.chdir(tmp_path)
    compare = {"task": TASK | {"meta_per_class": 0}, "search": {"families": ["fixed"]}}
    cfg = _pipeline(tmp_path / "new", compare=compare)
    with pytest.raises(ConfigError) as err, open_session(cfg, ["compare"], resume=True):
        pass
    assert str(err.value) == (
        f"--resume: nothing to resume in {tmp_path}/new/out (no compare_state.json); run "
        "without --resume to start"
    )
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a tracking store


@pytest.mark.parametrize("was_finished", [False, True])
def test_a_nested_run_ends_killed_on_ctrl_c_unless_it_was_finished(store, was_finished):
    """``nested_run`` as ``import-reference`` (a new run) and the long-tail registration (a
    finished run reopened to log the modulator) use it: Ctrl+C ends a new run KILLED and
    leaves a reopened finished run FINISHED (MLflow's own context manager: FAILED)."""
    import mlflow

    from raymeta.session import nested_run

    with mlflow.start_run(experiment_id=store[1], run_name="earlier") as earlier:
        pass
    start = {"run_id": earlier.info.run_id} if was_finished else {"run_name": "new"}
    with (
        pytest.raises(KeyboardInterrupt),
        nested_run(experiment_id=store[1], **start, was_finished=was_finished),
    ):
        raise KeyboardInterrupt
    expected = {"earlier": "FINISHED"} | ({} if was_finished else {"new": "KILLED"})
    assert statuses(store[1]) == expected
    assert mlflow.active_run() is None
