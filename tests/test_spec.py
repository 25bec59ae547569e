"""The run spec (JSON round trip, kinds, one-line errors), the builder on CPU for every kind,
the config's old names, the registry inputs a command checks, and the device choice."""

import json
import math
import os

import pytest
import torch

from raymeta.config import (
    SECTIONS,
    GuardConfig,
    LongTailTaskConfig,
    MetaTrainConfig,
    MethodConfig,
    OuterLoopConfig,
    PipelineConfig,
    TaskConfig,
    parse,
)
from raymeta.errors import ConfigError
from raymeta.spec import (
    HandRun,
    LearnedRun,
    LongTailRun,
    MetaTrainRun,
    ScheduleSpec,
    meta_train_run,
    method_run,
    parse_run,
)

DIGITS = TaskConfig(
    dataset="digits", model="small_cnn", batch_size=64, epochs=1, val_size=200, meta_per_class=10
)
DIGITS_LT = LongTailTaskConfig(dataset="digits", n_max=60, imbalance_factor=5, batch_size=20)
OUTER = OuterLoopConfig(meta_every=3, meta_batch_size=40)


def specs():
    return [
        HandRun(label="h", task=DIGITS, schedule=ScheduleSpec(family="cosine", lr=0.1)),
        LearnedRun(label="l", task=DIGITS, model_uri="models:/m@champion", gamma=0.5),
        meta_train_run(OUTER, DIGITS, "m", saved_epochs=[1]),
        LongTailRun(
            label="lt",
            task=DIGITS_LT,
            method="mfm_network",
            params={"meta_lr": 1e-3},
            meta_batch_size=40,
            schedule=ScheduleSpec(family="fixed", lr=0.05),
        ),
    ]


def test_every_kind_round_trips_through_json():
    for spec in specs():
        back = parse_run(json.loads(json.dumps(spec.model_dump(mode="json"))))
        assert back == spec and type(back) is type(spec)
    assert [s.kind for s in specs()] == ["hand", "learned", "meta_train", "longtail"]
    meta = specs()[2]
    assert isinstance(meta, MetaTrainRun) and (meta.meta.meta_every, meta.saved_epochs) == (3, [1])
    assert parse_run(specs()[3].model_dump(mode="json")).task.imbalance_factor == 5


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"kind": "magic"}, "'hand', 'learned', 'meta_train', 'multitask_meta_train', 'longtail'"),
        ({"schedule": {"family": "stepwise", "lr": 0.1}}, "unknown schedule 'stepwise'"),
        ({"epochs": 3}, "epochs: unknown key"),
    ],
)
def test_a_bad_spec_is_one_line_error(patch, expected):
    data = specs()[0].model_dump(mode="json") | patch
    with pytest.raises(ConfigError) as err:
        parse_run(data)
    assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_method_run_picks_the_kind_and_applies_optimizer_overrides():
    learned = method_run(
        MethodConfig(name="MLR", schedule="mlrsnet", model_uri="models:/x@y", gamma=0.3), DIGITS
    )
    assert isinstance(learned, LearnedRun) and (learned.label, learned.gamma) == ("MLR", 0.3)
    adam = method_run(
        MethodConfig(schedule="cosine", lr=0.01, optimizer={"optimizer": "adam", "momentum": 0.5}),
        DIGITS,
        "cos",
    )
    assert isinstance(adam, HandRun) and adam.label == "cos"
    assert (adam.task.optimizer, adam.task.momentum, adam.schedule.lr) == ("adam", 0.5, 0.01)


def test_old_names_are_accepted_once():
    assert parse(MetaTrainConfig, {"t_val": 7}).meta_every == 7
    cfg = parse(PipelineConfig, {"name": "x", "mfm": {"methods": [{"method": "ce"}]}})
    assert cfg.longtail.methods[0].method == "ce" and "longtail" in cfg.model_dump()
    with pytest.raises(ConfigError, match="meta_every and t_val name the same setting"):
        parse(MetaTrainConfig, {"t_val": 7, "meta_every": 8}, "p.yaml")
    with pytest.raises(ConfigError) as err:
        parse(PipelineConfig, {"name": "x"}, "p.yaml")
    assert str(err.value) == (
        "p.yaml: <root>: a pipeline needs meta_train, transfer, longtail, mfm_search, compare, "
        "study, suite or several"
    )
    # derived, not copied: the MLR-SNet sizes are the meta-learner's own defaults
    from raymeta.schedules import MLRSNet

    cell = MLRSNet()
    assert (OUTER.hidden_size, OUTER.mlp_hidden) == (cell.hidden_size, cell.mlp_hidden) == (50, 25)


def test_build_run_assembles_every_kind_on_cpu():
    from raymeta.meta.mlrsnet import MLRSNetMetaTrainer
    from raymeta.models.modulation import ModulatorNet
    from raymeta.schedules import HandSchedule, MLRSNet, MLRSNetBundle, MLRSNetSchedule
    from raymeta.train.build import build_run
    from raymeta.train.loop import Workers

    hand, learned, meta, longtail = specs()
    run = build_run(hand, "cpu", Workers(0, 2))  # batch 64 split across 2 workers
    assert isinstance(run.schedule, HandSchedule) and run.rule.meta_batch_size == 0
    assert run.steps_per_epoch == (1437 - 200 - 100) // 64 == len(run.data.train_y) // 64
    # one process: one epoch of cosine from 0.1 in 17 steps (too short for the dead-run guard)
    unguarded = hand.task.model_copy(update={"guard": GuardConfig(enabled=False)})
    state = build_run(hand.model_copy(update={"task": unguarded})).train()
    assert state.epoch == 1 and len(state.lrs) == 17 and state.lrs[0] == pytest.approx(0.1)
    assert state.lrs[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 16 / 17)))

    built = build_run(meta)
    assert isinstance(built.schedule, MLRSNetMetaTrainer) and built.rule.meta_batch_size == 40
    assert [built.schedule.is_meta_step(s) for s in range(6)] == [False, False, True] * 2

    with pytest.raises(ValueError, match="uses models:/m@champion: pass it as meta_learner"):
        build_run(learned)
    bundle = MLRSNetBundle([MLRSNet().state_dict()], [1])
    assert isinstance(build_run(learned, meta_learner=bundle).schedule, MLRSNetSchedule)

    mfm = build_run(longtail)
    assert mfm.rule.meta_batch_size == 40 and mfm.task is longtail.task
    frozen_spec = longtail.model_copy(update={"model_uri": "models:/mod@champion"})
    registered = ModulatorNet()
    frozen = build_run(frozen_spec, meta_learner=registered)
    assert frozen.rule.meta_batch_size == 0  # frozen modulator: no meta set
    attached = frozen.rule.method.modulation
    assert attached is not registered  # a copy is attached, the registered one stays detached
    for a, b in zip(attached.parameters(), registered.parameters(), strict=True):
        assert torch.equal(a, b)


def test_registry_inputs_skip_what_an_earlier_section_registers():
    from raymeta.session import registry_inputs

    cfg = parse(
        PipelineConfig,
        {
            "name": "x",
            "meta_train": {"registered_model": "lr-net"},
            "transfer": {
                "methods": [
                    {"schedule": "mlrsnet", "model_uri": "models:/lr-net@champion"},
                    {"schedule": "mlrsnet", "model_uri": "models:/other/3"},
                    {"schedule": "fixed", "lr": 0.1},
                ]
            },
            "longtail": {
                "methods": [{"method": "mfm_network"}],
                "registered_model": "mod",
                "transfer": [
                    {"name": "a", "task": {}},
                    {"name": "b", "task": {}, "model_uri": "models:/mod/1"},
                    {"name": "c", "task": {}, "model_uri": "models:/elsewhere@x"},
                ],
            },
        },
    )
    assert registry_inputs(cfg, SECTIONS) == {
        "models:/other/3": "mlrsnet",
        "models:/elsewhere@x": "modulator",
    }
    # `raymeta run` of the transfer section alone: meta_train is not run, so it is an input
    assert registry_inputs(cfg, ["transfer"]) == {
        "models:/lr-net@champion": "mlrsnet",
        "models:/other/3": "mlrsnet",
    }


def test_a_section_the_pipeline_lacks_is_refused_before_anything_starts(tmp_path):
    from raymeta.pipeline import run_pipeline

    cfg = parse(
        PipelineConfig,
        {
            "name": "only-study",
            "output_dir": str(tmp_path / "out"),
            "study": {"methods": [{"schedule": "fixed", "lr": 0.1}]},
        },
    )
    with pytest.raises(ConfigError, match="^only-study: the pipeline has no 'compare' section$"):
        run_pipeline(cfg, ["compare"])
    assert not (tmp_path / "out").exists()


def test_device_choice():
    from raymeta.train.device import resolve_device, torch_threads, worker_resources

    assert resolve_device(False) == torch.device("cpu")
    assert worker_resources(False) == {"CPU": 1.0} and worker_resources(True)["GPU"] == 1.0
    cpus = os.cpu_count() or 1
    assert torch_threads(False, 1) == cpus and torch_threads(False, 2 * cpus) == 1
    assert torch_threads(True, 1) == 1
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as err:
            resolve_device(True)
        assert "use_gpu is set but this process sees no CUDA GPU" in str(err.value)
        assert "\n" not in str(err.value)
