"""Long-tailed methods through Ray Train (TorchTrainer, local Ray, gloo): a short real MFM run
and a short real baseline run on a reduced Fashion-MNIST-LT, the modulator registered in
MLflow and reloaded by alias, its frozen transfer to digits-LT; and data-parallel MFM (the
meta-gradient averaged across workers) against one worker with the double batch."""

from __future__ import annotations

import math

import mlflow
import pandas as pd
import pytest
import torch

from raymeta.config import LongTailTaskConfig, PipelineConfig, parse
from raymeta.data.longtail import longtail_profile
from raymeta.errors import ConfigError
from raymeta.models.modulation import ModulatorNet
from raymeta.tracking import load_meta_learner

pytestmark = pytest.mark.ray

PIPELINE = {
    "name": "mfm-test",
    "ray": {"num_workers": 1},
    "mlflow": {"experiment": "mfm-test"},
    "longtail": {
        "task": {
            "dataset": "fashion_mnist",
            "n_max": 400,
            "imbalance_factor": 10,
            "class_order": "permuted",
            "epochs": 3,
        },
        "seeds": [3],
        "schedule": {"schedule": "warmup_cosine", "lr": 0.1, "params": {"warmup_fraction": 0.2}},
        "methods": [
            {"method": "ce"},
            {"method": "mfm_network", "params": {"meta_lr": 1e-3}},
        ],
        "registered_model": "mfm-test",
        "alias": "champion",
        "transfer": [
            {
                "name": "digits-LT",
                "task": {
                    "dataset": "digits",
                    "imbalance_factor": 10,
                    "meta_per_class": 0,
                    "batch_size": 50,
                    "epochs": 3,
                },
            }
        ],
    },
}


def test_mfm_and_baseline_register_reload_and_transfer(ray_local, tmp_path, monkeypatch, new_store):
    from raymeta.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    new_store(tmp_path / "mlflow.db")  # the default store, empty
    cfg = parse(PipelineConfig, {**PIPELINE, "output_dir": str(tmp_path / "out")})
    summary = run_pipeline(cfg)
    runs = pd.read_parquet(tmp_path / "out" / "mfm_runs.parquet")
    mfm, frozen = "MFM (network) + CB-RS", "MFM (frozen) + CB-RS"  # the default base loss
    assert list(runs.method) == ["CE", mfm, frozen, "CE"]
    assert list(runs.stage) == ["grid", "grid", "transfer", "transfer"]
    grid = runs[runs.stage == "grid"]
    # exact class counts of the split are recorded: IF 10 from a head of 400 images
    counts = [int(c) for c in grid.class_counts.iloc[0].split("/")]
    assert sorted(counts, reverse=True) == longtail_profile(10, 400, 10)
    assert counts[0] != 400  # permuted: class 0 is not the head
    for _, row in grid.iterrows():
        assert row.top1_acc > 0.5, row  # 10 classes: chance is 0.1
        assert row.top1_acc == pytest.approx(sum(row.per_class_acc) / 10)  # balanced test set
        assert 0 <= row.medium_acc <= 1 and row.many_acc > row.medium_acc
    transfer = runs[runs.stage == "transfer"]
    assert transfer.modulator_version.iloc[0] == "1" and transfer.top1_acc.min() > 0.3
    assert set(summary.method) == {"CE", mfm, frozen}
    assert (tmp_path / "out" / "mfm_per_class.png").stat().st_size > 10_000

    # the registry: alias -> version 1, a ModulatorNet that moved away from the identity
    modulator, version = load_meta_learner("models:/mfm-test@champion", kind="modulator")
    assert version == "1" and isinstance(modulator, ModulatorNet)
    assert modulator.mlp[2].weight.abs().sum() > 0  # zero-initialised last layer was trained
    feature = torch.randn(4, 16, 7, 7)
    assert not torch.allclose(modulator(feature, 0), feature)
    client = mlflow.MlflowClient()
    mv = client.get_model_version("mfm-test", "1")
    assert "exp IF=10" in client.get_run(mv.run_id).info.run_name
    with pytest.raises(ConfigError, match="is a ModulatorNet, not an MLR-SNet meta-learner"):
        load_meta_learner("models:/mfm-test@champion", kind="mlrsnet")

    # MLflow: a parent run, a nested run per (method, IF, seed) with counts and metrics
    exp = mlflow.get_experiment_by_name("mfm-test")
    nested = mlflow.search_runs([exp.experiment_id], filter_string="tags.stage = 'longtail'")
    assert len(nested) == 2 and nested["tags.mlflow.parentRunId"].nunique() == 1
    stage = client.get_run(nested["tags.mlflow.parentRunId"].iloc[0])
    assert stage.info.run_name == "longtail"
    assert (
        stage.data.tags["mlflow.parentRunId"]
        == mlflow.search_runs(
            [exp.experiment_id], filter_string="attributes.run_name = 'pipeline/mfm-test'"
        ).run_id.iloc[0]
    )
    assert sorted(nested["tags.mlflow.runName"]) == [
        "longtail/CE/fashion_mnist-LT exp IF=10/seed3",
        f"longtail/{mfm}/fashion_mnist-LT exp IF=10/seed3",
    ]
    assert set(nested["tags.family"]) == {"warmup_cosine"} and set(nested["tags.seed"]) == {"3"}
    assert set(nested["params.class_counts"]) == {grid.class_counts.iloc[0]}
    history = client.get_metric_history(nested.run_id.iloc[0], "test_many_acc")
    assert [m.step for m in history] == [1, 2, 3]
    mfm_run = nested[nested["tags.method"] == mfm].run_id.iloc[0]
    assert len(client.get_metric_history(mfm_run, "lr")) > 3  # per step, with the warm-up
    assert len(client.get_metric_history(mfm_run, "meta_loss")) > 3


TINY_STUDY = {
    "task": {"dataset": "digits", "n_max": 60, "imbalance_factor": 10, "meta_per_class": 5,
             "batch_size": 50, "epochs": 1},
    "seeds": [0],
    "schedule": {"schedule": "warmup_cosine", "lr": 0.1, "params": {"warmup_fraction": 0.2}},
}  # fmt: skip


def _tiny_study(tmp_path, monkeypatch, new_store, name: str, **longtail) -> PipelineConfig:
    """A pipeline with one tiny digits-LT ``longtail`` section (:data:`TINY_STUDY` updated by
    ``longtail``), its outputs and (empty) MLflow store in ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    new_store(tmp_path / "mlflow.db")
    pipeline = {"name": name, "output_dir": str(tmp_path / "out"), "ray": {"num_workers": 1},
                "mlflow": {"experiment": name}, "longtail": TINY_STUDY | longtail}  # fmt: skip
    return parse(PipelineConfig, pipeline)


def _study_records(tmp_path, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``mfm_runs.parquet`` and the MLflow runs of the study's grid, as ``search_runs`` gives
    them."""
    runs = pd.read_parquet(tmp_path / "out" / "mfm_runs.parquet")
    exp = mlflow.get_experiment_by_name(name)
    nested = mlflow.search_runs([exp.experiment_id], filter_string="tags.stage = 'longtail'")
    return runs, nested


def test_one_study_runs_the_grid_for_both_profiles(ray_local, tmp_path, monkeypatch, new_store):
    """``profiles: [exp, step]``: every method runs on both profiles, with their own class
    counts, summary rows, run names and plot panels; ``register_profile`` picks the run
    whose modulator is registered."""
    from raymeta.longtail_study import _per_class_panels
    from raymeta.pipeline import run_pipeline

    cfg = _tiny_study(
        tmp_path,
        monkeypatch,
        new_store,
        "profiles-test",
        profiles=["exp", "step"],
        methods=[
            {"method": "ce"},
            {"method": "mfm_network", "params": {"meta_lr": 1e-3}, "meta_batch_size": 50},
        ],
        registered_model="profiles-test",
        register_profile="step",
    )
    summary = run_pipeline(cfg)
    runs, nested = _study_records(tmp_path, "profiles-test")
    mfm = "MFM (network) + CB-RS"
    assert list(zip(runs.profile, runs.method, strict=True)) == [
        ("exp", "CE"), ("exp", mfm), ("step", "CE"), ("step", mfm)
    ]  # fmt: skip
    counts = {p: runs[runs.profile == p].class_counts.iloc[0] for p in ("exp", "step")}
    assert counts == {
        "exp": "/".join(map(str, longtail_profile(10, 60, 10))),
        "step": "/".join(["60"] * 5 + ["6"] * 5),
    }
    assert list(zip(summary.profile, summary.method, strict=True)) == [
        ("exp", "CE"), ("exp", mfm), ("step", "CE"), ("step", mfm)
    ]  # fmt: skip
    assert set(summary.seeds) == {1}  # one run per row: the profiles are not pooled
    for profile in ("exp", "step"):  # each summary row is its own run, not a mix
        mine = runs[(runs.profile == profile) & (runs.method == "CE")]
        row = summary[(summary.profile == profile) & (summary.method == "CE")]
        assert row.acc_overall_mean.iloc[0] == mine.top1_acc.iloc[0]
    md = (tmp_path / "out" / "mfm_summary.md").read_text()
    assert "#### grid: digits-LT, exp profile, IF 10" in md
    assert "#### grid: digits-LT, step profile, IF 10" in md
    panels, xlabels = _per_class_panels(runs)
    assert list(panels) == ["digits-LT exp IF 10", "digits-LT step IF 10"]
    assert xlabels["digits-LT step IF 10"][5] == "#5 (n=6)"
    assert sorted(nested["tags.mlflow.runName"]) == [
        "longtail/CE/digits-LT exp IF=10/seed0",
        "longtail/CE/digits-LT step IF=10/seed0",
        f"longtail/{mfm}/digits-LT exp IF=10/seed0",
        f"longtail/{mfm}/digits-LT step IF=10/seed0",
    ]
    client = mlflow.MlflowClient()
    registered = client.get_run(client.get_model_version("profiles-test", "1").run_id)
    assert registered.info.run_name == f"longtail/{mfm}/digits-LT step IF=10/seed0"


def test_dead_runs_are_dead_rows_and_the_study_goes_on(
    ray_local, tmp_path, monkeypatch, capsys, new_store
):
    """Logit adjustment with ``tau`` 1e300 (an adjustment of -inf: its loss is NaN at the first
    step) is stopped by the non-finite-loss check, first and last in the worker group (the last is the
    ``mfm_network`` run to register): both are dead rows, CE between them trains, the tables
    are written, nothing is registered and the study ends with one line saying why."""
    from raymeta.errors import DeadRunError
    from raymeta.pipeline import run_pipeline

    deadly = {"tau": 1e300}
    cfg = _tiny_study(
        tmp_path,
        monkeypatch,
        new_store,
        "dead-test",
        methods=[
            {"method": "logit_adjust", "params": deadly},
            {"method": "ce"},
            {
                "method": "mfm_network",
                "params": {"base_loss": "logit_adjust", "base_params": deadly},
                "meta_batch_size": 50,
            },
        ],
        registered_model="dead-test",
        transfer=[{"name": "digits-again", "task": TINY_STUDY["task"]}],
    )
    with pytest.raises(DeadRunError) as err:
        run_pipeline(cfg)
    la, mfm = (
        "logit adjustment | digits-LT exp IF=10 s0",
        "MFM (network) + LA | digits-LT exp IF=10 s0",
    )
    assert str(err.value) == (
        f"dead-test was not registered: its run {mfm!r} is dead (reason above), so the "
        "transfer was skipped; accepted: register_profile, register_imbalance_factor and "
        "register_seed of a live mfm_network run"
    )
    reason = "training loss is nan at step 0 (epoch 1): training diverged; "
    out = capsys.readouterr().out
    for label in (la, mfm):  # the reason, printed once per dead run
        assert out.count(f"[{label}] dead run, recorded as a dead row: {reason}") == 1
    assert out.count("dead run, recorded") == 2

    runs, nested = _study_records(tmp_path, "dead-test")
    assert list(runs.stage) == ["grid"] * 3  # no transfer run
    assert list(runs.dead) == [True, False, True]
    assert runs.dead_reason[0].startswith(reason) and pd.isna(runs.dead_reason[1])
    assert runs.top1_acc.isna().tolist() == [True, False, True]
    assert 0 < runs.top1_acc[1] <= 1 and all(math.isnan(a) for a in runs.per_class_acc[0])
    summary = pd.read_parquet(tmp_path / "out" / "mfm_summary.parquet")
    assert list(summary.dead) == [1, 0, 1] and list(summary.seeds) == [1, 1, 1]
    assert summary.acc_overall_mean[1] == runs.top1_acc[1]
    md = (tmp_path / "out" / "mfm_summary.md").read_text()
    assert "dead runs left out" in md and md.count("| 1 of 1 |") == 2
    assert "| dead" in (tmp_path / "out" / "mfm_runs.md").read_text()
    assert (tmp_path / "out" / "mfm_per_class.png").stat().st_size > 10_000

    by_method = nested.set_index("tags.method")
    assert by_method.status.to_dict() == {
        "logit adjustment": "FAILED", "CE": "FINISHED", "MFM (network) + LA": "FAILED"
    }  # fmt: skip
    assert by_method["tags.dead_reason"]["logit adjustment"] == runs.dead_reason[0]
    assert by_method["tags.dead_reason"].isna()["CE"]
    assert by_method["metrics.dead_run"].fillna(0).to_dict() == {  # CE has none
        "logit adjustment": 1.0, "CE": 0.0, "MFM (network) + LA": 1.0
    }  # fmt: skip
    assert mlflow.MlflowClient().search_registered_models() == []


def _fit_two_methods(num_workers, tmp_path):
    from raymeta.spec import LongTailRun, ScheduleSpec
    from raymeta.train.ray_train import RunRequest, fit_runs

    task = LongTailTaskConfig(
        dataset="digits", n_max=100, imbalance_factor=5, epochs=1, batch_size=40, seed=1
    )
    schedule = ScheduleSpec(family="fixed", lr=0.05)
    runs = [
        RunRequest(
            LongTailRun(
                label=f"{method}-{num_workers}",
                task=task,
                method=method,
                params=params,
                meta_batch_size=40,
                schedule=schedule,
            )
        )
        for method, params in (
            ("mfm_network", {"meta_lr": 1e-2}),  # fast look-ahead
            ("mfm_direct", {"lookahead": "exact", "meta_lr": 1e-2}),
        )
    ]
    return fit_runs(runs, name=f"dp{num_workers}", num_workers=num_workers, storage_path=tmp_path)


def test_two_workers_match_one_worker_for_both_mfm_look_aheads(ray_local, tmp_path):
    one = _fit_two_methods(1, tmp_path)
    two = _fit_two_methods(2, tmp_path)
    for a, b in zip(one, two, strict=True):
        assert a.lrs == b.lrs and len(a.lrs) > 5
        for key, value in a.model_state.items():
            torch.testing.assert_close(b.model_state[key], value, rtol=1e-4, atol=1e-5)
        mod_a, mod_b = a.rule_state["modulation"], b.rule_state["modulation"]
        for key, value in mod_a.items():
            torch.testing.assert_close(mod_b[key], value, rtol=1e-4, atol=1e-6)
        assert any(v.abs().sum() > 0 for k, v in mod_a.items() if "mlp.2" in k or "shift" in k)
        assert a.history[-1]["meta_loss"] == pytest.approx(b.history[-1]["meta_loss"], rel=0.2)


def test_mfm_design_search_selects_on_validation_and_records_the_choice(
    ray_local, tmp_path, monkeypatch, new_store
):
    """Ray Tune + Optuna over a small design space on digits-LT: every trial reports validation
    accuracy and no test metric (its data have no test split), each variant's choice is its
    best final validation accuracy, and MLflow holds the trials, the baseline and the choice."""
    import json

    from raymeta.meta.methods import build_method
    from raymeta.models.small import SmallCNN
    from raymeta.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    new_store(tmp_path / "mlflow.db")  # the default store, empty
    search = {
        "task": {
            "dataset": "digits",
            "n_max": 60,
            "imbalance_factor": 10,
            "class_order": "permuted",
            "meta_per_class": 5,
            "val_per_class": 10,
            "batch_size": 50,
            "epochs": 2,
        },
        "space": {
            "modulation": ["direct", "network+class_statistics"],
            "sites": ["stages", "embedding"],
            "base_loss": ["ce", "balanced_softmax"],
            "meta_every": [1, 2],
        },
        "schedule": {"schedule": "warmup_cosine", "lr": 0.1, "params": {"warmup_fraction": 0.2}},
        "meta_batch_size": 50,
        "trials_per_variant": 2,
        "confirm_top": 1,
        "repeats": 2,
        "baselines": [{"method": "balanced_softmax"}],
    }
    out = tmp_path / "out"
    pipeline = {"name": "search-test", "output_dir": str(out), "mfm_search": search}
    cfg = parse(PipelineConfig, {**pipeline, "mlflow": {"experiment": "search-test"}})
    trials = run_pipeline(cfg)
    # each variant its own search: 2 trials of direct, 2 of the network with class statistics
    assert len(trials) == 4 and set(trials.epochs) == {2}
    assert trials.modulation.value_counts().to_dict() == {
        "direct": 2,
        "network+class_statistics": 2,
    }
    assert trials.val_acc.between(0, 1).all() and trials.val_acc.max() > 0.1
    record = json.loads((out / "mfm_design_choice.json").read_text())
    assert record["trials"] == 4 and record["confirmed"] == 2 and record["repeats"] == 2
    confirmation = pd.read_parquet(out / "mfm_search_confirmation.parquet")
    assert len(confirmation) == 3 and set(confirmation.repeats) == {2}
    base = confirmation[confirmation.baseline].iloc[0]
    assert record["baselines_val_acc"] == {"Balanced Softmax": pytest.approx(base.val_acc)}
    for variant, info in record["chosen"].items():
        mine = trials[trials.modulation.str.startswith(variant)]
        best = mine.loc[mine.val_acc.idxmax()]
        assert info["trial"] == best.trial_id  # the confirmed candidate: the variant's best trial
        row = confirmation[confirmation.trial_id == best.trial_id].iloc[0]
        per_repeat = [float(a) / 100 for a in row.val_per_repeat.split(" / ")]
        assert (
            info["val_acc"]
            == pytest.approx(row.val_acc)
            == pytest.approx(sum(per_repeat) / 2, abs=1e-4)
        )
        assert per_repeat[0] == pytest.approx(best.val_acc, abs=1e-4)  # repeat 0 is the trial
        assert info["params"]["sites"] in ("stages", "embedding")
        model = SmallCNN(1, 10, 8)
        built = build_method(
            info["method"], [6] * 10, model, input_shape=(1, 8, 8), **info["params"]
        )
        assert built.meta_every == info["params"]["meta_every"]
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name("search-test")
    runs = mlflow.search_runs([exp.experiment_id])
    parent = runs[runs["tags.mlflow.runName"] == "mfm-search"]  # nested in pipeline/<name>
    assert len(parent) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parent.run_id.iloc[0]]
    assert len(children) == 10  # 4 trials, 2 x 2 confirmation runs and the baseline's 2
    assert set(children["tags.seed"].astype(int)) == {0, 1}
    assert children["metrics.val_acc"].notna().all()
    assert not any(c.startswith("metrics.test_") for c in runs.columns)  # no test split
    logged = client.get_run(parent.run_id.iloc[0]).data
    for variant, info in record["chosen"].items():
        assert logged.params[f"chosen.{variant}.sites"] == info["params"]["sites"]
        assert logged.metrics[f"chosen_val_acc.{variant}"] == pytest.approx(info["val_acc"])
