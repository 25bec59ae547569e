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

from raymeta.config import MethodConfig, PipelineConfig, TaskConfig, parse
from raymeta.errors import ConfigError
from raymeta.pipeline import run_pipeline
from raymeta.schedules import MLRSNet, MLRSNetBundle
from raymeta.tracking import log_meta_learner, setup
from raymeta.tune.compare import TRIAL_LOG
from raymeta.tune.spaces import (
    DefineByRun,
    resolve_choices,
    resolve_online_ranges,
    resolve_ranges,
    to_method,
)

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
def registry(tmp_path_factory, new_store):
    root = tmp_path_factory.mktemp("cmp")
    uri, exp = setup(new_store(root / "mlflow.db"), "tiny-compare")
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
    for config in back.loc[:1, "best_config"]:  # momentum is searched by default, as a choice
        assert json.loads(config)["momentum"] in (0.0, 0.9)
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
    children = {}
    for r in runs:
        children.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)

    def names(run):
        return sorted(r.info.run_name for r in children.get(run.info.run_id, []))

    # one tree: pipeline -> compare -> search/<family>, final -> trials and final runs
    (pipeline,) = [r for r in runs if r.info.run_name == "pipeline/tiny-compare"]
    assert names(pipeline) == ["compare"]
    (compare,) = children[pipeline.info.run_id]
    assert names(compare) == ["final", "search/cosine", "search/fixed"]
    stage = {r.info.run_name: r for r in children[compare.info.run_id]}
    assert names(stage["search/fixed"]) == [f"search/fixed/trial{i}" for i in range(3)]
    methods = ["MLR-SNet (Test)", "MLR-SNet (Train)", "cosine", "fixed"]
    assert names(stage["final"]) == [f"final/{m}/seed0" for m in methods]
    assert "comparison.parquet" in {a.path for a in client.list_artifacts(compare.info.run_id)}
    assert stage["search/cosine"].data.metrics["trials"] == 3
    assert "best.lr" in stage["search/cosine"].data.params

    # flat tags, the same names in search and final runs; the run spec as params
    trials = children[stage["search/cosine"].info.run_id]
    finals = {r.data.tags["method"]: r for r in children[stage["final"].info.run_id]}
    assert {r.data.tags["method"] for r in trials} == {"cosine"}
    for run in [*trials, *finals.values()]:
        assert {"stage", "method", "family", "seed", "task"} <= set(run.data.tags)
        assert run.data.tags["task"] == "digits/mlp"
    flat = ("stage", "method", "family", "seed", "task")
    assert [finals["cosine"].data.tags[k] for k in flat] == [
        "final",
        "cosine",
        "cosine",
        "0",
        "digits/mlp",
    ]
    assert finals["MLR-SNet (Train)"].data.tags["family"] == "mlrsnet"
    assert (
        trials[0].data.params["schedule.family"]
        == finals["cosine"].data.params["schedule.family"]
        == "cosine"
    )
    cosine = "tags.method = 'cosine' and tags.stage = 'final'"
    assert len(client.search_runs([exp.experiment_id], cosine)) == 1

    # only raymeta's own metrics: per-step curves, epoch metrics, no Tune bookkeeping
    epochs = cfg.compare.task.epochs
    for run in [*trials, *finals.values()]:
        keys = set(run.data.metrics)
        assert not keys & {"pid", "timestamp", "done", "training_iteration", "lrs"}, keys
        assert not [k for k in keys if k.startswith(("config/", "time_"))], keys
    own = {"lr", "train_loss", "lr_epoch_mean", "train_loss_epoch_mean", "test_acc", "test_loss"}
    own |= {"chance_acc", "train_time_s", "epoch_time_s", "wall_time_s"}
    assert set(finals["cosine"].data.metrics) == own  # no validation split in a final run
    assert set(finals["MLR-SNet (Train)"].data.metrics) == own | {
        "meta_loss",
        "meta_loss_epoch_mean",
    }
    for method, run in finals.items():
        lr = client.get_metric_history(run.info.run_id, "lr")
        steps = [m.step for m in lr]
        assert len(lr) > 10 * epochs and steps == sorted(steps) and steps[0] == 0, method
        acc = client.get_metric_history(run.info.run_id, "test_acc")
        assert [m.step for m in acc] == list(range(1, epochs + 1))
        row = back[back["method"] == method].iloc[0]
        assert run.data.metrics["test_acc"] == pytest.approx(row["test_acc_mean"])


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
    # the resumed comparison reopened its MLflow runs: one run per trial, in one tree
    client = mlflow.MlflowClient(data["mlflow"]["tracking_uri"])
    pipeline_id = json.loads((out / "pipeline_state.json").read_text())["parent_run_id"]
    compare_id = json.loads((out / "compare_state.json").read_text())["parent_run_id"]
    assert client.get_run(compare_id).data.tags["mlflow.parentRunId"] == pipeline_id
    experiment_id = client.get_experiment_by_name("tiny-compare").experiment_id
    for trial in finished_before:
        (run,) = client.search_runs([experiment_id], f"tags.trial_id = '{trial}'")
        assert run.info.status == "FINISHED"
        stage_id = run.data.tags["mlflow.parentRunId"]
        assert client.get_run(stage_id).data.tags["mlflow.parentRunId"] == compare_id
    # same seed, same search: the resumed study chose the same configurations as the first run
    first_cfg, first_table = first_run
    assert list(table["best_config"]) == list(first_table["best_config"])


def test_search_space_validation():
    with pytest.raises(
        ConfigError, match="unknown search family 'step'; accepted: fixed, multistep"
    ):
        resolve_ranges("step", None, weight_decay=False)
    with pytest.raises(
        ConfigError, match=r"search.ranges.cosine.lr: empty or inverted range \[0.5, 0.1\]"
    ):
        resolve_ranges("cosine", {"lr": [0.5, 0.1]}, weight_decay=False)
    with pytest.raises(
        ConfigError, match=r"search.ranges.fixed.lr: empty or inverted range \[0.1, 0.1\]"
    ):
        resolve_ranges("fixed", {"lr": [0.1, 0.1]}, weight_decay=False)
    with pytest.raises(
        ConfigError, match="search.ranges.fixed.decay: unknown parameter; accepted: lr"
    ):
        resolve_ranges("fixed", {"decay": [0.1, 0.5]}, weight_decay=False)
    with pytest.raises(ConfigError, match="the momentum values searched are search.momentum"):
        resolve_ranges("fixed", {"momentum": [0.0, 0.9]}, weight_decay=False)
    assert "weight_decay" in resolve_ranges("multistep", None, weight_decay=True)
    assert resolve_online_ranges("pb2", None, momentum=True) == {
        "lr": [1e-3, 1.0],
        "momentum": [0.0, 0.95],
    }
    assert resolve_online_ranges("pb2", {"lr": [0.01, 0.5]}, momentum=False) == {"lr": [0.01, 0.5]}
    with pytest.raises(ConfigError, match=r"search.ranges.pb2.momentum: needs 0 <= low < high < 1"):
        resolve_online_ranges("pb2", {"momentum": [0.5, 1.0]}, momentum=True)
    method = to_method(
        "multistep", {"lr": 0.1, "decay": 0.2, "first_milestone": 0.5, "second_milestone": 0.8}
    )
    assert method["params"] == {"decay": 0.2, "milestones": [0.5, 0.8]}
    adam = to_method("adam", {"lr": 0.01, "beta1": 0.9, "beta2": 0.99})
    assert adam["optimizer"] == {"optimizer": "adam", "betas": [0.9, 0.99]}


def test_momentum_is_searched_by_default_as_a_choice(tmp_path):
    """Every SGD family searches the momentum over {0, 0.9} by default (a categorical choice
    that Optuna samples beside the family's own hyper-parameters); Adam keeps its betas;
    ``search_momentum: false`` keeps the task's momentum."""
    import optuna

    default = parse(PipelineConfig, tiny(tmp_path), "tiny").compare.search
    assert default.momentum_choices == [0.0, 0.9]
    assert resolve_choices("multistep", default.momentum_choices) == {"momentum": [0.0, 0.9]}
    assert resolve_choices("adam", default.momentum_choices) == {}
    assert resolve_choices("cosine", None) == {}
    space = DefineByRun(
        "cosine", resolve_ranges("cosine", None, weight_decay=False), {}, {"momentum": [0.0, 0.9]}
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampled = []
    for _ in range(12):
        trial = study.ask()
        space(trial)
        sampled.append(trial.params)
        study.tell(trial, 0.0)
    assert {p["momentum"] for p in sampled} == {0.0, 0.9}
    method = to_method("cosine", sampled[0])
    assert method["optimizer"] == {"momentum": sampled[0]["momentum"]}
    task = MethodConfig(**to_method("fixed", {"lr": 0.1, "momentum": 0.9})).apply_optimizer(
        TaskConfig(dataset="digits", model="mlp")
    )
    assert task.momentum == 0.9

    def search(**keys):
        data = tiny(tmp_path)
        data["compare"]["search"].update(keys)
        return parse(PipelineConfig, data, "tiny").compare.search

    assert search(search_momentum=False).momentum_choices is None
    assert search(search_momentum=True).momentum_choices == [0.0, 0.9]  # the old key
    assert search(momentum=[0.9, 0.5, 0.0]).momentum_choices == [0.0, 0.5, 0.9]
    with pytest.raises(ConfigError, match="search_momentum: false and momentum: .* contradict"):
        search(search_momentum=False, momentum=[0.0, 0.9])
    with pytest.raises(
        ConfigError, match=r"compare.search.momentum.1: Input should be less than 1"
    ):
        search(momentum=[0.0, 1.0])
    with pytest.raises(ConfigError, match="momentum lists a value twice"):
        search(momentum=[0.9, 0.9])
    data = tiny(tmp_path)
    data["compare"]["task"]["nesterov"] = True
    data["compare"]["task"]["momentum"] = 0.9
    with pytest.raises(ConfigError, match="search.momentum includes 0 but task.nesterov is true"):
        parse(PipelineConfig, data, "tiny")


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (
            {"search": {"trials_per_family": 0}},
            "compare.search.trials_per_family: Input should be greater than 0",
        ),
        ({"search": {"families": ["fixed", "bogus"]}}, "unknown search family 'bogus'"),
        (
            {"search": {"families": ["fixed"], "online": ["pbt", "asha"]}},
            "compare.search.online.1: Input should be 'pbt' or 'pb2'",
        ),
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
        experiment_id="0",
        parent_run_id="none",
        describe=lambda config, number: None,  # never called: the tuner is not fitted
        total=1,
    )
    assert isinstance(tuner, tune.Tuner)  # a new experiment: the old trials and state are gone
    assert not list(saved.glob("trial_*")) and not list(saved.glob("experiment_state-*"))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"search-fixed: the saved Tune state in {saved} ")
    assert line.endswith("running this stage again from the start")


def test_a_policy_sets_the_lr_and_the_momentum_of_each_epoch():
    """A policy's stretches each build a run; the optimiser state carries over, but the
    momentum that Optimizer.load_state_dict restores is replaced by the stretch's (the reported
    momentum is read from the optimiser)."""
    from raymeta.tune.common import MLFLOW_METRICS
    from raymeta.tune.online import policy_json, train_policy

    task = TaskConfig(
        dataset="digits", model="mlp", batch_size=32, epochs=3, val_size=300, meta_per_class=0
    )
    policy = [(0.05, 0.0), (0.05, 0.9), (0.02, 0.9)]
    reports = []
    train_policy(
        task,
        policy,
        label="PBT",
        device="cpu",
        report=lambda metrics, checkpoint=None: reports.append(metrics),
    )
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert [r["momentum"] for r in reports] == [0.0, 0.9, 0.9]
    assert [r["lr"] for r in reports] == pytest.approx([0.05, 0.05, 0.02])
    assert reports[-1]["val_acc"] > 0.8 and "lrs" in reports[-1] and "lrs" not in reports[0]
    # what the trial's MLflow run gets: the momentum per epoch, the LR per global step
    points = [p for r in reports for p in json.loads(r[MLFLOW_METRICS])]
    assert [(v, step) for k, v, step in points if k == "momentum"] == [(0.0, 1), (0.9, 2), (0.9, 3)]
    lr_steps = [step for k, _, step in points if k == "lr"]
    assert lr_steps == sorted(set(lr_steps)) and lr_steps[0] == 0
    assert {round(v, 6) for k, v, _ in points if k == "lr"} == {0.05, 0.02}
    assert json.loads(policy_json(policy)) == [
        {"epochs": "1", "lr": 0.05, "momentum": 0.0},
        {"epochs": "2", "lr": 0.05, "momentum": 0.9},
        {"epochs": "3", "lr": 0.02, "momentum": 0.9},
    ]
    assert _epoch_lrs(policy_json(policy)) == policy


def _epoch_lrs(best_config: str) -> list[tuple[float, float]]:
    """A row's best policy (``policy_json``) back as one (lr, momentum) per epoch."""
    out = []
    for stretch in json.loads(best_config):
        first, _, last = stretch["epochs"].partition("-")
        out += [(stretch["lr"], stretch["momentum"])] * (int(last or first) - int(first) + 1)
    return out


def test_pbt_and_pb2_rows_search_a_population_and_replay_the_best_policy(ray_local, tmp_path):
    """PBT and PB2 as rows: a population of ``trials_per_family`` members, each trained exactly
    the task's epochs; the schedulers really exploited (a member continued from another's
    checkpoint at another LR) and PBT explored (a mutated LR); the final run replays the best
    member's per-epoch LR and momentum (MLflow's per-epoch history of the final run equals the
    policy in the table)."""
    from raymeta.tune.online import perturbations

    data = tiny(tmp_path)
    data["compare"]["task"]["epochs"] = 3
    data["compare"]["search"] = {
        "families": [],
        "online": ["pbt", "pb2"],
        "trials_per_family": 2,
        "perturbation_interval": 1,
        "ranges": {"pbt": {"lr": [0.01, 0.3]}, "pb2": {"lr": [0.01, 0.3]}},
        "seed": 7,
    }
    data["compare"]["learned"] = []
    del data["compare"]["meta_train"]
    cfg = parse(PipelineConfig, data, "tiny")
    table = run_pipeline(cfg, ["compare"])
    out = Path(cfg.output_dir)
    assert list(table["method"]) == ["PBT", "PB2"]
    assert list(table["search_trials"]) == [2, 2]
    assert (table["search_compute_s"] > 0).all() and (table["search_wall_s"] > 0).all()
    assert (table["test_acc_mean"] > 0.5).all()
    for method in ("pbt", "pb2"):
        experiment = out / "tune" / f"online-{method}"
        # synchronous, 2 members: the worse one exploits the better one after epochs 1 and 2
        steps = perturbations(experiment)
        assert len(steps) >= 1, method
        if method == "pbt":  # PB2 explores only once its GP has data: its first step copies
            assert all(new["lr"] != clone["lr"] for *_, clone, new in steps), steps
        members = [
            [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            for f in experiment.glob("trial_*/result.json")
        ]
        # the budget: every member's lineage trained the task's epochs once each, in order,
        # and none beyond them (Tune rewrote a restored member's result.json without its epoch
        # 1 once under heavy load, so the log may start later; it never repeats or overshoots)
        epochs = [[r["epoch"] for r in m] for m in members]
        assert len(epochs) == 2 and all(e == list(range(e[0], 4)) for e in epochs), epochs
        # an exploited member went on from its clone's checkpoint at another LR
        assert any(len({r["lr"] for r in m}) > 1 for m in members), method
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("tiny-compare")
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    (compare,) = [r for r in runs if r.info.run_name == "compare"]
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == compare.info.run_id]
    assert sorted(r.info.run_name for r in stages) == ["final", "search/pb2", "search/pbt"]
    for row in table.itertuples():
        method = row.method.lower()
        stage_run = by_name[f"search/{method}"]
        assert stage_run.data.params["best.policy"] == row.best_config
        assert stage_run.data.metrics["trials"] == 2
        # every member is a run of the search stage, named and tagged like a search trial;
        # its params are its first LR and momentum, the scheduler's later ones its metrics
        members = [
            r for r in runs if r.data.tags.get("mlflow.parentRunId") == stage_run.info.run_id
        ]
        assert sorted(r.info.run_name for r in members) == [
            f"search/{method}/trial0",
            f"search/{method}/trial1",
        ]
        for member in members:
            tags = member.data.tags
            assert [tags[k] for k in ("stage", "method", "family", "task")] == [
                "search",
                row.method,
                method,
                "digits/mlp",
            ]
            assert member.data.params["schedule.family"] == "fixed"
            lr = client.get_metric_history(member.info.run_id, "lr")
            assert len(lr) > 10 and [m.step for m in lr] == sorted(m.step for m in lr)
            momenta = client.get_metric_history(member.info.run_id, "momentum")
            assert sorted(m.step for m in momenta) == [1, 2, 3]
            assert "pid" not in member.data.metrics and "lrs" not in member.data.metrics
        # an exploited member's per-step LR changed within its run
        assert any(
            len({m.value for m in client.get_metric_history(r.info.run_id, "lr")}) > 1
            for r in members
        ), method
        # the final run replays the policy: its per-epoch LR and momentum are the table's
        policy = _epoch_lrs(row.best_config)
        assert len(policy) == 3
        final = by_name[f"final/{row.method}/seed0"]
        assert final.data.tags["family"] == method and final.data.tags["stage"] == "final"
        lrs = _history(client, final, "lr_epoch_mean")
        momenta = _history(client, final, "momentum")
        assert lrs == pytest.approx([lr for lr, _ in policy], rel=1e-3)
        assert momenta == pytest.approx([m for _, m in policy], rel=1e-3, abs=1e-4)


def _history(client, run, key: str) -> list[float]:
    """A metric's values in the order of their steps."""
    history = client.get_metric_history(run.info.run_id, key)
    return [m.value for m in sorted(history, key=lambda m: m.step)]
