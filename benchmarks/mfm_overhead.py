"""Cost of an MFM training epoch (at the defaults: base loss, sites, look-ahead every
``meta_every`` steps) relative to a plain cross-entropy epoch, measured in one run on the same
data, model and loop.

Setup: Fashion-MNIST-LT IF 100 (exponential profile, 10 meta images per class taken first,
14,860 training images, 148 steps of 100), the small CNN, SGD momentum 0.9, meta batch 100
(the whole balanced meta set), ``torch`` threads as given. Every epoch is a run spec assembled
by :func:`raymeta.train.build.build_run` and trained by :func:`raymeta.train.loop.train` (the
loop every raymeta run uses) on a fresh model; the test set is left out so only training is timed
(``train_time_s``). The methods are interleaved round by round so that load from other
processes hits all of them alike; the ratio is the median MFM epoch over the median CE epoch
(the plain CE network has no modulation hooks); the ratio of the fastest epochs is printed
beside it (the least disturbed by other load). Meta-Weight-Net (same loop and look-ahead) is
timed for context.

Target: at most 2.5 for both variants at their defaults (``raymeta.meta.methods.MFM_DEFAULTS``,
chosen by the design search: base loss, sites, meta objective, ``meta_every``; the default
``lookahead="fast"``). ``--exact`` also times the exact look-ahead (second order through every
weight, a second forward/backward for the real step).

Usage: .venv/bin/python benchmarks/mfm_overhead.py [--rounds 3] [--threads 2] [--exact]
[--meta-batch 100]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from raymeta.config import META_BATCH_SIZE, LongTailTaskConfig
from raymeta.spec import LongTailRun, ScheduleSpec
from raymeta.train.build import build_run
from raymeta.train.loop import load_task_data

TARGET = 2.5


def epoch_time(task, data, method: str, params: dict, meta_batch: int = META_BATCH_SIZE) -> float:
    """Seconds of one training epoch of ``method`` (a fresh model)."""
    spec = LongTailRun(
        label=method,
        task=task,
        method=method,
        params=params,
        meta_batch_size=meta_batch,
        schedule=ScheduleSpec(family="fixed", lr=0.05),
    )
    state = build_run(spec, data=data).train()
    return state.history[-1]["train_time_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="epochs of every method")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--exact", action="store_true", help="also time lookahead='exact'")
    parser.add_argument(
        "--meta-batch",
        type=int,
        default=META_BATCH_SIZE,
        help=f"meta batch (default {META_BATCH_SIZE}, the whole meta set)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = LongTailTaskConfig(imbalance_factor=100, epochs=1, batch_size=100)
    data = load_task_data(task)
    empty = data.test_x[:0], data.test_y[:0]
    data = dataclasses.replace(data, test_x=empty[0], test_y=empty[1])
    configs = {
        "CE (plain)": ("ce", {}),
        "MFM direct, fast": ("mfm_direct", {}),  # the defaults
        "MFM network, fast": ("mfm_network", {}),
        "Meta-Weight-Net": ("mwn", {}),  # for context: the "about 3x" loop
    }
    if args.exact:
        configs["MFM direct, exact"] = ("mfm_direct", {"lookahead": "exact"})
        configs["MFM network, exact"] = ("mfm_network", {"lookahead": "exact"})
    n_steps = len(data.train_y) // task.batch_size
    print(
        f"Fashion-MNIST-LT IF 100: {len(data.train_y)} images, {n_steps} steps of 100, "
        f"meta batch {args.meta_batch}, small CNN, {args.threads} threads, {args.rounds} rounds"
    )
    epoch_time(task, data, "ce", {})  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (method, params) in configs.items():
            times[name].append(epoch_time(task, data, method, params, args.meta_batch))
    base = statistics.median(times["CE (plain)"])
    fastest = min(times["CE (plain)"])
    verdicts = []
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:20s} epoch {med:6.2f} s  ({1000 * med / n_steps:5.1f} ms/step)  "
            f"ratio to CE {med / base:4.2f} (fastest epochs: {min(ts) / fastest:4.2f})"
        )
        if "fast" in name:
            ok = "meets" if med / base <= TARGET else "MISSES"
            verdicts.append(f"{name.removesuffix(', fast')} {med / base:.2f} {ok}")
    print(
        f"MFM epoch / CE epoch (defaults, fast look-ahead, medians; target <= {TARGET}): "
        + "; ".join(verdicts)
    )


if __name__ == "__main__":
    main()
