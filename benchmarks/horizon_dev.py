"""Development comparison of MLR-SNet's meta-objectives (short-horizon bias, docs/mlrsnet.md
section 4): the one-step look-ahead against the delayed objective at several horizons.

For each objective: meta-train on Fashion-MNIST (small CNN, momentum 0.9, a reduced training
split), keep the cell at the first, middle and last epoch, and apply that bundle frozen to an MLP
(another architecture and batch size, momentum 0.9). Reported per objective: the mean LR of every
meta-training epoch, the validation accuracy of the meta-training run and of the transfer run
(never the test split: this chooses a default), and the CPU time of each run (this process's,
so other jobs on a shared machine do not count). Runs on the plain loop
(:func:`raymeta.train.build.build_run`, one process), no Ray or MLflow.

Usage: .venv/bin/python benchmarks/horizon_dev.py [--epochs 5] [--seeds 0] [--meta-every 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from raymeta.config import OuterLoopConfig, TaskConfig
from raymeta.schedules import MLRSNetBundle
from raymeta.spec import LearnedRun, meta_train_run
from raymeta.train.build import build_run
from raymeta.train.loop import load_task_data

OBJECTIVES = {
    "lookahead": {"meta_objective": "lookahead"},
    "delayed k=5": {"meta_objective": "delayed", "horizon": 5},
    "delayed k=20": {"meta_objective": "delayed", "horizon": 20},
}


def meta_train(task: TaskConfig, outer: OuterLoopConfig, data) -> tuple[MLRSNetBundle, dict]:
    """Meta-train on ``task``; the bundle of the cell at the first, middle and last epoch and
    the run's per-epoch record."""
    epochs = sorted({1, (task.epochs + 1) // 2, task.epochs})
    run = build_run(meta_train_run(outer, task, "dev"), data=data)
    cells = {}

    def keep(metrics, state, optimizer):
        if metrics["epoch"] in epochs:
            cells[metrics["epoch"]] = {
                k: v.clone() for k, v in run.schedule.cell.state_dict().items()
            }

    t0 = time.process_time()
    state = run.train(on_epoch_end=keep)
    record = {
        "lr": [h["lr"] for h in state.history],
        "lr_tenth": state.lrs[len(state.lrs) // 10],  # the LR a tenth into the run
        "val_acc": [h["val_acc"] for h in state.history],
        "cpu_s": time.process_time() - t0,
    }
    bundle = MLRSNetBundle([cells[e] for e in epochs], epochs, outer.hidden_size, outer.mlp_hidden)
    return bundle, record


def transfer(task: TaskConfig, bundle: MLRSNetBundle, data) -> dict:
    """Train ``task`` with ``bundle`` frozen; its per-epoch validation accuracy and mean LR."""
    t0 = time.process_time()
    run = build_run(
        LearnedRun(label="dev", task=task, model_uri="dev"), meta_learner=bundle, data=data
    )
    state = run.train()
    return {
        "lr": [h["lr"] for h in state.history],
        "val_acc": [h["val_acc"] for h in state.history],
        "cpu_s": time.process_time() - t0,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="meta-training epochs")
    parser.add_argument("--transfer-epochs", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--meta-every", type=int, default=20, help="steps between meta steps")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = {"momentum": 0.9, "train_subset": args.train_subset, "val_size": 2000}
    results = {}
    for seed in args.seeds:
        meta_task = TaskConfig(
            dataset="fashion_mnist",
            model="small_cnn",
            batch_size=128,
            epochs=args.epochs,
            meta_per_class=50,
            seed=seed,
            **common,
        )
        target = TaskConfig(
            dataset="fashion_mnist",
            model="mlp",
            batch_size=64,
            epochs=args.transfer_epochs,
            meta_per_class=0,
            seed=seed + 100,
            **common,
        )
        meta_data, target_data = load_task_data(meta_task), load_task_data(target)
        for name in args.objectives:
            outer = OuterLoopConfig(
                meta_every=args.meta_every, meta_batch_size=100, **OBJECTIVES[name]
            )
            bundle, record = meta_train(meta_task, outer, meta_data)
            moved = transfer(target, bundle, target_data)
            results.setdefault(name, []).append((record, moved))
            print(
                f"[seed {seed}] {name}: meta-train val {record['val_acc'][-1]:.2%}, LR at a tenth "
                f"{record['lr_tenth']:.4f}, mean LR per "
                f"epoch {', '.join(f'{v:.4f}' for v in record['lr'])} ({record['cpu_s']:.0f} s); "
                f"transfer val {moved['val_acc'][-1]:.2%}, mean LR "
                f"{', '.join(f'{v:.4f}' for v in moved['lr'])} ({moved['cpu_s']:.0f} s)",
                flush=True,
            )
    print(
        "\n| objective | meta-train val acc. | mean LR per epoch | transfer (MLP) val acc. | CPU s |"
    )
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        meta_val = statistics.mean(r["val_acc"][-1] for r, _ in runs)
        lr = [statistics.mean(r["lr"][e] for r, _ in runs) for e in range(args.epochs)]
        moved_val = statistics.mean(m["val_acc"][-1] for _, m in runs)
        cpu = statistics.mean(r["cpu_s"] for r, _ in runs)
        print(
            f"| {name} | {meta_val:.2%} | {' / '.join(f'{v:.4f}' for v in lr)} | "
            f"{moved_val:.2%} | {cpu:.0f} |"
        )


if __name__ == "__main__":
    main()
