"""Online schedule learners as rows of a comparison: Ray Tune's population-based training (PBT,
Jaderberg et al., "Population Based Training of Neural Networks", arXiv 1711.09846) and PB2
(Parker-Holder et al., "Provably Efficient Online Hyperparameter Optimization with
Population-Based Bandits", NeurIPS 2020), configured by ``compare.search.online``.

A population of ``search.trials_per_family`` members trains the compared task (with its
validation split) epoch by epoch, each at a constant LR and SGD momentum from its Tune config.
Every ``search.perturbation_interval`` epochs the scheduler ranks the members by ``val_acc``:
a member in the bottom quantile loads the checkpoint of one in the top quantile (exploit) and
continues with a mutated copy of its LR and momentum (explore): PBT multiplies the LR by 0.8 or
1.2 (or resamples it log-uniformly, clipped to the range) and shifts the momentum along the
``search.momentum`` choices; PB2 picks both with a time-varying GP bandit inside
``[low, high]`` bounds (the LR as ``log10_lr``). Both run synchronously (``synch=True``): every
member waits for the others at each perturbation, so each member's lineage is trained exactly
the task's epochs.

**Budget rule** (docs/design.md section 6): the population has ``trials_per_family`` members,
each trained the task's epochs, so PBT and PB2 spend the same total training epochs as one
family's search, whose ASHA-stopped trials spend fewer. Their trials and search compute go in
the comparison's usual columns.

**Policy.** What PBT finds is not one configuration but a schedule of them: the per-epoch
``(lr, momentum)`` of the best member's lineage (Ray's "policy"). Every checkpoint carries the
policy of the epochs it contains, so the best member's last checkpoint holds its whole
lineage. The final rows replay it (:class:`PolicyReplay`) with each seed on train +
validation, tested on the test split, like every other row.

Every run is assembled by :func:`raymeta.train.build.build_run` from a
:class:`~raymeta.spec.HandRun` with the ``fixed`` family, one per stretch of epochs with the
same ``(lr, momentum)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from raymeta.config import PositiveFloat, Strict, TaskConfig

#: ``search.online`` name -> the row's label
ONLINE_LABELS = {"pbt": "PBT", "pb2": "PB2"}
CHECKPOINT = "member.pt"  # model, optimiser and run state of a member
POLICY = "policy.json"  # the checkpoint's policy: [[lr, momentum], ...] per epoch trained

Policy = list[tuple[float, float]]  # per epoch (0-based): (LR, SGD momentum)


class PolicyReplay(Strict):
    """A final run of an online row: ``task`` trained at ``policy[e]`` = ``(lr, momentum)``
    in epoch ``e`` (0-based; one entry per epoch of ``task``)."""

    kind: Literal["policy"] = "policy"
    label: str
    task: TaskConfig
    policy: list[tuple[PositiveFloat, float]]

    @model_validator(mode="after")
    def _one_entry_per_epoch(self):
        if len(self.policy) != self.task.epochs:
            raise ValueError(f"policy has {len(self.policy)} entries for {self.task.epochs} epochs")
        return self


def parse_final_run(data: dict[str, Any]):
    """A comparison's final run from its JSON form: a :class:`PolicyReplay` (``kind:
    policy``) or a run spec (:func:`raymeta.spec.parse_run`)."""
    from raymeta.spec import parse_run

    return PolicyReplay(**data) if data.get("kind") == "policy" else parse_run(data)


class _ClipLR:
    """PBT's ``custom_explore_fn``: keeps a perturbed LR (x0.8 or x1.2, repeatedly) inside
    ``[low, high]``. A class, not a closure, so that Tune can save the scheduler."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def __call__(self, config: dict) -> dict:
        config["lr"] = min(max(config["lr"], self.low), self.high)
        return config


def scheduler(
    method: str, ranges: dict[str, list[float]], momentum: list[float] | None, interval: int
):
    """The Tune scheduler of ``method`` (``pbt`` or ``pb2``) on ``val_acc``, perturbing every
    ``interval`` epochs (``training_iteration``), synchronously.

    Args:
        ranges: :func:`raymeta.tune.spaces.resolve_online_ranges`: ``lr`` (log scale) and, for
            PB2 with momentum searched, ``momentum``.
        momentum: the momentum choices PBT shifts along (``search.momentum``), or None (the
            task's momentum, not mutated).
    """
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2

    common = {
        "time_attr": "training_iteration",
        "metric": "val_acc",
        "mode": "max",
        "perturbation_interval": interval,
        "synch": True,
    }
    low, high = ranges["lr"]
    if method == "pbt":
        mutations: dict[str, Any] = {"lr": tune.loguniform(low, high)}
        if momentum is not None:
            mutations["momentum"] = list(momentum)
        return PopulationBasedTraining(
            hyperparam_mutations=mutations, custom_explore_fn=_ClipLR(low, high), **common
        )
    bounds = {"log10_lr": [math.log10(low), math.log10(high)]}
    if "momentum" in ranges:
        bounds["momentum"] = list(ranges["momentum"])
    return PB2(hyperparam_bounds=bounds, **common)


def initial_population(
    method: str, ranges: dict[str, list[float]], momentum: list[float] | None, task_momentum: float
) -> dict[str, Any]:
    """The Tune ``param_space`` the members' first configurations are drawn from: the LR
    log-uniform in ``ranges["lr"]`` and the momentum from the choices (PBT) or the interval
    (PB2), or the task's momentum when it is not searched."""
    from ray import tune

    low, high = ranges["lr"]
    if method == "pbt":
        return {
            "lr": tune.loguniform(low, high),
            "momentum": task_momentum if momentum is None else tune.choice(list(momentum)),
        }
    return {
        "log10_lr": tune.uniform(math.log10(low), math.log10(high)),
        "momentum": tune.uniform(*ranges["momentum"]) if "momentum" in ranges else task_momentum,
    }


def member_hyperparameters(config: dict[str, Any]) -> tuple[float, float]:
    """A member's ``(lr, momentum)`` from its Tune config (PB2 mutates ``log10_lr``)."""
    lr = config["lr"] if "lr" in config else 10.0 ** config["log10_lr"]
    return float(lr), float(config["momentum"])


def _fixed_run(label: str, task: TaskConfig, lr: float, momentum: float, epochs: int):
    """``task`` for ``epochs`` epochs at the constant LR ``lr`` and SGD momentum ``momentum``
    (a :class:`~raymeta.spec.HandRun` of the ``fixed`` family)."""
    from raymeta.spec import HandRun, ScheduleSpec

    return HandRun(
        label=label,
        task=task.model_copy(update={"momentum": momentum, "epochs": epochs}),
        schedule=ScheduleSpec(family="fixed", lr=lr),
    )


def member_run(task: TaskConfig, config: dict[str, Any], label: str):
    """The run a population member starts as: ``task`` at the ``(lr, momentum)`` of its first
    Tune ``config`` (:func:`member_hyperparameters`), as its MLflow run's params."""
    return _fixed_run(label, task, *member_hyperparameters(config), task.epochs)


@dataclasses.dataclass
class _Start:
    """A member's state loaded from a Tune checkpoint."""

    model: dict
    optimizer: dict
    run_state: Any  # raymeta.train.loop.RunState
    policy: Policy


def _load(checkpoint, device) -> _Start | None:
    """The state in a member's Tune ``checkpoint`` (None: start from scratch)."""
    if checkpoint is None:
        return None
    import torch

    from raymeta.train.loop import RunState

    with checkpoint.as_directory() as d:
        saved = torch.load(Path(d) / CHECKPOINT, map_location=device, weights_only=True)
        policy = [tuple(p) for p in json.loads((Path(d) / POLICY).read_text())]
    return _Start(saved["model"], saved["optimizer"], RunState(**saved["run_state"]), policy)


def _segments(policy: Policy, start: int) -> Iterator[tuple[int, tuple[float, float]]]:
    """``(end, (lr, momentum))`` of every stretch of equal entries of ``policy`` from epoch
    ``start`` (0-based; ``end`` exclusive)."""
    epoch = start
    while epoch < len(policy):
        end = epoch + 1
        while end < len(policy) and policy[end] == policy[epoch]:
            end += 1
        yield end, policy[epoch]
        epoch = end


def train_policy(
    task: TaskConfig,
    policy: Policy,
    *,
    label: str,
    device,
    start: _Start | None = None,
    checkpoint_epochs: frozenset[int] = frozenset(),
    report=None,
    dead_run_is_result: bool = False,
) -> None:
    """Train ``task`` under ``policy`` (one ``(lr, momentum)`` per epoch) from ``start`` (a
    member's checkpoint, :func:`train_member`), calling ``report(metrics, checkpoint=...)``
    (default ``tune.report``) every epoch: the loop's metrics (NaN ones left out; ``lr`` the
    epoch's mean applied LR) plus ``momentum``, read from the optimiser, and, under
    :data:`raymeta.tune.common.MLFLOW_METRICS`, the points the trial's MLflow run gets (as
    :func:`raymeta.tune.common.train_trial`'s: the epoch metrics, ``momentum`` at the epoch,
    and the per-step ``lr`` and ``train_loss`` at the global optimisation step, which goes on
    from ``start``'s); the last report also carries the LR curve
    (:func:`raymeta.tune.common.lr_curve`). A Tune checkpoint goes with the reports of the
    1-based epochs in ``checkpoint_epochs``.

    Args:
        dead_run_is_result: a population member: a run the dead-run guard stops reports
            ``val_acc`` 0 and ``dead_run`` 1 (with its curves up to the stop) and ends.
            Otherwise the one-line error propagates.

    Raises:
        DeadRunError, NonFiniteLossError: the dead-run guard stopped the run and
            ``dead_run_is_result`` is False.
    """
    import torch
    from ray import tune

    from raymeta.errors import DeadRunError, NonFiniteLossError
    from raymeta.tracking import StepCurves, epoch_points
    from raymeta.train.build import build_run
    from raymeta.train.loop import RunState, load_task_data
    from raymeta.tune.common import MLFLOW_METRICS, lr_curve

    report = report or tune.report
    data = load_task_data(task, device)
    state = start.run_state if start else RunState()
    model_state = start.model if start else None
    optimizer_state = start.optimizer if start else None
    last = {}  # the optimiser of the stretch just trained
    curves = None  # the per-step curves, once the steps per epoch are known
    try:
        for end, (lr, momentum) in _segments(policy, state.epoch):
            run = build_run(_fixed_run(label, task, lr, momentum, end), device, data=data)
            curves = curves or StepCurves(task.epochs * run.steps_per_epoch)
            if model_state is not None:
                run.model.load_state_dict(model_state)
            if optimizer_state is not None:
                # Optimizer.load_state_dict restores the saved momentum: this stretch's replaces it
                for group in optimizer_state["param_groups"]:
                    group["momentum"] = momentum

            def on_epoch_end(metrics, st, optimizer, run=run, curves=curves):
                last["optimizer"] = optimizer
                out = {k: v for k, v in metrics.items() if v == v}
                out["momentum"] = optimizer.param_groups[0]["momentum"]
                points = [*epoch_points(metrics), ("momentum", out["momentum"], st.epoch)]
                out[MLFLOW_METRICS] = json.dumps(points + curves.drain())
                if st.epoch == task.epochs:
                    out |= lr_curve(st.lrs, run.steps_per_epoch)
                if st.epoch not in checkpoint_epochs:
                    report(out)
                    return
                with tempfile.TemporaryDirectory() as d:
                    saved = {
                        "model": run.model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "run_state": dataclasses.asdict(st),
                    }
                    torch.save(saved, Path(d) / CHECKPOINT)
                    (Path(d) / POLICY).write_text(json.dumps(policy[: st.epoch]))
                    report(out, checkpoint=tune.Checkpoint.from_directory(d))

            state = run.train(
                state=state,
                optimizer_state=optimizer_state,
                on_epoch_end=on_epoch_end,
                on_step=curves,
            )
            model_state, optimizer_state = run.model.state_dict(), last["optimizer"].state_dict()
    except (DeadRunError, NonFiniteLossError) as exc:
        if not dead_run_is_result:
            raise
        print(f"[{label}] member stopped: {exc}", flush=True)
        points = [("dead_run", 1.0, 0), *(curves.drain() if curves else [])]
        report({"val_acc": 0.0, "dead_run": 1.0, MLFLOW_METRICS: json.dumps(points)})


def train_member(
    task: TaskConfig, config: dict[str, Any], *, label: str, use_gpu: bool, interval: int
) -> None:
    """The Tune trial of one population member: ``task`` (with its validation split) from the
    trial's checkpoint, if any (its own, or the one PBT/PB2 cloned into it), at the
    ``(lr, momentum)`` of ``config`` until the scheduler pauses it or the task's epochs are
    done; a checkpoint every ``interval`` epochs and after the last. A member the dead-run
    guard stops reports ``val_acc`` 0 and ``dead_run`` 1 and ends: a poor member, not a
    failed search. Its MLflow run gets the points of :func:`train_policy`.
    """
    from ray import tune

    from raymeta.train.device import resolve_device

    device = resolve_device(use_gpu)
    start = _load(tune.get_checkpoint(), device)
    done = start.policy if start else []
    policy = done + [member_hyperparameters(config)] * (task.epochs - len(done))
    checkpoints = frozenset(range(interval, task.epochs, interval)) | {task.epochs}
    train_policy(
        task,
        policy,
        label=label,
        device=device,
        start=start,
        checkpoint_epochs=checkpoints,
        dead_run_is_result=True,
    )


def replay_policy(replay: PolicyReplay, *, use_gpu: bool) -> None:
    """The Tune trial of a final run of an online row: :class:`PolicyReplay` from scratch,
    reporting every epoch (the dead-run guard's error propagates, as for every final run)."""
    from raymeta.train.device import resolve_device

    train_policy(replay.task, replay.policy, label=replay.label, device=resolve_device(use_gpu))


def best_policy(result, epochs: int) -> Policy:
    """The policy of the member whose Tune ``result`` is given, over ``epochs`` epochs: the
    lineage in its last checkpoint, continued at its current ``(lr, momentum)`` (a member the
    guard stopped has a shorter lineage, or none)."""
    done: Policy = []
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            done = [tuple(p) for p in json.loads((Path(d) / POLICY).read_text())]
    return done + [member_hyperparameters(result.config)] * (epochs - len(done))


def population_compute_s(grid) -> float:
    """Seconds the members trained, summed over the population (every result's
    ``time_this_iter_s``: a member paused and restarted at each perturbation has several
    ``time_total_s`` runs)."""
    return float(sum(r.metrics_dataframe["time_this_iter_s"].sum() for r in grid))


def perturbations(experiment: Path) -> list[list]:
    """The exploit/explore steps a PBT or PB2 experiment logged (``pbt_global.txt``): one
    ``[target tag, clone tag, target iteration, clone iteration, clone config, new config]``
    each."""
    log = experiment / "pbt_global.txt"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def policy_json(policy: Policy) -> str:
    """A policy as JSON, one entry per stretch of equal epochs, 4 significant digits:
    ``[{"epochs": "1-2", "lr": 0.1, "momentum": 0.9}, ...]`` (1-based, inclusive)."""
    out, first = [], 0
    for end, (lr, momentum) in _segments(policy, 0):
        epochs = f"{first + 1}-{end}" if end > first + 1 else str(end)
        out.append(
            {"epochs": epochs, "lr": float(f"{lr:.4g}"), "momentum": float(f"{momentum:.4g}")}
        )
        first = end
    return json.dumps(out)
