"""GPU readiness of raymeta on one GPU, in under 5 minutes. Checks, in order:

1. **Ray Train on the GPU**: MLR-SNet meta-training with ``use_gpu`` and 1 worker (a local Ray
   with the GPU, ``TorchTrainer`` with NCCL, the device from
   :func:`raymeta.train.device.resolve_device`), 4 epochs on digits (scikit-learn's, always
   present; 88% test accuracy on CPU) or ``--dataset``. Passes when the run finishes with
   finite LRs, a finite gamma, both checkpoints of the meta-learner and a test accuracy above
   ``MIN_ACC``.
2. **Step costs on the GPU** (CIFAR-shaped synthetic data, ResNet-32, batch 128, every run
   assembled by :func:`raymeta.train.build.build_run` and stepped by its update rule, timed
   with ``torch.cuda.synchronize``): the MLR-SNet meta step (look-ahead + meta-learner update)
   in plain SGD steps, and an MFM step (network modulator, fast look-ahead every step) in
   cross-entropy steps. Pass: within the targets the CPU benchmarks use
   (``benchmarks/meta_overhead.py``: <= 1.6, ``benchmarks/mfm_overhead.py``: <= 2.5).
3. **AMP**: raymeta's loop trains in float32; where the GPU supports bfloat16, a plain step
   under ``torch.autocast(bfloat16)`` is timed against float32 and its loss checked finite
   (reported, not a pass condition).

Prints one line per check with its ratios and a final ``PASS`` or ``FAIL: <checks>`` line.
Exit status: 0 pass, 1 fail, 2 when this machine has no CUDA GPU (one line on stderr, nothing
run).

Usage: .venv/bin/python benchmarks/gpu_check.py [--dataset digits] [--steps 30]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time

META_STEP_TARGET = 1.6  # meta step / plain step, as benchmarks/meta_overhead.py (a)
MFM_STEP_TARGET = 2.5  # MFM step / CE step, as benchmarks/mfm_overhead.py
MIN_ACC = 0.5  # test accuracy of the meta-training run (10 classes: chance is 0.1)


def ray_train_check(dataset: str, use_gpu: bool = True) -> tuple[bool, str]:
    """Check 1: meta-training through Ray Train on the GPU (``use_gpu=False``: the same run
    on the CPU, to try this script on a machine without one)."""
    import ray

    from raymeta.config import OuterLoopConfig, TaskConfig
    from raymeta.session import start_local_ray
    from raymeta.spec import meta_train_run
    from raymeta.train.ray_train import fit

    task = TaskConfig(
        dataset=dataset, model="small_cnn", epochs=4, batch_size=64, val_size=200, meta_per_class=10
    )
    outer = OuterLoopConfig(meta_every=5, meta_batch_size=50)
    spec = meta_train_run(outer, task, "gpu-check", saved_epochs=[1, 4])
    start_local_ray(num_cpus=2, num_gpus=int(use_gpu), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as storage:
            t0 = time.perf_counter()
            result = fit(spec, num_workers=1, use_gpu=use_gpu, storage_path=storage)
            wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    acc = result.history[-1]["test_acc"]
    finite = all(math.isfinite(lr) for lr in result.lrs) and math.isfinite(result.gamma)
    ok = finite and sorted(result.saved_cells) == [1, 4] and acc > MIN_ACC
    detail = (
        f"{len(result.lrs)} steps, gamma {result.gamma:.3g}, test_acc {acc:.2%}, "
        f"checkpoints {sorted(result.saved_cells)}, {wall:.0f} s with Ray Train start-up"
    )
    return ok, detail


def synthetic_data(device, n: int = 2560, classes: int = 10, counts: list[int] | None = None):
    """CIFAR-shaped random images on ``device`` (timing only: nothing is learned)."""
    import torch

    from raymeta.data.task import TaskData

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, classes, (n,), generator=gen).to(device)
    empty_x, empty_y = x[:0], y[:0]
    names = tuple(str(c) for c in range(classes))
    return TaskData(
        x, y, empty_x, empty_y, x[:1000], y[:1000], empty_x, empty_y, classes, 3, 32, names, counts
    )


def step_time(spec, device, steps: int, autocast: bool = False) -> tuple[float, float]:
    """Median seconds of one optimisation step of ``spec``'s update rule on ``device`` (after
    a warm-up) and the last loss."""
    import torch

    from raymeta.train.build import build_run
    from raymeta.train.loop import build_optimizer

    counts = [256] * 10 if spec.kind == "longtail" else None
    run = build_run(spec, device, data=synthetic_data(device, counts=counts))
    optimizer = build_optimizer(run.task, run.model)
    run.schedule.start_epoch(0, lambda: math.log(10))  # gamma of MLR-SNet from L0 = ln 10
    run.rule.start_epoch(0)
    batch = run.task.batch_size
    meta = run.rule.meta_batch_size

    def next_meta():
        return run.data.meta_x[:meta], run.data.meta_y[:meta]

    times, loss = [], math.nan
    for step in range(10 + steps):
        lo = (step * batch) % (len(run.data.train_y) - batch)
        x, y = run.data.train_x[lo : lo + batch], run.data.train_y[lo : lo + batch]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = run.rule.step(
                run.model,
                optimizer,
                x,
                y,
                step=step,
                epoch=0,
                schedule=run.schedule,
                next_meta=next_meta,
                workers=run.workers,
            )
        torch.cuda.synchronize()
        if step >= 10:
            times.append(time.perf_counter() - t0)
        loss = out.loss
    return statistics.median(times), loss


def step_checks(steps: int) -> list[tuple[str, bool, str]]:
    """Checks 2 and 3."""
    import torch

    from raymeta.config import LongTailTaskConfig, OuterLoopConfig, TaskConfig
    from raymeta.spec import HandRun, LongTailRun, ScheduleSpec, meta_train_run
    from raymeta.train.device import resolve_device

    device = resolve_device(True)
    task = TaskConfig(dataset="cifar10", model="resnet32", batch_size=128, epochs=1)
    lt_task = LongTailTaskConfig(dataset="cifar10", model="resnet32", batch_size=128, epochs=1)
    fixed = ScheduleSpec(family="fixed", lr=0.05)

    def longtail(method):
        return LongTailRun(
            label=method, task=lt_task, method=method, meta_batch_size=100, schedule=fixed
        )

    plain, _ = step_time(HandRun(label="plain", task=task, schedule=fixed), device, steps)
    meta, _ = step_time(meta_train_run(OuterLoopConfig(meta_every=1), task, "meta"), device, steps)
    ce, _ = step_time(longtail("ce"), device, steps)
    mfm, mfm_loss = step_time(longtail("mfm_network"), device, steps)
    meta_ratio, mfm_ratio = (meta - plain) / plain, mfm / ce
    checks = [
        (
            "meta step",
            meta_ratio <= META_STEP_TARGET,
            f"{meta_ratio:.2f} plain steps (target <= {META_STEP_TARGET}; plain step "
            f"{1000 * plain:.1f} ms, with meta step {1000 * meta:.1f} ms)",
        ),
        (
            "MFM step",
            mfm_ratio <= MFM_STEP_TARGET and math.isfinite(mfm_loss),
            f"{mfm_ratio:.2f} CE steps (target <= {MFM_STEP_TARGET}; CE {1000 * ce:.1f} ms, "
            f"MFM network {1000 * mfm:.1f} ms)",
        ),
    ]
    if torch.cuda.is_bf16_supported():
        amp, amp_loss = step_time(
            HandRun(label="amp", task=task, schedule=fixed), device, steps, autocast=True
        )
        print(
            f"AMP (reported): bfloat16 autocast plain step {1000 * amp:.1f} ms = "
            f"{amp / plain:.2f} x float32 (loss {amp_loss:.3f}); raymeta trains in float32",
            flush=True,
        )
    else:
        print("AMP (reported): this GPU has no bfloat16 support; skipped", flush=True)
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits", help="dataset of the Ray Train check")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); "
            "run it on a machine with one",
            file=sys.stderr,
        )
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ok, detail = ray_train_check(args.dataset)
    results = [("Ray Train meta-training", ok, detail)]
    print(f"Ray Train meta-training (use_gpu, 1 worker): {'ok' if ok else 'FAILED'}: {detail}")
    for name, ok, detail in step_checks(args.steps):
        results.append((name, ok, detail))
        print(f"{name}: {'ok' if ok else 'FAILED'}: {detail}", flush=True)
    failed = [name for name, ok, _ in results if not ok]
    print("PASS" if not failed else f"FAIL: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
