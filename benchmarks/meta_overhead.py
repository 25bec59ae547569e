"""Cost of MLR-SNet meta-training relative to plain SGD, measured in one run on the same data
and model (Fashion-MNIST, small CNN, batch 128, 2 threads). Prints:

(a) one meta step (look-ahead + meta-learner update) in units of a plain SGD step, for
    raymeta's first-order-exact look-ahead and for the reference's create_graph look-ahead;
(b) a meta-training epoch with t_val=300 divided by a plain SGD epoch (steady state: the
    second epoch; the one-time L0 pass for gamma is printed separately).

Usage: .venv/bin/python benchmarks/meta_overhead.py [--steps 60] [--epochs-repeat 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from raymeta.config import TaskConfig
from raymeta.data.batches import steps_per_epoch
from raymeta.meta.mlrsnet import MLRSNetMetaTrainer
from raymeta.schedules import HandSchedule, MLRSNet
from raymeta.train.loop import build_task_model, load_task_data, train


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
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per timing block")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--epochs-repeat", type=int, default=2, help="epochs of each kind in (b)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    task = TaskConfig(epochs=1, momentum=0.0)
    data = load_task_data(task)
    model = build_task_model(task, data, "cpu")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=5e-4)
    meta = MLRSNetMetaTrainer(MLRSNet(), 10, meta_every=1, meta_batch_size=100)
    meta.gamma = 0.67
    x, y = data.train_x[:128], data.train_y[:128]
    mx, my = data.meta_x[:100], data.meta_y[:100]

    def forward_backward():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        return loss

    def ours():
        meta.meta_step(model, opt, forward_backward().item(), mx, my)

    def reference():
        reference_meta_step(model, meta, x, y, mx, my)

    plain, fb, with_meta, ref = [], [], [], []
    for _ in range(args.rounds):  # interleave to share the machine's noise fairly
        plain.append(time_steps(lambda: plain_step(model, opt, x, y), args.steps))
        fb.append(time_steps(forward_backward, args.steps))
        with_meta.append(time_steps(ours, args.steps))
        ref.append(time_steps(reference, args.steps))
    p = statistics.median(plain)
    # ours() = the training batch's forward/backward (shared with the real step) + the meta step
    ours_cost = (statistics.median(with_meta) - statistics.median(fb)) / p
    print(f"plain SGD step: {1000 * p:.1f} ms (median of {args.rounds} x {args.steps})")
    print(f"(a) raymeta meta step (look-ahead + meta update) = {ours_cost:.2f} plain steps")
    print(
        f"    reference-style create_graph meta step        = {statistics.median(ref) / p:.2f} plain steps"
    )

    spe = steps_per_epoch(len(data.train_y), task.batch_size)
    two = task.model_copy(update={"epochs": 2})
    times = {"plain": [], "meta": []}
    first = {"plain": [], "meta": []}
    for _ in range(args.epochs_repeat):
        for kind in ("plain", "meta"):
            m = build_task_model(two, data, "cpu")
            if kind == "plain":
                sched = HandSchedule("fixed", 0.1, 2 * spe, spe)
            else:
                sched = MLRSNetMetaTrainer(MLRSNet(), 10, meta_every=300, meta_batch_size=100)
            state = train(two, data, m, sched)
            first[kind].append(state.history[0]["train_time_s"])
            times[kind].append(state.history[1]["train_time_s"])
    ratio = min(times["meta"]) / min(times["plain"])
    print(
        f"(b) meta-training epoch (t_val=300) / plain SGD epoch = {ratio:.3f} "
        f"({min(times['meta']):.2f} s / {min(times['plain']):.2f} s, {spe} steps, second epoch, "
        f"best of {args.epochs_repeat})"
    )
    once = min(first["meta"]) - min(first["plain"]) - (min(times["meta"]) - min(times["plain"]))
    print(
        f"    one-time cost of gamma's L0 (10k-image forward pass) in the first epoch: {once:.2f} s"
    )


if __name__ == "__main__":
    main()
