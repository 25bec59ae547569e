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


# Two tasks of different lengths: task 0 (digits, small CNN, batch 32, plain SGD) finishes its
# 35 steps first and restarts with a new seed; task 1 (digits, MLP, batch 64, momentum 0.9)
# sets meta-training's length: 3 epochs of 17 steps.
TWO_TASKS = [
    TaskConfig(
        dataset="digits", model="small_cnn", batch_size=32, epochs=1, val_size=200,
        meta_per_class=10, seed=3,
    ),
    TaskConfig(
        dataset="digits", model="mlp", batch_size=64, epochs=3, momentum=0.9, val_size=200,
        meta_per_class=10, seed=4,
    ),
]  # fmt: skip
TWO_OUTER = OuterLoopConfig(meta_every=5, meta_batch_size=40, meta_lr=1e-2)


def two_task_spec(label, tasks=TWO_TASKS):
    from raymeta.spec import multitask_meta_train_run

    return multitask_meta_train_run(TWO_OUTER, tasks, label, [35, 17], [1, 3])


def averaged_in_one_process():
    """The reference: both tasks in lockstep in this process, written from the definition:
    each task trains with its own model, optimiser, gamma and LSTM state; at every meta step
    the two tasks' look-ahead meta-gradients are averaged and one Adam step updates the one
    cell; a finished task restarts with seed + 1000 (new model, optimiser, state, gamma) and
    the same data. Returns the final cell and each task's LRs."""
    import torch.nn.functional as F

    from raymeta.data.batches import endless_batches, epoch_batches
    from raymeta.meta.lookahead import set_lr, sgd_direction
    from raymeta.meta.mlrsnet import MLRSNetMetaTrainer
    from raymeta.schedules import MLRSNet
    from raymeta.train.loop import (
        Workers,
        build_task_model,
        load_task_data,
        mean_train_loss,
    )

    torch.manual_seed(TWO_TASKS[0].seed + 1)
    cell = MLRSNet()
    adam = torch.optim.Adam(cell.parameters(), lr=TWO_OUTER.meta_lr, weight_decay=1e-4)
    runs = []
    for task in TWO_TASKS:
        data = load_task_data(task)
        trainer = MLRSNetMetaTrainer(cell, 10, momentum=task.momentum)
        runs.append({"task": task, "data": data, "trainer": trainer, "lrs": [], "runs": -1})

    def start(run, step):  # a new run of the task, at global step ``step``
        run["runs"] += 1
        task = run["task"].model_copy(update={"seed": run["task"].seed + 1000 * run["runs"]})
        run["model"] = build_task_model(task, run["data"], "cpu")
        run["opt"] = torch.optim.SGD(
            run["model"].parameters(), lr=0.0, momentum=task.momentum, weight_decay=5e-4
        )
        run["trainer"].state, run["trainer"].gamma = cell.initial_state(), None
        run["seed"], run["start"] = task.seed, step
        meta = endless_batches(len(run["data"].meta_y), 40, seed=task.seed)
        for _ in range(step // 5):  # the meta batches are indexed by the global meta step
            next(meta)
        run["meta"] = meta

    for step in range(51):
        losses = []
        for run in runs:
            task, data = run["task"], run["data"]
            spe = len(data.train_y) // task.batch_size
            if run["runs"] < 0 or step - run["start"] == task.epochs * spe:
                start(run, step)
            local = step - run["start"]
            epoch, k = divmod(local, spe)
            if k == 0:
                run["batches"] = epoch_batches(
                    len(data.train_y), task.batch_size, seed=run["seed"], epoch=epoch
                )
                if run["trainer"].gamma is None:
                    run["trainer"].start_epoch(
                        epoch, lambda r=run: mean_train_loss(r["model"], r["data"], Workers())
                    )
            idx = next(run["batches"])
            run["opt"].zero_grad()
            loss = F.cross_entropy(run["model"](data.train_x[idx]), data.train_y[idx])
            loss.backward()
            losses.append(loss.item())
        if (step + 1) % 5 == 0:
            grads = []
            for run, loss in zip(runs, losses, strict=True):
                midx = next(run["meta"])
                meta_x, meta_y = run["data"].meta_x[midx], run["data"].meta_y[midx]
                params = dict(run["model"].named_parameters())
                d = sgd_direction(run["model"], run["opt"])
                lr = run["trainer"].virtual_lr(loss)
                grads.append(
                    run["trainer"].lookahead_meta_grads(
                        run["model"], params, d, lr, meta_x, meta_y
                    )[1]
                )
            adam.zero_grad()
            for p, g0, g1 in zip(cell.parameters(), *grads, strict=True):
                p.grad = (g0 + g1) / 2
            adam.step()
        for run, loss in zip(runs, losses, strict=True):
            lr = run["trainer"].lr(step, 0, loss)
            set_lr(run["opt"], lr)
            run["opt"].step()
            run["lrs"].append(lr)
    return cell, [run["lrs"] for run in runs]


@pytest.fixture(scope="module")
def unbroken(ray_local, tmp_path_factory):
    """:data:`TWO_TASKS` meta-trained on two workers (one per task) by Ray Train without a
    failure: the :class:`~raymeta.train.ray_train.FitResult` that the one-process reference and
    the run resumed after a worker failure are both compared with (one fit for both tests)."""
    from raymeta.train.ray_train import fit

    return fit(two_task_spec("mt"), num_workers=2, storage_path=tmp_path_factory.mktemp("mt"))


@pytest.mark.ray
def test_two_tasks_on_two_workers_match_one_process_averaging_their_meta_gradients(unbroken):
    result = unbroken
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: the same reduction order in the matmuls
    try:
        cell, lrs = averaged_in_one_process()
    finally:
        torch.set_num_threads(threads)
    assert [len(t["lrs"]) for t in result.tasks] == [51, 51]
    assert [t["restarts"] for t in result.tasks] == [1, 0]
    for ray_lrs, ref in zip((t["lrs"] for t in result.tasks), lrs, strict=True):
        torch.testing.assert_close(torch.tensor(ray_lrs), torch.tensor(ref), rtol=1e-5, atol=1e-7)
    for key, value in cell.state_dict().items():
        # Adam divides by sqrt(v): a float-rounding difference in a near-zero gradient moves
        # a parameter by up to ~1e-5 after 10 meta steps at meta_lr 1e-2
        torch.testing.assert_close(result.saved_cells[3][key], value, rtol=1e-4, atol=1e-5)
    first = result.saved_cells[1]
    assert any(not torch.equal(first[k], v) for k, v in cell.state_dict().items())  # it moved
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["task0_restarts"] == 1.0
    assert result.history[-1]["task1_val_acc"] > 0.5


@pytest.mark.ray
def test_multitask_worker_failure_resumes_exactly_from_the_checkpoint(unbroken, tmp_path):
    """A failure after meta-training epoch 2 (task 0 restarted, both tasks inside an epoch of
    their own): the restarted group resumes from every task's checkpointed state and ends as
    the unbroken run."""
    from raymeta.train.ray_train import fit

    whole = unbroken
    resumed = fit(
        two_task_spec("mt-fail"), num_workers=2, storage_path=tmp_path, fail_once_after_epoch=2
    )
    assert [t["lrs"] for t in resumed.tasks] == [t["lrs"] for t in whole.tasks]
    for key, value in whole.saved_cells[3].items():
        assert torch.equal(resumed.saved_cells[3][key], value), key
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


@pytest.mark.ray
def test_a_dead_task_ends_every_worker_with_one_line(ray_local, tmp_path):
    """Task 1 cannot meet its guard (99 % progress in 5 steps): its workers keep taking part
    in the meta steps until the end of the meta-training epoch, where every worker ends with
    its error: no hang, no retry, one line naming the task."""
    from raymeta.errors import DeadRunError
    from raymeta.train.ray_train import fit

    strict = TWO_TASKS[1].guard.model_copy(update={"patience_steps": 5, "min_progress": 0.99})
    tasks = [TWO_TASKS[0], TWO_TASKS[1].model_copy(update={"guard": strict})]
    with pytest.raises(DeadRunError) as err:
        fit(two_task_spec("mt-dead", tasks), num_workers=2, storage_path=tmp_path, max_failures=1)
    msg = str(err.value)
    assert msg.startswith("run 'mt-dead': task digits/mlp: no progress: training loss ")
    assert "after 5 steps" in msg and "\n" not in msg
    assert err.value.__context__ is None  # the run's result, not a retried worker crash


def _group_worker(rank: int, world: int, port: int, spec_json: dict, out: str) -> None:
    """One process of :func:`test_groups_of_two_workers_match_groups_of_one` (plain
    torch.distributed, gloo): this worker's task trained to the end of meta-training."""
    import torch.distributed as dist

    from raymeta.spec import parse_run
    from raymeta.train.loop import Workers
    from raymeta.train.multitask import RestartingTask, group_data_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    spec = parse_run(spec_json)
    workers = Workers.for_tasks(len(spec.tasks))
    task = RestartingTask(
        build_run(spec, "cpu", workers), group_data_parallel(workers, torch.device("cpu"))
    )
    task.train_until(spec.total_steps)
    if workers.rank == 0:
        cell = {k: v.clone() for k, v in task.run.schedule.cell.state_dict().items()}
        torch.save({"lrs": task.lrs, "cell": cell}, f"{out}/world{world}_task{workers.task}.pt")
    dist.destroy_process_group()


def test_groups_of_two_workers_match_groups_of_one(tmp_path):
    """2 tasks on 4 workers (DDP within each group of 2, over its own process group) meta-train
    as 2 tasks on 2 workers: each group splits its task's batch, the meta-gradient is averaged
    over all 4 workers. Models without BatchNorm, so the match is exact to rounding."""
    import socket

    import torch.multiprocessing as mp

    tasks = [TWO_TASKS[0], TWO_TASKS[1].model_copy(update={"model": "small_cnn"})]
    spec = two_task_spec("groups", tasks).model_dump(mode="json")
    for world in (2, 4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # forked, not spawned: the workers start with torch and raymeta already imported
        mp.start_processes(
            _group_worker,
            args=(world, port, spec, str(tmp_path)),
            nprocs=world,
            start_method="fork",
        )
    for i in range(2):
        one = torch.load(tmp_path / f"world2_task{i}.pt", weights_only=True)
        two = torch.load(tmp_path / f"world4_task{i}.pt", weights_only=True)
        assert len(one["lrs"]) == 51
        torch.testing.assert_close(
            torch.tensor(two["lrs"]), torch.tensor(one["lrs"]), rtol=1e-5, atol=1e-7
        )
        for key, value in one["cell"].items():
            torch.testing.assert_close(two["cell"][key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.ray
def test_multitask_pipeline_registers_one_meta_learner(ray_local, tmp_path, monkeypatch, new_store):
    """The shipped multitask_meta_train.yaml, reduced: one row per task in the results table,
    one registered meta-learner with its first, middle and last checkpoints, the tasks'
    metrics in the meta-training run."""
    import mlflow
    import pandas as pd
    import yaml

    from raymeta.pipeline import run_pipeline
    from raymeta.pipelines import find_pipeline

    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(find_pipeline("multitask_meta_train.yaml").read_text())
    fashion, digits = data["meta_train"]["tasks"]
    fashion.update(train_subset=1536, val_size=500, epochs=3)  # 3 x 12 steps
    digits.update(batch_size=64, epochs=1)  # 17 steps: restarts after steps 17 and 34
    data["output_dir"] = str(tmp_path / "out")
    data["mlflow"]["tracking_uri"] = new_store(tmp_path / "mlflow.db")
    run_pipeline(parse(PipelineConfig, data, "reduced multitask"))
    rows = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(rows["method"]) == [
        "MLR-SNet (meta-training) task 0",
        "MLR-SNet (meta-training) task 1",
    ]
    assert list(rows["model"]) == ["small_cnn", "mlp"] and (rows["test_acc"] > 0.5).all()
    assert set(rows["meta_learner_version"]) == {"1"}
    mlflow.set_tracking_uri(data["mlflow"]["tracking_uri"])
    from raymeta.tracking import load_meta_learner

    bundle, _ = load_meta_learner("models:/mlrsnet-multitask@champion")
    assert bundle.checkpoint_epochs == [1, 2, 3]
    assert "fashion_mnist/small_cnn + digits/mlp" in bundle.source
    client = mlflow.MlflowClient()
    (run,) = client.search_runs(
        [client.get_experiment_by_name(data["mlflow"]["experiment"]).experiment_id],
        "attributes.run_name LIKE 'meta-train/%'",  # the run under the stage's run
    )
    history = client.get_metric_history(run.info.run_id, "task1_restarts")
    assert [(m.step, m.value) for m in history] == [(1, 0.0), (2, 1.0), (3, 2.0)]
    assert run.data.params["kind"] == "multitask_meta_train"
    assert run.data.tags["task"] == "fashion_mnist/small_cnn + digits/mlp"
