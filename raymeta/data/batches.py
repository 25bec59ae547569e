"""Seeded mini-batch index streams, sharded across data-parallel workers.

Worker ``r`` of ``W`` takes the ``r``-th contiguous chunk of every global batch of
``W * batch_size`` indices, so a run with ``W`` workers and per-worker batch ``b`` sees exactly
the batches of a one-worker run with batch ``W * b`` (docs/design.md section 5).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_batches(
    n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> Iterator[torch.Tensor]:
    """Yield this worker's ``(batch_size,)`` index tensors for one epoch over ``range(n)``.

    The permutation depends only on ``(seed, epoch)``; the last incomplete global batch is
    dropped so that every step averages the same number of samples on every worker.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    global_batch = batch_size * world_size
    for start in range(0, n - global_batch + 1, global_batch):
        lo = start + rank * batch_size
        yield perm[lo : lo + batch_size]


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Number of optimisation steps in one epoch (incomplete global batches are dropped)."""
    return n // (batch_size * world_size)


def endless_batches(
    n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
) -> Iterator[torch.Tensor]:
    """Cycle through ``range(n)`` forever in reshuffled passes (used for meta-set batches).

    If ``W * batch_size > n`` the global batch is the whole set, split into equal chunks.
    """
    global_batch = min(batch_size * world_size, n - n % world_size)
    per_worker = global_batch // world_size
    epoch = 0
    while True:
        yield from epoch_batches(
            n, per_worker, seed=seed + 7919, epoch=epoch, rank=rank, world_size=world_size
        )
        epoch += 1
