"""Data-parallel equivalence and fault tolerance of real Ray Train runs (local Ray, gloo)."""

import pytest
import torch

from raymeta.config import OuterLoopConfig, TaskConfig
from raymeta.spec import meta_train_run
from raymeta.train.ray_train import fit

pytestmark = pytest.mark.ray

TASK = TaskConfig(
    dataset="digits",
    model="small_cnn",
    batch_size=64,
    epochs=2,
    val_size=200,
    meta_per_class=10,
    seed=5,
)
META = OuterLoopConfig(meta_every=2, meta_batch_size=40, meta_lr=1e-2, meta_weight_decay=1e-4)


def spec(label):
    return meta_train_run(META, TASK, label, saved_epochs=[1, 2])


@pytest.fixture(scope="module")
def one_worker(ray_local, tmp_path_factory):
    return fit(spec("w1"), num_workers=1, storage_path=tmp_path_factory.mktemp("w1"))


def test_two_workers_match_one_worker_with_double_batch(one_worker, tmp_path):
    two = fit(spec("w2"), num_workers=2, storage_path=tmp_path)
    assert len(two.lrs) == len(one_worker.lrs) == 2 * ((1437 - 200 - 100) // 64)
    torch.testing.assert_close(
        torch.tensor(two.lrs), torch.tensor(one_worker.lrs), rtol=1e-4, atol=1e-6
    )
    assert two.gamma == pytest.approx(one_worker.gamma, rel=1e-5)
    for key, value in one_worker.model_state.items():
        torch.testing.assert_close(two.model_state[key], value, rtol=1e-4, atol=1e-5)
    for epoch in (1, 2):
        for key, value in one_worker.saved_cells[epoch].items():
            torch.testing.assert_close(two.saved_cells[epoch][key], value, rtol=1e-4, atol=1e-5)
    assert two.history[-1]["test_acc"] == pytest.approx(
        one_worker.history[-1]["test_acc"], abs=0.01
    )
    # the meta-learner really moved: a frozen cell would make this test vacuous
    first, last = one_worker.saved_cells[1], one_worker.saved_cells[2]
    assert any(not torch.equal(first[k], last[k]) for k in first)


def test_worker_failure_resumes_from_checkpoint(one_worker, tmp_path):
    resumed = fit(
        spec("fail"),
        num_workers=1,
        storage_path=tmp_path,
        max_failures=1,
        fail_once_after_epoch=1,
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.lrs == one_worker.lrs  # the resumed run continues exactly where it stopped
    for key, value in one_worker.model_state.items():
        assert torch.equal(resumed.model_state[key], value), key


def test_dead_run_fails_once_with_one_line_and_no_retry(ray_local, tmp_path):
    """A run at chance on 2 workers stops after its first epoch with the guard's one-line
    error, named by the run; Ray Train does not restart the workers for it (the error is the
    run's result, not a worker crash: no TrainingFailedError behind it)."""
    from raymeta.errors import DeadRunError
    from raymeta.spec import HandRun, ScheduleSpec

    dead = HandRun(label="dead", task=TASK, schedule=ScheduleSpec(family="fixed", lr=1e-7))
    with pytest.raises(DeadRunError) as err:
        fit(dead, num_workers=2, storage_path=tmp_path, max_failures=1)
    msg = str(err.value)
    assert msg.startswith("run 'dead': no progress: training loss ") and "LR 1e-07" in msg
    assert "\n" not in msg
    assert err.value.__context__ is None  # raised from the run's result, not a retried crash


def test_a_dead_run_as_result_ends_alone_and_the_group_goes_on(ray_local, tmp_path):
    """With ``dead_run_is_result`` the run at chance ends on 2 workers with the guard's reason
    and the epoch it finished, and the next run of the same worker group trains to the end."""
    from raymeta.spec import HandRun, ScheduleSpec
    from raymeta.train.ray_train import RunRequest, fit_runs

    runs = [
        RunRequest(
            HandRun(label=label, task=TASK, schedule=ScheduleSpec(family="fixed", lr=lr)),
            dead_run_is_result=True,
        )
        for label, lr in (("dead", 1e-7), ("live", 0.5))
    ]
    dead, live = fit_runs(runs, name="dead-then-live", num_workers=2, storage_path=tmp_path)
    assert dead.dead_reason.startswith("no progress: training loss ")
    assert "after 20 steps" in dead.dead_reason and "LR 1e-07" in dead.dead_reason
    assert [h["epoch"] for h in dead.history] == [1] and dead.model_state == {}
    assert live.dead_reason is None and [h["epoch"] for h in live.history] == [1, 2]
    assert live.history[-1]["test_acc"] > 0.3  # 10 classes: chance is 0.1
