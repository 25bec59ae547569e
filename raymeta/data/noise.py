"""Synthetic label noise: uniform (symmetric) and pair-flip corruption of training labels.

The two standard class-conditional noise models of the noisy-label literature, defined by a
row-stochastic transition matrix ``T[i, j] = P(noisy = j | clean = i)`` over ``C`` classes at
noise rate ``r``:

- ``uniform`` (a.k.a. symmetric): ``T = (1 - r) I + r / (C - 1) (1 - I)``; a corrupted label
  goes to any *other* class with equal probability.
- ``pair`` (pair-flip): ``T[i, i] = 1 - r``, ``T[i, (i + 1) mod C] = r``; a corrupted label
  goes to the next class only (a structured noise that mimics confusions between similar
  classes, and is harder: at ``r`` close to 0.5 the wrong class nearly ties the true one).

Sources: both matrices as defined by Han et al., "Co-teaching: Robust Training of Deep Neural
Networks with Extremely Noisy Labels", NeurIPS 2018 (Sec. 4, "symmetry flipping" and "pair
flipping"); the protocol of a clean, balanced meta set beside a corrupted training set is
Meta-Weight-Net's (Shu et al., NeurIPS 2019, Sec. 4.2), which MLR-SNet's robustness experiment
(Shu et al., TPAMI 2022) follows. Meta-Weight-Net's own "uniform" noise draws the new label from
all ``C`` classes, the true one included, so its effective flip rate is ``r (C - 1) / C``;
raymeta uses Co-teaching's definition, so that the requested rate *is* the fraction of
corrupted labels (in expectation).

Each label is corrupted independently with probability ``r`` (a Bernoulli draw per sample, as
when sampling the noisy label from ``T``), so the realised flipped fraction is binomial with
mean ``r`` and standard deviation ``sqrt(r (1 - r) / N)``. Everything is drawn from a
``torch.Generator`` seeded with ``seed``: the same labels, type, rate and seed always give the
same corrupted labels. Only the training split should be corrupted; the meta, validation and
test sets stay clean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymeta.errors import ConfigError

NOISE_TYPES = ("uniform", "pair")


def transition_matrix(noise_type: str, rate: float, num_classes: int) -> torch.Tensor:
    """The ``(C, C)`` float64 row-stochastic matrix ``T[i, j] = P(noisy = j | clean = i)``.

    Raises:
        ConfigError: unknown ``noise_type``, ``rate`` outside ``[0, 1)`` or ``num_classes < 2``.
    """
    _check(noise_type, rate, num_classes)
    eye = torch.eye(num_classes, dtype=torch.float64)
    if noise_type == "uniform":
        return (1 - rate) * eye + rate / (num_classes - 1) * (1 - eye)
    return (1 - rate) * eye + rate * eye.roll(1, dims=1)


@dataclass(frozen=True)
class NoiseRecord:
    """What a corruption did, to log beside the run (MLflow params + an artifact).

    Attributes:
        noise_type: ``uniform`` or ``pair``.
        rate: the requested corruption probability ``r``.
        seed: the generator seed.
        num_classes: ``C``.
        flipped: ``(K,)`` int64 positions (into the labels passed in) whose label changed.
        flipped_fraction: ``K / N``, the realised noise rate.
        transition: ``(C, C)`` float64 expected transition matrix (:func:`transition_matrix`).
        counts: ``(C, C)`` int64 realised counts, ``counts[i, j]`` = samples of clean class
            ``i`` now labelled ``j``; row sums are the clean class sizes.
    """

    noise_type: str
    rate: float
    seed: int
    num_classes: int
    flipped: torch.Tensor
    flipped_fraction: float
    transition: torch.Tensor
    counts: torch.Tensor

    def params(self) -> dict[str, float | int | str]:
        """Scalar summary for ``mlflow.log_params``/``log_metrics``."""
        return {
            "label_noise.type": self.noise_type,
            "label_noise.rate": self.rate,
            "label_noise.seed": self.seed,
            "label_noise.flipped": len(self.flipped),
            "label_noise.flipped_fraction": round(self.flipped_fraction, 6),
        }

    def to_dict(self) -> dict:
        """JSON-serialisable record (lists instead of tensors), e.g. for ``mlflow.log_dict``."""
        return {
            "noise_type": self.noise_type,
            "rate": self.rate,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "flipped_fraction": self.flipped_fraction,
            "flipped_indices": self.flipped.tolist(),
            "transition": self.transition.tolist(),
            "counts": self.counts.tolist(),
        }


def _check(noise_type: str, rate: float, num_classes: int) -> None:
    if noise_type not in NOISE_TYPES:
        raise ConfigError(f"unknown label noise type {noise_type!r}; accepted: uniform, pair")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1:
        raise ConfigError(f"label noise rate must be a number in [0, 1) (got {rate!r})")
    if num_classes < 2:
        raise ConfigError(f"label noise needs at least 2 classes (got num_classes={num_classes})")


def corrupt_labels(
    labels: torch.Tensor, num_classes: int, noise_type: str, rate: float, seed: int
) -> tuple[torch.Tensor, NoiseRecord]:
    """Corrupt ``labels`` with uniform or pair-flip noise at rate ``rate``; seeded.

    Each label is flipped independently with probability ``rate``; a flipped label ``c`` becomes
    ``(c + k) mod C`` with ``k`` uniform in ``1..C-1`` (``uniform``) or ``k = 1`` (``pair``), so
    it never keeps its class. The input is not modified.

    Args:
        labels: ``(N,)`` int64 clean class indices in ``[0, num_classes)`` (any device).
        num_classes: ``C >= 2``.
        noise_type: ``uniform`` or ``pair``.
        rate: corruption probability in ``[0, 1)``.
        seed: generator seed; same inputs and seed give the same output.

    Returns:
        ``(noisy, record)``: ``(N,)`` int64 noisy labels on ``labels``' device, and the
        :class:`NoiseRecord` (CPU tensors).

    Raises:
        ConfigError: unknown type, rate outside ``[0, 1)``, ``num_classes < 2``, or labels
            that are not a 1-D integer tensor in ``[0, num_classes)``.
    """
    _check(noise_type, rate, num_classes)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ConfigError(
            f"labels must be a 1-D integer tensor (got {labels.dtype} of shape {tuple(labels.shape)})"
        )
    clean = labels.detach().to("cpu", torch.int64)
    if len(clean) and (int(clean.min()) < 0 or int(clean.max()) >= num_classes):
        raise ConfigError(
            f"labels must lie in [0, {num_classes}) (got min {int(clean.min())}, "
            f"max {int(clean.max())})"
        )
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(clean), generator=gen, dtype=torch.float64) < rate
    if noise_type == "uniform":
        shift = torch.randint(1, num_classes, (len(clean),), generator=gen)
    else:
        shift = torch.ones(len(clean), dtype=torch.int64)
    noisy = torch.where(flip, (clean + shift) % num_classes, clean)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    counts.index_add_(0, clean * num_classes + noisy, torch.ones_like(clean))
    flipped = flip.nonzero().flatten()
    record = NoiseRecord(
        noise_type=noise_type,
        rate=float(rate),
        seed=seed,
        num_classes=num_classes,
        flipped=flipped,
        flipped_fraction=len(flipped) / len(clean) if len(clean) else 0.0,
        transition=transition_matrix(noise_type, rate, num_classes),
        counts=counts.view(num_classes, num_classes),
    )
    return noisy.to(labels.device), record
