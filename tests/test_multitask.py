"""Multi-task meta-training (raymeta.train.multitask): a run stopped inside an epoch continues
exactly, restarts re-seed a finished task, the config refuses bad combinations on one line, and
real Ray Train runs (local Ray, gloo) give the meta-learner update of one process that averages
the tasks' meta-gradients."""

import pytest
import torch

from raymeta.config import OuterLoopConfig, PipelineConfig, TaskConfig, parse
from raymeta.errors import ConfigError
from raymeta.spec import meta_train_run
from raymeta.train.build import build_run
from raymeta.train.loop import RunState, build_optimizer

DIGITS_MLP = TaskConfig(
    dataset="digits", model="mlp", batch_size=64, epochs=2, val_size=200, meta_per_class=10
)


@pytest.mark.parametrize("objective", [{}, {"meta_objective": "delayed", "horizon": 6}])
def test_run_stopped_inside_epochs_continues_exactly(objective):
    """train(stop_step=...) twice inside epochs, then to the end, with the same optimiser:
    the same LRs, metrics, model and meta-learner as the unbroken run."""
    outer = OuterLoopConfig(meta_every=4, meta_batch_size=20, **objective)
    spec = meta_train_run(outer, DIGITS_MLP, "chunks")
    whole = build_run(spec)
    end = whole.train()
    run = build_run(spec)
    optimizer = build_optimizer(DIGITS_MLP, run.model)
    state = RunState()
    spe = run.steps_per_epoch
    for stop in (7, spe + 3, None):
        state = run.train(state=state, optimizer=optimizer, stop_step=stop)
        if stop is not None:
            assert state.step == stop and state.epoch_step == stop % spe
    assert state.lrs == end.lrs and len(state.lrs) == 2 * spe
    strip = lambda h: {k: v for k, v in h.items() if not k.endswith("_time_s")}  # noqa: E731
    assert [strip(h) for h in state.history] == [strip(h) for h in end.history]
    for p, q in zip(run.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(run.schedule.cell.parameters(), whole.schedule.cell.parameters(), strict=True):
        assert torch.equal(p, q)


FASHION = {"dataset": "fashion_mnist", "model": "small_cnn", "batch_size": 128, "epochs": 2}
DIGITS = {"dataset": "digits", "model": "mlp", "batch_size": 64, "epochs": 3, "val_size": 200}


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        (
            {"ray": {"num_workers": 1}, "meta_train": {"tasks": [FASHION, DIGITS]}},
            "p.yaml: <root>: meta_train.tasks has 2 tasks but meta-training has 1 Ray Train "
            "worker(s) (meta_train_workers, else ray.num_workers); accepted: a multiple of 2",
        ),
        (
            {"meta_train_workers": 4, "meta_train": {"tasks": [FASHION, DIGITS, DIGITS]}},
            "p.yaml: <root>: meta_train.tasks has 3 tasks but meta-training has 4 Ray Train",
        ),
        (
            {"meta_train_workers": 2, "meta_train": {"task": FASHION, "tasks": [FASHION, DIGITS]}},
            "p.yaml: meta_train: task and tasks are exclusive",
        ),
        (
            {"meta_train": {"tasks": [FASHION]}},
            "p.yaml: meta_train.tasks: List should have at least 2 items",
        ),
        (
            {
                "meta_train_workers": 2,
                "meta_train": {"tasks": [FASHION, DIGITS | {"meta_per_class": 0}]},
            },
            "p.yaml: meta_train: tasks.1.meta_per_class must be > 0 for meta-training",
        ),
    ],
)
def test_config_refuses_bad_multitask_combinations_on_one_line(pipeline, message):
    with pytest.raises(ConfigError) as err:
        parse(PipelineConfig, {"name": "m", **pipeline}, "p.yaml")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_shipped_multitask_pipeline_is_valid_and_its_plan_is_counted_from_the_data():
    """multitask_meta_train.yaml: two tasks on two workers, one per task; the driver counts
    each task's epoch in steps and meta-training follows the longest task."""
    from raymeta.config import load_pipeline
    from raymeta.pipeline import meta_train_spec
    from raymeta.pipelines import find_pipeline

    cfg = load_pipeline(find_pipeline("multitask_meta_train.yaml"))
    spec = meta_train_spec(cfg.meta_train, 2)
    tasks = cfg.meta_train.tasks
    assert [(t.dataset, t.model) for t in tasks] == [
        ("fashion_mnist", "small_cnn"),
        ("digits", "mlp"),
    ]
    assert [t.momentum for t in tasks] == [0.9, 0.0] and tasks[0].batch_size != tasks[1].batch_size
    n_fashion = tasks[0].train_subset  # digits: 1437 training images less validation and meta set
    n_digits = 1437 - tasks[1].val_size - 10 * tasks[1].meta_per_class
    assert spec.epoch_steps == [n_fashion // tasks[0].batch_size, n_digits // tasks[1].batch_size]
    assert spec.clock == 0 and spec.total_steps == tasks[0].epochs * spec.epoch_steps[0]
    assert spec.saved_epochs == [1, (tasks[0].epochs + 1) // 2, tasks[0].epochs]


def test_multitask_data_checks_name_the_task_before_ray_starts():
    from raymeta.pipeline import check_pipeline

    odd = {"meta_train_workers": 4, "meta_train": {"tasks": [FASHION, DIGITS | {"batch_size": 63}]}}
    cfg = parse(PipelineConfig, {"name": "m", **odd}, "p.yaml")
    with pytest.raises(ConfigError, match=r"^meta_train.tasks.1: batch_size=63 is not divisible"):
        check_pipeline(cfg, ["meta_train"])
    late = {"meta_train_workers": 2, "meta_train": {"tasks": [DIGITS, DIGITS | {"epochs": 1}]}}
    late["meta_train"]["checkpoint_epochs"] = [3]
    cfg = parse(PipelineConfig, {"name": "m", **late}, "p.yaml")
    check_pipeline(cfg, ["meta_train"])  # the longest task has 3 epochs
    late["meta_train"]["tasks"][1] = DIGITS | {"epochs": 2, "batch_size": 16}  # longer: clock
    cfg = parse(PipelineConfig, {"name": "m", **late}, "p.yaml")
    with pytest.raises(
        ConfigError, match="checkpoint_epochs .3. exceed the 2 epochs of meta-training"
    ):
        check_pipeline(cfg, ["meta_train"])
