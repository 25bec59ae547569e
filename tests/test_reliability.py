"""Bad input as a user meets it (issue 12): each kind is one line ``raymeta: error: ...`` with
exit status 2, before Ray starts and before any training, naming the value and what is
accepted. docs/reliability.md lists these cases with what each returns."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from raymeta.config import PipelineConfig, parse
from raymeta.errors import ConfigError, DataNotFoundError

RAYMETA = [sys.executable, "-m", "raymeta.cli"]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def run(args, cwd, timeout=120):
    t0 = time.perf_counter()
    res = subprocess.run(
        [*RAYMETA, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )
    return res, time.perf_counter() - t0


def one_line(res) -> str:
    """The single ``raymeta: error:`` line of a refused command (exit 2, nothing else)."""
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymeta: error: "), res.stderr[-3000:]
    return lines[0].removeprefix("raymeta: error: ")


def tiny(tmp_path, **sections) -> dict:
    """A pipeline on digits/MLP with a local store under ``tmp_path``."""
    task = {"dataset": "digits", "model": "mlp", "batch_size": 32, "epochs": 2, "val_size": 300}
    compare = {
        "task": task | {"meta_per_class": 0},
        "search": {"families": ["fixed"], "trials_per_family": 2},
        "seeds": 1,
    }
    return {
        "name": "tiny",
        "output_dir": str(tmp_path / "out"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        **{k: (compare if v == "compare" else v) for k, v in sections.items()},
    }


def write(tmp_path, data, name="p.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


# -- registration inputs (item 6) and registry names (item 4): refused before training -------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["meta-train", "--alias", "v3"],
            "meta-train: meta_train.alias: alias 'v3' is reserved by MLflow; accepted: 1-255 "
            "letters, digits, '_' or '-', other than 'latest' and v<N> (e.g. champion)",
        ),
        (
            ["meta-train", "--registered-model", ""],
            "meta-train: meta_train.registered_model: registered model name '' is empty or not "
            "a plain name; accepted: a non-empty name without '/', ':' or '@' (e.g. "
            "mlrsnet-fashion)",
        ),
        (
            ["import-reference", "--alias", "latest"],
            "--alias: alias 'latest' is reserved by MLflow; accepted: 1-255 letters, digits, "
            "'_' or '-', other than 'latest' and v<N> (e.g. champion)",
        ),
        (
            ["meta-train", "--model", "resnet9000"],
            "unknown model 'resnet9000'; accepted: "
            "small_cnn, mlp, resnet8, resnet20, resnet32, resnet56, resnet18, char_lstm, or "
            "tv:NAME for a torchvision classification model (e.g. tv:mobilenet_v2)",
        ),
    ],
)
def test_registry_names_and_aliases_are_refused_before_training(tmp_path, args, expected):
    res, _ = run([*args, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], tmp_path)
    assert one_line(res) == expected
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was touched


# -- sizes (item 4) ----------------------------------------------------------------------------


def test_workers_beyond_the_local_cpus_are_refused_before_ray_starts(tmp_path, new_store):
    new_store(tmp_path / "mlflow.db")  # the sizes are checked once the store is open
    task = {"dataset": "digits", "model": "mlp", "batch_size": 32, "epochs": 1, "val_size": 300}
    meta = {"task": task | {"meta_per_class": 10}, "meta_batch_size": 40}
    data = tiny(tmp_path, meta_train=meta) | {"ray": {"num_cpus": 2, "num_workers": 4}}
    res, seconds = run(["run", write(tmp_path, data)], tmp_path)
    assert one_line(res) == (
        "ray.num_workers=4 (Ray Train workers) needs 4 CPU(s) at once but the local Ray "
        "(ray.num_cpus=2) has 2; accepted: at most 2 CPU(s), or a larger ray.num_cpus"
    )
    assert seconds < 60 and not (tmp_path / "out" / "ray_results").exists()


def test_a_trial_larger_than_the_local_ray_is_refused(tmp_path, new_store):
    new_store(tmp_path / "mlflow.db")  # the sizes are checked once the store is open
    data = tiny(tmp_path, compare="compare") | {"ray": {"num_cpus": 2}}
    data["compare"]["search"]["cpus_per_trial"] = 3
    res, _ = run(["compare", write(tmp_path, data)], tmp_path)
    assert one_line(res) == (
        "compare.search.cpus_per_trial=3 needs 3 CPU(s) at once but the local Ray "
        "(ray.num_cpus=2) has 2; accepted: at most 2 CPU(s), or a larger ray.num_cpus"
    )


@pytest.mark.parametrize(
    ("ray", "cpus", "gpus", "expected"),
    [
        ({"use_gpu": True, "num_workers": 2}, 16, 1,
         "ray.num_workers=2 (Ray Train workers) needs 2 GPU(s) at once but WHERE has 1; "
         "accepted: at most 1 GPU(s)"),
        ({"use_gpu": True}, 2, 0,
         "ray.num_workers=1 (Ray Train workers) needs 1 GPU(s) at once but WHERE has 0; "
         "accepted: no GPU work here (ray.use_gpu false, gpus_per_trial 0)"),
        ({"num_workers": 2}, 2, 0, None),
    ],
)  # fmt: skip
def test_gpu_sizes(tmp_path, ray, cpus, gpus, expected):
    """GPUs are counted like CPUs (the numbers are given: this must not depend on the host)."""
    from raymeta.session import check_resources

    meta = {"task": {"dataset": "digits", "model": "mlp"}}
    cfg = parse(PipelineConfig, tiny(tmp_path, meta_train=meta) | {"ray": ray})
    if expected is None:
        check_resources(cfg, ["meta_train"], cpus, gpus, "WHERE")
        return
    with pytest.raises(ConfigError) as err:
        check_resources(cfg, ["meta_train"], cpus, gpus, "WHERE")
    assert str(err.value) == expected


# -- the tracking store and the output folder (items 5 and 7) ----------------------------------


def test_an_unreachable_tracking_server_fails_within_seconds(tmp_path):
    data = tiny(tmp_path, compare="compare")
    res, seconds = run(
        ["compare", write(tmp_path, data), "--tracking-uri", "http://127.0.0.1:9"], tmp_path
    )
    assert one_line(res) == (
        "MLflow tracking server http://127.0.0.1:9 did not answer within 5 s (Connection "
        "refused); accepted: a running tracking server or a local store such as "
        "sqlite:///mlflow.db"
    )
    assert seconds < 30  # the import of torch and the data check included; MLflow alone: 265 s


def test_a_sqlite_store_under_a_file_and_an_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    data = tiny(tmp_path, compare="compare")
    cfg = write(tmp_path, data)
    store = f"sqlite:///{tmp_path}/afile/mlflow.db"
    res, _ = run(["compare", cfg, "--tracking-uri", store], tmp_path)
    assert one_line(res) == (
        f"tracking store {store}: {tmp_path}/afile is a file, not a folder; accepted: a "
        "running tracking server or a local store such as sqlite:///mlflow.db in a folder"
    )
    res, _ = run(["compare", cfg, "--output-dir", str(tmp_path / "afile")], tmp_path)
    assert one_line(res) == (
        f"output_dir {tmp_path}/afile: {tmp_path}/afile is a file, not a folder; accepted: a "
        "folder (created if missing)"
    )


# -- --resume (items 2 and 3): checked before the store and Ray --------------------------------


def _state(tmp_path, config_change=None, text=None):
    data = tiny(tmp_path, compare="compare")
    out = Path(data["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    saved = parse(PipelineConfig, data).compare.model_dump(mode="json")
    for key, value in (config_change or {}).items():
        section, name = key.split(".")
        saved[section][name] = value
    state = {"parent_run_id": "0" * 32, "config": saved}
    (out / "compare_state.json").write_text(text if text is not None else json.dumps(state))
    return write(tmp_path, data)


def test_resume_with_nothing_saved_says_so(tmp_path):
    cfg = write(tmp_path, tiny(tmp_path, compare="compare"))
    res, _ = run(["compare", cfg, "--resume"], tmp_path)
    assert one_line(res) == (
        f"--resume: nothing to resume in {tmp_path}/out (no compare_state.json); run without "
        "--resume to start"
    )


def test_resume_of_a_pipeline_without_resumable_sections_says_so(tmp_path):
    from raymeta.session import check_resume

    meta = {"task": {"dataset": "digits", "model": "mlp"}}
    cfg = parse(PipelineConfig, tiny(tmp_path, meta_train=meta))
    with pytest.raises(ConfigError) as err:
        check_resume(cfg, ["meta_train"], tmp_path)
    assert str(err.value) == (
        "--resume: nothing to resume: only compare, study and suite sections resume (the "
        "other sections run again); run without --resume"
    )


def test_resume_with_a_truncated_state_file_says_so(tmp_path):
    cfg = _state(tmp_path, text='{"parent_run_id": "ab')
    res, _ = run(["compare", cfg, "--resume"], tmp_path)
    assert one_line(res).startswith(
        f"--resume: the saved state {tmp_path}/out/compare_state.json is unreadable (truncated "
        "or corrupt: Unterminated string"
    )
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("change", "listed"),
    [
        ({"task.epochs": 3}, "compare.task.epochs (3 -> 2)"),
        ({"search.trials_per_family": 5}, "compare.search.trials_per_family (5 -> 2)"),
        ({"task.epochs": 3, "search.seed": 9}, "compare.search.seed (9 -> 0), compare.task.epochs (3 -> 2)"),
    ],
)  # fmt: skip
def test_resume_with_an_incompatible_config_lists_the_keys(tmp_path, change, listed):
    cfg = _state(tmp_path, change)
    res, _ = run(["compare", cfg, "--resume"], tmp_path)
    assert one_line(res) == (
        f"--resume: the compare config differs from the saved one in {listed}; accepted "
        "changes: a larger search.trials_per_family, another search.max_concurrent; run "
        "without --resume (or with another output_dir) to start again"
    )


# -- bad files (item 7) ------------------------------------------------------------------------


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_a_corrupted_fashion_mnist_file_is_one_line(tmp_path, monkeypatch):
    from raymeta.data.datasets import DATASETS

    folder = tmp_path / "fashion-mnist"
    shutil.copytree(FASHION, folder)
    path = folder / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 200] = bytes(b ^ 0xFF for b in raw[middle : middle + 200])
    path.write_bytes(bytes(raw))
    monkeypatch.setenv("RAYMETA_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError) as err:
        DATASETS["fashion_mnist"]()  # not the per-process cache
    message = str(err.value)
    assert message.startswith(f"cannot read {path}: ") and "\n" not in message
    assert message.endswith("(the file is damaged; restore or reinstall the dataset)")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x8a\x17 random bytes, not a checkpoint " * 8, "is not a PyTorch state dict that loads with weights_only=True ("),
        ("list", "holds a list, not a state dict (a dict of tensors)"),
        ("missing", ": the MLR-SNet reference state dict lacks 2 key(s), e.g. 'layer3.bias'; accepted: layer1.fc_i2h.*, layer1.fc_h2h.*, layer3.*"),
    ],
)  # fmt: skip
def test_import_reference_with_bad_checkpoints_is_one_line(tmp_path, content, expected):
    from raymeta.schedules.reference import REFERENCE_DIR

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for epoch in (1, 100, 200):
        with (REFERENCE_DIR / f"mlr_snet_{epoch}.pth").open("rb") as f:
            (folder / f"mlr_snet_{epoch}.pth").write_bytes(f.read())
    bad = folder / "mlr_snet_100.pth"
    if content == "list":
        torch.save([torch.zeros(2)], bad)
    elif content == "missing":
        sd = torch.load(bad, map_location="cpu", weights_only=True)
        torch.save({k: v for k, v in sd.items() if not k.startswith("layer3.")}, bad)
    else:
        bad.write_bytes(content)
    res, _ = run(
        ["import-reference", "--dir", str(folder), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
        tmp_path,
    )
    line = one_line(res)
    assert line.startswith(str(bad)) and expected in line, line
    assert not (tmp_path / "m.db").exists()


def test_the_name_checks_match_what_mlflow_refuses():
    """The config's checks refuse what MLflow itself would refuse only after training."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import (
        _validate_model_alias_name,
        _validate_model_alias_name_reserved,
        _validate_model_name,
    )

    from raymeta.config import check_alias, check_registered_model_name

    def mlflow_refuses(check, value):
        try:
            check(value)
        except MlflowException:
            return True
        return False

    for alias in ["v3", "V12", "latest", "LATEST", "", "a b", "a.b", "champion", "v3a", "x" * 256]:
        ours = mlflow_refuses(lambda a: _raises_value_error(check_alias, a), alias)
        theirs = mlflow_refuses(_validate_model_alias_name, alias) or (
            alias != "" and mlflow_refuses(_validate_model_alias_name_reserved, alias)
        )
        assert ours == theirs, alias
    for name in ["", " ", "a/b", "a:b", "..", "mlrsnet", "mfm-modulator"]:
        ours = mlflow_refuses(lambda n: _raises_value_error(check_registered_model_name, n), name)
        assert ours == mlflow_refuses(_validate_model_name, name), name
    with pytest.raises(ValueError, match="contains '@'"):
        check_registered_model_name("a@b")  # raymeta's models:/NAME@ALIAS needs this too


def _raises_value_error(check, value):
    from mlflow.exceptions import MlflowException

    try:
        check(value)
    except ValueError as exc:
        raise MlflowException(str(exc)) from None


def test_output_dir_below_a_file_is_refused(tmp_path, monkeypatch):
    from raymeta.session import check_output_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"f/sub: .*/f is a file, not a folder"):
        check_output_dir(tmp_path / "f" / "sub")
    assert check_output_dir(tmp_path / "new" / "dir").is_dir()
    assert check_output_dir("rel") == tmp_path / "rel"


# -- MLflow: runs never left RUNNING, a finished run stays finished, outages (items 3 and 5) --


@pytest.fixture
def store(tmp_path, monkeypatch, new_store):
    import mlflow

    from raymeta.tracking import setup

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, exp = setup(new_store(tmp_path / "mlflow.db"), "reliability")
    yield uri, exp
    mlflow.set_tracking_uri(None)


def _session(store, tmp_path, resume):
    from raymeta.config import RayConfig
    from raymeta.session import Session

    uri, exp = store
    return Session("s", tmp_path, uri, "reliability", exp, RayConfig(), resume=resume)


def test_a_failure_after_resuming_a_finished_run_leaves_it_finished(store, tmp_path):
    """The issue's case: a finished comparison resumed with a damaged state fails later; its
    parent run stays FINISHED, and the child run that failed with it is not left RUNNING."""
    import mlflow

    with _session(store, tmp_path, False).parent_run("compare", state_file="st.json") as first:
        pass
    client = mlflow.MlflowClient()
    assert client.get_run(first.run_id).info.status == "FINISHED"
    resumed = _session(store, tmp_path, True)
    with pytest.raises(EOFError), resumed.parent_run("compare", state_file="st.json") as p:
        assert p.run_id == first.run_id and p.resumed
        child = mlflow.start_run(run_name="trial", nested=True).info.run_id
        raise EOFError("Ran out of input")  # what an emptied tuner.pkl raised
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert client.get_run(child).info.status == "FAILED"


def test_ctrl_c_marks_the_parent_and_every_running_descendant_killed(store, tmp_path):
    import mlflow

    client = mlflow.MlflowClient()
    session = _session(store, tmp_path, False)
    with pytest.raises(KeyboardInterrupt), session.parent_run("study", state_file="s") as parent:
        # a Tune trial's run and a Ray Train run below it, both created by id as they are
        trial = client.create_run(store[1], tags={"mlflow.parentRunId": parent.run_id})
        train = client.create_run(store[1], tags={"mlflow.parentRunId": trial.info.run_id})
        done = client.create_run(store[1], tags={"mlflow.parentRunId": parent.run_id})
        client.set_terminated(done.info.run_id, "FINISHED")
        raise KeyboardInterrupt
    status = {r: client.get_run(r).info.status for r in (parent.run_id, trial.info.run_id,
              train.info.run_id, done.info.run_id)}  # fmt: skip
    assert list(status.values()) == ["KILLED", "KILLED", "KILLED", "FINISHED"]


def test_epoch_metrics_survive_a_store_that_goes_away_and_comes_back(store, tmp_path, capfd):
    """A SQLite store moved away after epoch 1 (the issue's case): logging an epoch's batch of
    points (epoch metrics and per-step curves, what rank 0 and the Tune driver send) warns
    once, keeps the points and writes them all once the store is back; nothing raises."""
    import mlflow

    from raymeta.tracking import epoch_points, flush_metrics, log_points

    def epoch(k, loss, acc):  # the loop's epoch metrics plus two per-step lr points
        metrics = {"epoch": k, "train_loss": loss, "val_acc": acc}
        return epoch_points(metrics) + [("lr", 0.1 / k, 10 * k), ("lr", 0.1 / k, 10 * k + 5)]

    uri, exp = store
    run_id = mlflow.MlflowClient().create_run(exp).info.run_id
    db = tmp_path / "mlflow.db"
    assert log_points(uri, run_id, epoch(1, 2.0, 0.3))
    db.rename(tmp_path / "moved.db")
    (tmp_path / "mlflow.db").mkdir()  # the path now cannot be opened as a database
    assert not log_points(uri, run_id, epoch(2, 1.0, 0.6))
    assert not log_points(uri, run_id, epoch(3, 0.5, 0.8))
    err = capfd.readouterr().err
    assert err.count("raymeta: warning: MLflow logging to") == 1, err
    (tmp_path / "mlflow.db").rmdir()
    (tmp_path / "moved.db").rename(db)
    assert flush_metrics(uri, run_id, final=True)
    assert "works again" in capfd.readouterr().err
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(1, 0.3), (2, 0.6), (3, 0.8)]
    loss = client.get_metric_history(run_id, "train_loss_epoch_mean")
    assert [(m.step, m.value) for m in loss] == [(1, 2.0), (2, 1.0), (3, 0.5)]
    lr = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "lr"))
    assert lr == [(s, pytest.approx(0.1 / k)) for k in (1, 2, 3) for s in (10 * k, 10 * k + 5)]


def test_a_store_down_at_the_end_drops_the_buffer_with_a_warning(store, tmp_path, capfd):
    from raymeta.tracking import flush_metrics, log_points

    dead = f"sqlite:///{tmp_path}/gone/mlflow.db"  # its folder does not exist
    assert not log_points(dead, "r1", [("train_loss_epoch_mean", 1.0, 1)])
    assert not flush_metrics(dead, "r1", final=True)
    assert "1 metric value(s) of run r1 were not logged" in capfd.readouterr().err
    assert flush_metrics(dead, "r1", final=True)  # nothing left buffered


def _blocked_artifacts(tmp_path):
    """An experiment whose artifact location is a file: every artifact write fails."""
    import mlflow

    (tmp_path / "blocked").write_text("a file where the artifact folder should be")
    return mlflow.create_experiment("blocked", artifact_location=(tmp_path / "blocked").as_uri())


def test_results_files_are_kept_when_the_artifact_store_fails(store, tmp_path, capfd):
    import mlflow

    from raymeta.tracking import log_results

    table = tmp_path / "results.md"
    table.write_text("| method | acc |\n")
    with mlflow.start_run(experiment_id=_blocked_artifacts(tmp_path)):
        log_results([table])  # warns, does not raise
    assert table.read_text() == "| method | acc |\n"
    assert f"they are in {tmp_path}" in capfd.readouterr().err


def test_a_failed_registration_keeps_the_trained_meta_learner(store, tmp_path):
    import mlflow

    from raymeta.errors import RegistrationError
    from raymeta.schedules import MLRSNet, MLRSNetBundle
    from raymeta.tracking import read_meta_learner, register_meta_learner

    torch.manual_seed(0)
    bundle = MLRSNetBundle([MLRSNet().state_dict()], [2], source="trained here")
    keep = tmp_path / "out" / "meta_learner"
    blocked = _blocked_artifacts(tmp_path)
    with mlflow.start_run(experiment_id=blocked), pytest.raises(RegistrationError) as err:
        register_meta_learner(bundle, "kept", "champion", keep)
    assert str(err.value).startswith("kept was not registered (")
    assert str(err.value).endswith(f"the trained meta-learner is kept in {keep}")
    losses = torch.linspace(2.0, 0.2, 30)
    assert torch.equal(read_meta_learner(keep, str(keep))(losses), bundle(losses))
    assert mlflow.MlflowClient().search_registered_models() == []


# -- with a running Ray (the cluster's sizes, outages inside workers, registration) -----------


def _meta_train(tmp_path, **ray) -> PipelineConfig:
    task = {"dataset": "digits", "model": "mlp", "batch_size": 32, "epochs": 2,
            "val_size": 300, "meta_per_class": 10}  # fmt: skip
    meta = {"task": task, "meta_every": 5, "meta_batch_size": 40, "registered_model": "rel"}
    return parse(PipelineConfig, tiny(tmp_path, meta_train=meta) | {"ray": ray})


@pytest.mark.ray
def test_workers_beyond_a_running_clusters_cpus_are_refused(ray_local, tmp_path, new_store):
    from raymeta.pipeline import run_pipeline

    new_store(tmp_path / "mlflow.db")
    address = ray_local.get_runtime_context().gcs_address
    with pytest.raises(ConfigError) as err:
        run_pipeline(_meta_train(tmp_path, num_workers=4))
    assert str(err.value) == (
        f"ray.num_workers=4 (Ray Train workers) needs 4 CPU(s) at once but the Ray cluster at "
        f"{address} has 2; accepted: at most 2 CPU(s)"
    )


@pytest.mark.ray
def test_training_goes_on_when_the_store_fails(ray_local, tmp_path):
    """Rank 0 cannot log a single epoch (the store's folder is gone): the run still trains
    to the end and returns its results (before: the worker died, and its retry too)."""
    from raymeta.config import MethodConfig, TaskConfig
    from raymeta.spec import method_run
    from raymeta.train.ray_train import fit

    task = TaskConfig(dataset="digits", model="mlp", batch_size=32, epochs=2, val_size=300,
                      meta_per_class=0)  # fmt: skip
    result = fit(
        method_run(MethodConfig(schedule="fixed", lr=0.05), task, "outage"),
        mlflow_run_id="0" * 32,
        tracking_uri=f"sqlite:///{tmp_path}/gone/mlflow.db",
        storage_path=tmp_path / "ray",
        max_failures=0,
    )
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.history[-1]["test_acc"] > 0.5


@pytest.mark.ray
def test_a_failed_registration_still_writes_the_results_table(ray_local, tmp_path, new_store):
    """The artifact store refuses the meta-learner after training: the command ends with one
    line naming the local copy, and the results table holds the trained run."""
    import pandas as pd

    from raymeta.errors import RegistrationError
    from raymeta.pipeline import run_pipeline
    from raymeta.tracking import read_meta_learner

    new_store(tmp_path / "mlflow.db")
    (tmp_path / "mlartifacts").write_text("a file where the artifact folder should be")
    with pytest.raises(RegistrationError) as err:
        run_pipeline(_meta_train(tmp_path))
    keep = tmp_path / "out" / "meta_learner"
    assert str(err.value).startswith("rel was not registered (")
    assert str(err.value).endswith(f"the trained meta-learner is kept in {keep}")
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(table["stage"]) == ["meta-train"] and table["meta_learner_version"].isna().all()
    assert table["test_acc"].iloc[0] > 0.2
    assert read_meta_learner(keep, str(keep)).checkpoint_epochs == [1, 2]


def test_the_reliability_table_names_tests_that_exist():
    """docs/reliability.md cites its cases' tests as ``test_x.py::test_y`` (``::test_z`` for
    another test of the same file): every one exists."""
    import re

    root = Path(__file__).resolve().parent
    doc = (root.parent / "docs" / "reliability.md").read_text()
    cited, current = [], None
    for file, name in re.findall(r"`(test_\w+\.py)?::(test_\w+)", doc):
        current = file or current
        cited.append((current, name))
    assert len(cited) >= 40
    missing = [
        f"{file}::{name}"
        for file, name in cited
        if not re.search(rf"^def {name}\(", (root / file).read_text(), re.MULTILINE)
    ]
    assert missing == []
