"""Cost of MLR-SNet meta-training relative to plain SGD, measured in one run on the same data
and model (Fashion-MNIST, small CNN, batch 128, 1 thread). Times are this process's CPU time
(``time.process_time``), so other jobs on a shared machine do not distort the ratios. Prints:

(a) one meta step (look-ahead + meta-learner update) in units of a plain SGD step, for
    raymeta's first-order-exact look-ahead and for the reference's create_graph look-ahead;
(c) the delayed meta-objective (``meta_objective: delayed``, horizon k): its meta step and the
    cost of keeping one step's direction, in plain steps, and their sum per meta step;
(b) a meta-training epoch with a meta step every 300 steps (``meta_every``) divided by a plain
    SGD epoch (steady state: the second epoch's steps, without its evaluation; the one-time L0
    pass for gamma is printed separately).

Every run is assembled by :func:`raymeta.train.build.build_run` from a run spec, as in a real
run.

Usage: .venv/bin/python benchmarks/meta_overhead.py [--steps 60] [--epochs-repeat 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from raymeta.config import OuterLoopConfig, TaskConfig
from raymeta.spec import HandRun, ScheduleSpec, meta_train_run
from raymeta.train.build import build_run
from raymeta.train.loop import Workers, build_optimizer, load_task_data, mean_train_loss

HORIZONS = (5, 20)  # horizons of the delayed objective timed in (c)


def plain_step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def reference_meta_step(model, meta, x, y, mx, my):
    """The reference implementation's look-ahead: a second-order graph through the gradient."""
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    loss = F.cross_entropy(functional_call(model, {**buffers, **params}, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    unit, _ = meta.cell(loss.detach().reshape(()), meta.state)
    new = {n: p - meta.gamma * unit * g for (n, p), g in zip(params.items(), grads, strict=True)}
    meta_loss = F.cross_entropy(functional_call(model, {**buffers, **new}, (mx,)), my)
    meta.optimizer.zero_grad()
    meta_loss.backward()
    meta.optimizer.step()


def time_steps(fn, n):
    """Mean CPU seconds of ``fn()`` over ``n`` calls."""
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per timing block")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--epochs-repeat", type=int, default=2, help="epochs of each kind in (b)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = TaskConfig(epochs=1, momentum=0.0)
    data = load_task_data(task)
    run = build_run(meta_train_run(OuterLoopConfig(meta_every=1), task, "meta step"), data=data)
    model, meta = run.model, run.schedule
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=5e-4)
    meta.gamma = 0.67
    x, y = data.train_x[:128], data.train_y[:128]
    mx, my = data.meta_x[: meta.meta_batch_size], data.meta_y[: meta.meta_batch_size]

    def forward_backward():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        return loss

    def ours():
        meta.meta_step(model, opt, forward_backward().item(), mx, my)

    def reference():
        reference_meta_step(model, meta, x, y, mx, my)

    delayed = {}
    for k in HORIZONS:  # a delayed-objective trainer with a full window of k directions
        outer = OuterLoopConfig(meta_every=k, meta_objective="delayed", horizon=k)
        trainer = build_run(meta_train_run(outer, task, "delayed"), data=data).schedule
        trainer.cell.load_state_dict(meta.cell.state_dict())
        trainer.gamma = meta.gamma
        for step in range(k):
            trainer.lr(step, 0, forward_backward().item())
            trainer.observe_step(model, opt, step)
        delayed[k] = trainer

    def delayed_step(k):
        return lambda: delayed[k].meta_step(model, opt, forward_backward().item(), mx, my)

    def keep_direction():
        forward_backward()
        delayed[HORIZONS[0]].observe_step(model, opt, 0)

    plain, fb, with_meta, ref, keep = [], [], [], [], []
    with_delayed = {k: [] for k in HORIZONS}
    for _ in range(args.rounds):  # interleave to share the machine's noise fairly
        plain.append(time_steps(lambda: plain_step(model, opt, x, y), args.steps))
        fb.append(time_steps(forward_backward, args.steps))
        with_meta.append(time_steps(ours, args.steps))
        ref.append(time_steps(reference, args.steps))
        keep.append(time_steps(keep_direction, args.steps))
        for k in HORIZONS:
            with_delayed[k].append(time_steps(delayed_step(k), args.steps))
    p = statistics.median(plain)
    # ours() = the training batch's forward/backward (shared with the real step) + the meta step
    ours_cost = (statistics.median(with_meta) - statistics.median(fb)) / p
    print(f"plain SGD step: {1000 * p:.1f} ms CPU (median of {args.rounds} x {args.steps})")
    print(f"(a) raymeta meta step (look-ahead + meta update) = {ours_cost:.2f} plain steps")
    print(
        f"    reference-style create_graph meta step        = {statistics.median(ref) / p:.2f} plain steps"
    )
    fb_time = statistics.median(fb)
    keep_cost = (statistics.median(keep) - fb_time) / p
    print(f"(c) delayed objective: keeping one step's direction = {keep_cost:.3f} plain steps")
    for k in HORIZONS:
        cost = (statistics.median(with_delayed[k]) - fb_time) / p
        print(
            f"    horizon {k:>2}: meta step = {cost:.2f} plain steps; with its {k} kept directions "
            f"= {cost + k * keep_cost:.2f} plain steps per meta step (look-ahead: {ours_cost:.2f})"
        )

    two = task.model_copy(update={"epochs": 2})
    specs = {
        "plain": HandRun(label="plain", task=two, schedule=ScheduleSpec(family="fixed", lr=0.1)),
        "meta": meta_train_run(OuterLoopConfig(meta_every=300), two, "meta"),
    }
    times = {"plain": [], "meta": []}
    for _ in range(args.epochs_repeat):
        for kind, spec in specs.items():
            epoch_run = build_run(spec, data=data)
            spe = epoch_run.steps_per_epoch
            optimizer = build_optimizer(two, epoch_run.model)
            state = epoch_run.train(optimizer=optimizer, stop_step=spe + 1)  # past evaluation
            t0 = time.process_time()
            epoch_run.train(state=state, optimizer=optimizer, stop_step=2 * spe - 1)
            times[kind].append(time.process_time() - t0)
    ratio = min(times["meta"]) / min(times["plain"])
    print(
        f"(b) meta-training epoch (meta_every=300) / plain SGD epoch = {ratio:.3f} "
        f"({min(times['meta']):.2f} s / {min(times['plain']):.2f} s CPU, {spe - 2} steps of the "
        f"second epoch, best of {args.epochs_repeat})"
    )
    t0 = time.process_time()
    mean_train_loss(model, data, Workers())
    print(
        f"    one-time cost of gamma's L0 (10k-image forward pass): {time.process_time() - t0:.2f} s"
    )


if __name__ == "__main__":
    main()
