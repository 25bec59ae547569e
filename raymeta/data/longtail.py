"""Long-tailed sub-sampling with a balanced meta set (the Meta-Weight-Net protocol), and the
many / medium / few-shot evaluation of long-tailed recognition.

Protocol (Shu et al., "Meta-Weight-Net", NeurIPS 2019, Sec. 4.2, and its public code; also
used by MFM, Wang et al., arXiv 2008.03428): the balanced **meta set** (``meta_per_class``
images of every class, 10 in the papers) is taken from the training set *first*; the rest of
each class is then sub-sampled to the long-tailed profile

- ``exp`` (exponential, Cui et al. CVPR 2019; Cao et al. NeurIPS 2019):
  ``n_i = floor(n_max * (1 / IF) ** (i / (C - 1)))`` for the class of rank ``i = 0 .. C-1``;
- ``step`` (Buda et al. 2018; Cao et al. 2019): the ``C // 2`` head ranks keep ``n_max``, the
  remaining ``C - C // 2`` ranks keep ``floor(n_max / IF)``,

where ``IF = n_max / n_min >= 1`` is the **imbalance factor** (1 = balanced). ``n_max``
defaults to the smallest class size left after the meta (and optional validation) set, so
CIFAR-10 gives ``n_max = 5000 - 10 = 4990`` as in the reference code. The test set stays
balanced and is the evaluation set.

Which class gets which rank is the natural class order (class 0 is the head) or a seeded
permutation: on Fashion-MNIST the natural order puts the easy classes (sneaker, bag, ankle
boot) in the tail, so results should be checked over permutations (docs/design.md section 4).

Shot groups follow OLTR (Liu et al., CVPR 2019) and LDAM (Cao et al. 2019): many-shot classes
have more than 100 training images, few-shot fewer than 20, medium-shot the rest. Those
thresholds are absolute counts made for ImageNet-LT and CIFAR-100-LT (``n_max = 500``); raymeta
scales them with the head size — many-shot ``n_c > n_max / 5``, few-shot ``n_c < n_max / 25``
— which reproduces 100 / 20 at ``n_max = 500`` and splits CIFAR-10-LT / Fashion-MNIST-LT at
IF 100 into 4 / 3 / 3 classes. Both thresholds can be given explicitly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from raymeta.errors import ConfigError

PROFILES = ("exp", "step")
CLASS_ORDERS = ("natural", "permuted")
MANY_SHOT_FRACTION = 1 / 5  # many-shot: n_c > n_max / 5  (OLTR's 100 at n_max = 500)
FEW_SHOT_FRACTION = 1 / 25  # few-shot:  n_c < n_max / 25 (OLTR's 20 at n_max = 500)


@dataclass(frozen=True)
class LongTailSplit:
    """Index tensors into a dataset's training set for one long-tailed task; pairwise disjoint.

    Attributes:
        train: ``(sum(counts),)`` int64 indices of the long-tailed training set, grouped by class
            in class-index order (shuffle before batching).
        meta: ``(C * meta_per_class,)`` int64 indices of the balanced meta set.
        val: ``(C * val_per_class,)`` int64 indices of an optional balanced validation set
            (empty by default; the Meta-Weight-Net protocol has none).
        counts: training images kept per class, a list in class-index order.
        class_order: ``class_order[i]`` is the class given rank ``i`` (rank 0 is the head).
        imbalance_factor: ``IF``; ``max(counts) / min(counts)`` up to flooring.
        profile: ``"exp"`` or ``"step"``.
        n_max: images of the head class.
    """

    train: torch.Tensor
    meta: torch.Tensor
    val: torch.Tensor
    counts: list[int]
    class_order: list[int]
    imbalance_factor: float
    profile: str
    n_max: int


def longtail_profile(
    num_classes: int, n_max: int, imbalance_factor: float, profile: str = "exp"
) -> list[int]:
    """Images per **rank** (rank 0 = head) of the long-tailed profile; see the module docstring.

    Args:
        num_classes: ``C >= 1``.
        n_max: images of the head class (>= 1).
        imbalance_factor: ``IF >= 1`` (finite).
        profile: ``"exp"`` or ``"step"``.

    Returns:
        ``C`` non-increasing ints; ``exp`` with ``C = 10, n_max = 4990, IF = 100`` gives
        ``[4990, 2997, 1800, 1081, 649, 390, 234, 140, 84, 49]``.

    Raises:
        ConfigError: a value is out of range, or the tail would get no image.
    """
    _check_if(imbalance_factor)
    if profile not in PROFILES:
        raise ConfigError(f"unknown long-tail profile {profile!r}; accepted: {', '.join(PROFILES)}")
    if num_classes < 1:
        raise ConfigError(f"num_classes={num_classes} is invalid; accepted: an integer >= 1")
    if n_max < 1:
        raise ConfigError(f"n_max={n_max} is invalid; accepted: an integer >= 1")
    inv = 1.0 / imbalance_factor
    if profile == "exp":
        # The reference's arithmetic: int(img_max * imb_factor ** (i / (C - 1))), imb_factor = 1/IF.
        counts = [
            int(n_max * inv ** (i / (num_classes - 1))) if num_classes > 1 else n_max
            for i in range(num_classes)
        ]
    else:
        head = num_classes // 2
        counts = [n_max] * head + [int(n_max * inv)] * (num_classes - head)
    if min(counts) < 1:
        raise ConfigError(
            f"imbalance_factor={imbalance_factor:g} with n_max={n_max} leaves the tail class with "
            f"no image; accepted: imbalance_factor <= {n_max}"
        )
    return counts


def _check_if(imbalance_factor: float) -> None:
    if not (isinstance(imbalance_factor, int | float) and math.isfinite(imbalance_factor)) or (
        imbalance_factor < 1
    ):
        raise ConfigError(
            f"imbalance_factor={imbalance_factor!r} is invalid; accepted: a finite number >= 1 "
            "(1 = balanced, 100 = head class 100x the tail)"
        )


def _class_name(c: int, class_names: Sequence[str] | None) -> str:
    return repr(class_names[c]) if class_names else str(c)


def make_longtail_split(
    labels: torch.Tensor,
    num_classes: int,
    *,
    imbalance_factor: float,
    meta_per_class: int = 10,
    val_per_class: int = 0,
    profile: str = "exp",
    n_max: int | None = None,
    class_order: str = "natural",
    seed: int = 0,
    order_seed: int | None = None,
    class_names: Sequence[str] | None = None,
) -> LongTailSplit:
    """Cut the balanced meta set first, then sub-sample the rest to a long-tailed profile.

    Within every class the images are taken from one seeded permutation of the training set:
    the first ``meta_per_class`` go to the meta set, the next ``val_per_class`` to the
    validation set, and the next ``counts[c]`` to the training set. The same arguments give the
    same split; the meta set does not depend on the imbalance factor or the profile.

    Args:
        labels: ``(N,)`` int64 training labels in ``[0, num_classes)`` (``Dataset.train_y``).
        num_classes: ``C``; every class must occur in ``labels``.
        imbalance_factor: ``IF >= 1``.
        meta_per_class: meta images per class (>= 0; 10 in Meta-Weight-Net and MFM).
        val_per_class: balanced validation images per class (>= 0).
        profile: ``"exp"`` or ``"step"``.
        n_max: head-class size; default the smallest class size minus meta and validation.
        class_order: ``"natural"`` (class 0 is the head) or ``"permuted"`` (a seeded permutation
            of the classes decides which are rare).
        seed: seed of the per-class sampling (meta, validation and training images).
        order_seed: seed of the class permutation (default ``seed``); changing it keeps the
            meta set and changes only which classes are rare.
        class_names: optional names used in error messages.

    Returns:
        A :class:`LongTailSplit`.

    Raises:
        ConfigError: ``IF < 1``, an unknown profile or class order, ``num_classes`` larger than
            the classes present in ``labels`` (or labels outside ``[0, C)``), ``meta_per_class``
            (plus ``val_per_class``) larger than the smallest class, or ``n_max`` larger than
            what a class has left.
    """
    _check_if(imbalance_factor)
    if profile not in PROFILES:
        raise ConfigError(f"unknown long-tail profile {profile!r}; accepted: {', '.join(PROFILES)}")
    if class_order not in CLASS_ORDERS:
        raise ConfigError(
            f"unknown class_order {class_order!r}; accepted: {', '.join(CLASS_ORDERS)}"
        )
    for key, value in (("meta_per_class", meta_per_class), ("val_per_class", val_per_class)):
        if value < 0:
            raise ConfigError(f"{key}={value} is invalid; accepted: an integer >= 0")
    labels = torch.as_tensor(labels).long().cpu()
    present = int(labels.max()) + 1 if len(labels) else 0
    sizes = torch.bincount(labels, minlength=max(num_classes, present)) if len(labels) else None
    n_present = int((sizes > 0).sum()) if sizes is not None else 0
    if num_classes < 1 or num_classes > n_present or present > num_classes:
        raise ConfigError(
            f"num_classes={num_classes} does not match the labels ({n_present} classes present, "
            f"labels up to {present - 1}); accepted: {n_present}"
        )
    held = meta_per_class + val_per_class
    smallest = int(sizes[:num_classes].min())
    if held > smallest:
        c = int(sizes[:num_classes].argmin())
        raise ConfigError(
            f"meta_per_class={meta_per_class} (+ val_per_class={val_per_class}) is larger than "
            f"class {_class_name(c, class_names)} ({smallest} training images); "
            f"accepted: meta_per_class + val_per_class <= {smallest}"
        )
    available = smallest - held
    if n_max is None:
        n_max = available
    elif not 1 <= n_max <= available:
        raise ConfigError(
            f"n_max={n_max} is invalid; accepted: 1..{available} (smallest class after the meta "
            "and validation sets)"
        )
    by_rank = longtail_profile(num_classes, n_max, imbalance_factor, profile)

    gen = torch.Generator().manual_seed(seed)
    if class_order == "permuted":
        order_gen = torch.Generator().manual_seed(seed if order_seed is None else order_seed)
        order = torch.randperm(num_classes, generator=order_gen).tolist()
    else:
        order = list(range(num_classes))
    counts = [0] * num_classes
    for rank, c in enumerate(order):
        counts[c] = by_rank[rank]

    perm = torch.randperm(len(labels), generator=gen)
    shuffled = labels[perm]
    meta, val, train = [], [], []
    for c in range(num_classes):
        members = perm[shuffled == c]
        meta.append(members[:meta_per_class])
        val.append(members[meta_per_class:held])
        train.append(members[held : held + counts[c]])
    return LongTailSplit(
        train=torch.cat(train),
        meta=torch.cat(meta),
        val=torch.cat(val),
        counts=counts,
        class_order=order,
        imbalance_factor=float(imbalance_factor),
        profile=profile,
        n_max=n_max,
    )


def shot_groups(
    counts: Sequence[int],
    *,
    many_threshold: float | None = None,
    few_threshold: float | None = None,
) -> dict[str, list[int]]:
    """Classes in the many-, medium- and few-shot groups.

    many: ``n_c > many_threshold``; few: ``n_c < few_threshold``; medium: the rest. Defaults
    scale OLTR's 100 / 20 to the head size: ``max(counts) / 5`` and ``max(counts) / 25``.

    Args:
        counts: training images per class, in class-index order.
        many_threshold, few_threshold: explicit thresholds in images.

    Returns:
        ``{"many": [...], "medium": [...], "few": [...]}`` class indices (a group may be empty,
        e.g. every class is many-shot at ``IF = 1``).

    Raises:
        ConfigError: ``few_threshold > many_threshold``.
    """
    n_max = max(counts)
    many = n_max * MANY_SHOT_FRACTION if many_threshold is None else many_threshold
    few = n_max * FEW_SHOT_FRACTION if few_threshold is None else few_threshold
    if few > many:
        raise ConfigError(
            f"few_threshold={few:g} exceeds many_threshold={many:g}; accepted: few <= many"
        )
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(counts):
        groups["many" if n > many else "few" if n < few else "medium"].append(c)
    return groups


@dataclass(frozen=True)
class LongTailMetrics:
    """Accuracies (fractions in [0, 1]) of a classifier on a (balanced) test set.

    Attributes:
        top1: overall top-1 accuracy over all test samples.
        per_class: accuracy of every class, in class-index order (``nan`` for a class with no
            test sample).
        many, medium, few: mean per-class accuracy over the classes of each shot group
            (``nan`` for an empty group).
        groups: the shot groups used (class indices).
    """

    top1: float
    per_class: list[float]
    many: float
    medium: float
    few: float
    groups: dict[str, list[int]]

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{name: value}`` for metric logging: ``top1``, ``many_acc``, ``medium_acc``,
        ``few_acc`` and ``acc_class_{c}``, each prefixed by ``prefix``."""
        out = {f"{prefix}top1": self.top1}
        for g in ("many", "medium", "few"):
            out[f"{prefix}{g}_acc"] = getattr(self, g)
        for c, a in enumerate(self.per_class):
            out[f"{prefix}acc_class_{c}"] = a
        return out

    def as_record(self) -> dict:
        return asdict(self)


def longtail_metrics(
    preds: torch.Tensor,
    targets: torch.Tensor,
    counts: Sequence[int],
    *,
    many_threshold: float | None = None,
    few_threshold: float | None = None,
) -> LongTailMetrics:
    """Overall, per-class and many/medium/few-shot accuracy from predictions.

    Args:
        preds: ``(N,)`` int64 predicted classes (e.g. ``logits.argmax(1)``).
        targets: ``(N,)`` int64 true classes.
        counts: training images per class (defines ``C`` and the shot groups).
        many_threshold, few_threshold: see :func:`shot_groups`.

    Raises:
        ConfigError: shapes differ, or a label is outside ``[0, len(counts))``.
    """
    preds, targets = torch.as_tensor(preds).cpu().long(), torch.as_tensor(targets).cpu().long()
    num_classes = len(counts)
    if preds.shape != targets.shape or preds.dim() != 1:
        raise ConfigError(
            f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} must be equal 1-D shapes"
        )
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ConfigError(f"targets must lie in [0, {num_classes}) (len(counts)={num_classes})")
    correct = (preds == targets).double()
    totals = torch.bincount(targets, minlength=num_classes).double()
    hits = torch.bincount(targets, weights=correct, minlength=num_classes)
    return metrics_from_class_hits(
        hits, totals, counts, many_threshold=many_threshold, few_threshold=few_threshold
    )


def metrics_from_class_hits(
    hits: torch.Tensor,
    totals: torch.Tensor,
    counts: Sequence[int],
    *,
    many_threshold: float | None = None,
    few_threshold: float | None = None,
) -> LongTailMetrics:
    """:func:`longtail_metrics` from per-class tallies (e.g. summed across data-parallel
    workers): ``hits`` and ``totals`` are ``(C,)`` correct predictions and test samples per
    class; ``counts`` the training images per class (the shot groups)."""
    hits, totals = hits.double().cpu(), totals.double().cpu()
    per_class = (hits / totals).tolist()  # nan where a class has no test sample
    groups = shot_groups(counts, many_threshold=many_threshold, few_threshold=few_threshold)

    def group_mean(cs: list[int]) -> float:
        vals = [per_class[c] for c in cs if not math.isnan(per_class[c])]
        return sum(vals) / len(vals) if vals else math.nan

    n = float(totals.sum())
    return LongTailMetrics(
        top1=float(hits.sum()) / n if n else math.nan,
        per_class=per_class,
        many=group_mean(groups["many"]),
        medium=group_mean(groups["medium"]),
        few=group_mean(groups["few"]),
        groups=groups,
    )
