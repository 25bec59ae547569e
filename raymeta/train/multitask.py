"""Multi-task meta-training: one MLR-SNet meta-trained on several tasks at once
(:class:`~raymeta.spec.MultiTaskMetaTrainRun`, docs/mlrsnet.md section 3).

The workers are cut into one group per task (:meth:`raymeta.train.loop.Workers.for_tasks`).
Each group trains its own task: its model (data-parallel within the group), SGD optimiser,
gamma and LSTM state. The meta-learner and its optimiser are the same on every worker, and at
every meta step its gradient is averaged over all workers
(:meth:`~raymeta.train.loop.Workers.meta_mean`), so all tasks meta-train one schedule; with
equal groups that is the mean of the tasks' meta-gradients.

The collectives stay matched because every worker takes one optimisation step per global step,
and meta steps fall on the same global steps (every ``meta_every``) everywhere:

- meta-training lasts the longest task's optimisation steps; its epochs (the *clock*) are that
  task's, and all workers stop together at their ends to report and checkpoint
  (:meth:`RestartingTask.train_until`);
- a task that stops with a user error (a dead run) keeps taking part in the meta steps'
  all-reduces with a zero gradient until the epoch's end, where every worker learns of the
  error and ends with it (:func:`owe_meta_steps`);
- a task that finishes earlier restarts from a fresh initialisation with a new seed
  (:func:`restart_seed`), as learned-optimiser meta-training re-samples its inner problems:
  a new model, optimiser (momentum buffers), LSTM state and gamma (from the new model's L0);
  its data splits stay the same. The last restart is cut where meta-training ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from raymeta.config import OuterLoopConfig, TaskConfig
from raymeta.schedules.mlrsnet import MLRSNet
from raymeta.train.build import Run
from raymeta.train.loop import RunState, Workers, build_optimizer, build_task_model, train

RESTART_SEED_STRIDE = 1000


def restart_seed(seed: int, restarts: int) -> int:
    """The seed of a task's run after ``restarts`` restarts (0: its own seed): model
    initialisation, batch order and meta-batch order change with it, the data splits do not."""
    return seed + RESTART_SEED_STRIDE * restarts


def group_data_parallel(workers: Workers, device: torch.device) -> Callable[[nn.Module], nn.Module]:
    """The wrapper of a task model for its group: ``DistributedDataParallel`` over the group's
    process group (``workers.group``), or the identity for a group of one worker."""
    if workers.world_size == 1:
        return lambda model: model

    def wrap(model: nn.Module) -> nn.Module:
        ids = [device] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=ids, process_group=workers.group
        )

    return wrap


class RestartingTask:
    """This worker's task in multi-task meta-training, restarted whenever it finishes.

    Args:
        run: the task's run from :func:`raymeta.train.build.build_run` (its model is the first
            run's; its schedule is the :class:`~raymeta.meta.mlrsnet.MLRSNetMetaTrainer`, kept
            across restarts).
        wrap: wraps a task model for data parallelism within the group
            (:func:`group_data_parallel`).

    Attributes:
        restarts: how many times the task has restarted.
        state: the current run's :class:`~raymeta.train.loop.RunState` (``step`` is global).
        history: the metrics of every finished task epoch, of all runs, with ``restarts``,
            ``step`` (global, at the epoch's end) and ``gamma``.
        lrs: the LR of every step so far, all runs.
    """

    def __init__(self, run: Run, wrap: Callable[[nn.Module], nn.Module] = lambda m: m):
        self.run, self.wrap = run, wrap
        self.restarts, self.state = 0, RunState()
        self.history: list[dict] = []
        self._done_lrs: list[float] = []  # LRs of the finished runs
        self._use_model(run.model)

    @property
    def task(self) -> TaskConfig:
        """The current run's task (:func:`restart_seed`)."""
        base = self.run.task
        return base.model_copy(update={"seed": restart_seed(base.seed, self.restarts)})

    @property
    def lrs(self) -> list[float]:
        return self._done_lrs + self.state.lrs

    def _use_model(self, model: nn.Module) -> None:
        self.model, self.wrapped = model, self.wrap(model)
        self.optimizer = build_optimizer(self.task, model)

    def train_until(self, stop_step: int) -> None:
        """Train until global step ``stop_step``, restarting the task each time it finishes."""
        while self.state.step < stop_step:
            if self.state.epoch == self.task.epochs:
                self._restart()
            self.state = train(
                self.task,
                self.run.data,
                self.wrapped,
                self.run.schedule,
                rule=self.run.rule,
                workers=self.run.workers,
                state=self.state,
                optimizer=self.optimizer,
                stop_step=stop_step,
                on_epoch_end=self._record,
            )

    def _restart(self) -> None:
        self._done_lrs += self.state.lrs
        self.restarts += 1
        step = self.state.step
        self.state = RunState(step=step, start_step=step)
        self._use_model(build_task_model(self.task, self.run.data, self.run.data.train_x.device))
        self.run.schedule.new_task()

    def _record(self, metrics: dict, state: RunState, optimizer) -> None:
        gamma = self.run.schedule.gamma
        self.history.append(
            {**metrics, "restarts": self.restarts, "step": state.step, "gamma": gamma}
        )

    def state_dict(self) -> dict:
        """Everything a resumed worker of this task needs (the meta-learner's state included)."""
        return {
            "restarts": self.restarts,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.run.schedule.state_dict(),
            "run": asdict(self.state),
            "history": self.history,
            "done_lrs": self._done_lrs,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` (the model keeps its architecture across restarts)."""
        self.restarts = sd["restarts"]
        self.model.load_state_dict(sd["model"])
        self.optimizer = build_optimizer(self.task, self.model)
        self.optimizer.load_state_dict(sd["optimizer"])
        self.run.schedule.load_state_dict(sd["schedule"])
        self.state = RunState(**sd["run"])
        self.history, self._done_lrs = list(sd["history"]), list(sd["done_lrs"])


def task_summary(task_state: dict, steps: int) -> dict[str, float]:
    """One task's numbers for a meta-training epoch of ``steps`` steps, from its
    :meth:`RestartingTask.state_dict`: ``lr_epoch_mean``, the mean LR of those steps;
    ``restarts`` so far; and of its last finished epoch ``train_loss_epoch_mean``,
    ``meta_loss_epoch_mean``, ``val_acc``, ``test_acc`` and ``chance_acc`` (none before its
    first)."""
    lrs = (task_state["done_lrs"] + task_state["run"]["lrs"])[-steps:]
    out = {"lr_epoch_mean": sum(lrs) / len(lrs), "restarts": float(task_state["restarts"])}
    last = task_state["history"][-1] if task_state["history"] else {}
    names = {"train_loss": "train_loss_epoch_mean", "meta_loss": "meta_loss_epoch_mean"}
    keys = ("train_loss", "meta_loss", "val_acc", "test_acc", "chance_acc")
    return out | {names.get(k, k): last[k] for k in keys if k in last}


def owe_meta_steps(
    workers: Workers, meta: OuterLoopConfig, done: int, stop_step: int, device: torch.device
) -> None:
    """Take part, with a zero gradient, in the meta steps' all-reduces up to global step
    ``stop_step``, after this worker's task stopped with an error (``done``: meta steps it
    took): the other tasks' workers wait in them. The error is shared at the end of the
    meta-training epoch, where every worker ends with it (no hang, no retry)."""
    numel = sum(p.numel() for p in MLRSNet(meta.hidden_size, meta.mlp_hidden).parameters())
    for _ in range(done, stop_step // meta.meta_every):
        workers.meta_mean(torch.zeros(numel, device=device))
