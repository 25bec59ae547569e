"""Deterministic, disjoint train / validation / meta splits of a training set (the test set is separate)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymeta.errors import ConfigError


@dataclass(frozen=True)
class Splits:
    """Index tensors into a dataset's training set; pairwise disjoint.

    Attributes:
        train: ``(n_train,)`` int64 indices used for the inner-loop (model) updates.
        val: ``(n_val,)`` indices for model selection (e.g. Tune's early stopping); may be empty.
        meta: ``(C * meta_per_class,)`` indices of the class-balanced meta set (outer loop); may be empty.
    """

    train: torch.Tensor
    val: torch.Tensor
    meta: torch.Tensor


def make_splits(
    labels: torch.Tensor,
    num_classes: int,
    *,
    val_size: int,
    meta_per_class: int,
    seed: int,
    train_subset: int | None = None,
    class_names: tuple[str, ...] | None = None,
) -> Splits:
    """Split training-set indices into disjoint train, validation and balanced meta sets.

    The meta set is taken first: ``meta_per_class`` images of every class from a seeded
    permutation (the paper's 1000 held-out images on 10 classes for ``meta_per_class=100``).
    The validation set is then ``val_size`` images drawn from the rest; the remainder is the
    training split, optionally capped to ``train_subset`` images (seeded, for fast runs).

    Args:
        labels: ``(N,)`` int64 training labels.
        num_classes: number of classes ``C``.
        val_size: number of validation images (>= 0).
        meta_per_class: meta images per class (>= 0).
        seed: permutation seed; the same seed gives the same splits.
        train_subset: optional cap on the training split size.

    Raises:
        ConfigError: ``meta_per_class`` exceeds the smallest class, or the splits do not fit.
    """
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=gen)
    shuffled = labels[perm]
    meta_parts = []
    for c in range(num_classes):
        members = perm[shuffled == c]
        if meta_per_class > len(members):
            name = class_names[c] if class_names else str(c)
            raise ConfigError(
                f"meta_per_class={meta_per_class} is larger than class {name!r} "
                f"({len(members)} training images); accepted: 0..{len(members)}"
            )
        meta_parts.append(members[:meta_per_class])
    meta = torch.cat(meta_parts) if meta_parts else torch.empty(0, dtype=torch.long)
    in_meta = torch.zeros(len(labels), dtype=torch.bool)
    in_meta[meta] = True
    rest = perm[~in_meta[perm]]
    if val_size >= len(rest):
        raise ConfigError(
            f"val_size={val_size} leaves no training images ({len(rest)} remain after the meta set)"
        )
    val, train = rest[:val_size], rest[val_size:]
    if train_subset is not None:
        train = train[:train_subset]
    return Splits(train=train, val=val, meta=meta)
