"""The dead-run guard on real data (sklearn digits, an MLP) and on loss sequences."""

import json
import math

import pytest

from raymeta.config import GuardConfig, TaskConfig
from raymeta.errors import DeadRunError, NonFiniteLossError
from raymeta.schedules import HandSchedule
from raymeta.train.guard import ProgressGuard
from raymeta.train.loop import (
    RunState,
    build_task_model,
    load_task_data,
    majority_fraction,
    train,
)

TASK = TaskConfig(
    dataset="digits", model="mlp", batch_size=64, epochs=2, val_size=0, meta_per_class=0
)


def test_guard_passes_a_run_that_learns_and_records_l0():
    data = load_task_data(TASK)
    model = build_task_model(TASK, data, "cpu")
    state = train(TASK, data, model, HandSchedule("fixed", 0.1, 40, 20))
    assert state.initial_loss == pytest.approx(math.log(10), abs=0.3)
    assert state.history[-1]["train_loss"] < 0.7 * state.initial_loss
    # digits' test split is balanced: chance is about 1/10
    assert state.history[-1]["chance_acc"] == pytest.approx(0.1, abs=0.02)


def test_run_at_chance_stops_after_one_epoch_with_its_lr():
    data = load_task_data(TASK)
    model = build_task_model(TASK, data, "cpu")
    seen = []
    with pytest.raises(DeadRunError, match="no progress") as err:
        train(
            TASK,
            data,
            model,
            HandSchedule("fixed", 1e-7, 40, 20),
            on_epoch_end=lambda m, s, o: seen.append(m["epoch"]),
        )
    msg = str(err.value)
    assert "\n" not in msg
    n_steps = len(data.train_y) // TASK.batch_size
    assert f"after {n_steps} steps" in msg and "LR 1e-07" in msg
    assert seen == []  # stopped inside the first epoch, before its end-of-epoch hook


def test_patience_is_configurable_and_the_guard_can_be_switched_off():
    data = load_task_data(TASK)
    for guard, stops in (
        (GuardConfig(patience_steps=5), True),
        (GuardConfig(enabled=False), False),
    ):
        task = TASK.model_copy(update={"guard": guard, "epochs": 1})
        model = build_task_model(task, data, "cpu")
        if stops:
            with pytest.raises(DeadRunError, match="after 5 steps"):
                train(task, data, model, HandSchedule("fixed", 1e-7, 20, 20))
        else:
            state = train(task, data, model, HandSchedule("fixed", 1e-7, 20, 20))
            assert state.epoch == 1


def test_guard_sequences():
    g = ProgressGuard(4, window=2)
    for step, loss in enumerate([2.3, 2.0, 1.5, 1.2]):
        g.check(step, loss, 0.1)  # learning: no error
    g = ProgressGuard(4, window=2)
    with pytest.raises(DeadRunError, match=r"2\.29 .*after 4 steps"):
        for step, loss in enumerate([2.3, 2.31, 2.3, 2.28]):
            g.check(step, loss, 0.1)
    g = ProgressGuard(100, window=2, max_loss_ratio=3.0)
    with pytest.raises(DeadRunError, match="grew to"):
        for step, loss in enumerate([1.0, 2.0, 5.0, 7.0]):
            g.check(step, loss, 0.1)
    with pytest.raises(NonFiniteLossError):
        ProgressGuard(10).check(0, math.nan, 0.1)
    resumed = ProgressGuard(3, window=2, initial_loss=2.0)  # L0 restored from a checkpoint
    resumed.check(2, 1.5, 0.1)
    assert resumed.initial_loss == 2.0


def test_resumed_run_keeps_its_initial_loss():
    data = load_task_data(TASK)
    model = build_task_model(TASK, data, "cpu")
    task1 = TASK.model_copy(update={"epochs": 1})
    state = train(task1, data, model, HandSchedule("fixed", 0.1, 40, 20))
    l0 = state.initial_loss
    resumed = RunState(**{**state.__dict__})
    train(TASK, data, model, HandSchedule("fixed", 0.1, 40, 20), state=resumed)
    assert resumed.initial_loss == l0 and resumed.epoch == 2


def test_nesterov_needs_momentum():
    from raymeta.errors import ConfigError

    with pytest.raises(ValueError, match="nesterov needs momentum"):
        TaskConfig(nesterov=True)
    assert TaskConfig(nesterov=True, momentum=0.9).nesterov
    assert isinstance(ConfigError("x"), ValueError)


def test_majority_fraction():
    import torch

    assert majority_fraction(torch.tensor([0, 1, 1, 1])) == 0.75
    assert majority_fraction(torch.tensor([[2, 2], [3, 2]])) == 0.75


def test_meta_learner_at_chance_is_not_registered():
    from raymeta.pipeline import check_not_at_chance

    check_not_at_chance({"test_acc": 0.80, "chance_acc": 0.10}, "models:/m")
    with pytest.raises(DeadRunError) as err:
        check_not_at_chance({"test_acc": 0.10, "chance_acc": 0.10}, "models:/m")
    assert str(err.value) == (
        "meta-training ended at chance level (test accuracy 10.00%, chance 10.00%); models:/m "
        "was not registered; change the task's momentum or weight_decay (meta-training's LR "
        "comes from MLR-SNet, scaled by gamma from the initial loss), or train longer"
    )


def test_a_dead_search_trial_is_a_poor_result_and_a_final_run_an_error():
    """Inside a search, a configuration that kills training reports val_acc 0 and ends (the
    search goes on); a run whose result a user reads fails with the one-line error."""
    from raymeta.spec import HandRun, ScheduleSpec
    from raymeta.tune.common import MLFLOW_METRICS, train_trial

    dead = HandRun(label="t", task=TASK, schedule=ScheduleSpec(family="fixed", lr=1e-7))
    reports = []
    train_trial(dead, reports.append, dead_run_is_result=True)
    (report,) = reports
    points = json.loads(report.pop(MLFLOW_METRICS))
    assert report == {"val_acc": 0.0, "dead_run": 1.0}
    assert points[0] == ["dead_run", 1.0, 0]  # and the run's per-step curves up to its stop
    lr = [step for key, _, step in points if key == "lr"]
    assert lr == list(range(len(lr))) and len(lr) > 1
    with pytest.raises(DeadRunError):
        train_trial(dead, reports.append)


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        (
            "meta-training",
            "the task's momentum or weight_decay (meta-training's LR comes from MLR-SNet, "
            "scaled by gamma from the initial loss)",
        ),
        (
            "frozen MLR-SNet",
            "the method's gamma (default: set from the initial loss) or the momentum",
        ),
        ("hand-designed", "the learning rate or the momentum"),
    ],
)
def test_a_diverging_run_names_the_settings_it_has(kind, settings):
    """Each kind of run diverging at a huge step (gamma 1e6, LR 1e6): the error names what
    can be lowered there; meta-training has no learning rate setting."""
    from raymeta.config import MetaTrainConfig, MethodConfig
    from raymeta.schedules import MLRSNet, MLRSNetBundle
    from raymeta.spec import meta_train_run, method_run
    from raymeta.train.build import build_run

    task = TASK.model_copy(update={"momentum": 0.9, "meta_per_class": 20})
    bundle = MLRSNetBundle([MLRSNet().state_dict()], [1])
    spec = {
        "meta-training": lambda: meta_train_run(MetaTrainConfig(task=task), task, "m"),
        "frozen MLR-SNet": lambda: method_run(
            MethodConfig(schedule="mlrsnet", model_uri="models:/m@a", gamma=1e6), task
        ),
        "hand-designed": lambda: method_run(MethodConfig(schedule="fixed", lr=1e6), task),
    }[kind]()
    run = build_run(spec, meta_learner=bundle)
    if kind == "meta-training":
        run.schedule.gamma = 1e6  # kept: gamma is set from L0 only when unset
    with pytest.raises((DeadRunError, NonFiniteLossError)) as err:
        run.train()
    assert f"training diverged; lower {settings} (or raise guard.max_loss_ratio)" in str(err.value)
