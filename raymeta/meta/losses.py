"""Long-tailed recognition losses and re-sampling under one training-step interface (plain
PyTorch).

Losses (``forward(logits (B, K), targets (B,) int64) -> () loss``):

- :class:`CrossEntropyLoss` — the plain baseline.
- :class:`ClassBalancedLoss` — re-weighting by the inverse effective number of samples
  (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019).
- :class:`FocalLoss` — softmax focal loss (Lin et al., "Focal Loss for Dense Object
  Detection", ICCV 2017; ``torchvision.ops.sigmoid_focal_loss`` is the binary form).
- :class:`LDAMLoss` — label-distribution-aware margins with deferred re-weighting (Cao et al.,
  "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019), with
  the cosine classifier :class:`NormedLinear` (:func:`use_normed_classifier`).
- :class:`LogitAdjustedLoss` — logit-adjusted softmax cross-entropy (Menon et al., "Long-tail
  learning via logit adjustment", ICLR 2021; ``tau = 1`` is the balanced softmax of Ren et al.,
  NeurIPS 2020).

Re-sampling: :func:`class_balanced_indices` / :func:`class_balanced_weights` (class-balanced
sampling, e.g. Kang et al., "Decoupling Representation and Classifier", ICLR 2020).

A loss takes training steps through :class:`LossStep` (the step interface of
:mod:`raymeta.meta.base`); :mod:`raymeta.meta.methods` builds every method by name.

Weighted losses support two reductions: ``"weighted_mean"`` (``sum_i w_i l_i / sum_i w_i``,
as ``F.cross_entropy(weight=...)`` and the LDAM-DRW code) and ``"mean"``
(``sum_i w_i l_i / B``, as Cui et al.'s code). With several data-parallel workers the weighted
mean's denominator is averaged across workers through the loss's ``average`` attribute, so N
workers with batch b match one worker with batch N*b.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raymeta.errors import ConfigError
from raymeta.meta.base import StepOutput, sgd_step
from raymeta.meta.lookahead import Average, identity_average, set_lr

REDUCTIONS = ("weighted_mean", "mean")


def _counts(counts: Sequence[int]) -> torch.Tensor:
    t = torch.as_tensor(list(counts), dtype=torch.float64)
    if t.dim() != 1 or len(t) == 0 or bool((t < 1).any()):
        raise ConfigError(f"class counts {list(counts)} are invalid; accepted: integers >= 1")
    return t


def effective_number_weights(counts: Sequence[int], beta: float = 0.9999) -> torch.Tensor:
    """Class weights ``(C,)`` float32 ``w_c proportional to (1 - beta) / (1 - beta ** n_c)``,
    normalised to sum to ``C`` (Cui et al., CVPR 2019, Eq. 3 and their code).

    ``beta = 0`` gives uniform weights; ``beta -> 1`` approaches inverse class frequency.

    Raises:
        ConfigError: ``beta`` outside ``[0, 1)`` or a count below 1.
    """
    if not 0 <= beta < 1:
        raise ConfigError(f"beta={beta} is invalid; accepted: 0 <= beta < 1")
    n = _counts(counts)
    w = (1 - beta) / (1 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * len(n)).float()


class LongTailLoss(nn.Module):
    """Base class. ``average`` (mean across data-parallel workers, identity by default) is
    used only by the ``weighted_mean`` reduction; :meth:`start_epoch` is called by the loop at
    the start of every epoch (0-based)."""

    def __init__(self, reduction: str = "weighted_mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ConfigError(f"unknown reduction {reduction!r}; accepted: {', '.join(REDUCTIONS)}")
        self.reduction = reduction
        self.average: Average = identity_average

    def start_epoch(self, epoch: int) -> None:
        pass

    def reduce(self, per_sample: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
        """``(B,)`` losses and optional ``(B,)`` constant weights -> ``()`` loss."""
        if sample_weight is None:
            return per_sample.mean()
        weighted = (sample_weight * per_sample).mean()
        if self.reduction == "mean":
            return weighted
        return weighted / self.average(sample_weight.detach().mean())


class CrossEntropyLoss(LongTailLoss):
    """Mean softmax cross-entropy (the baseline every long-tail paper reports); no parameters
    (no weights, so no reduction to choose)."""

    def __init__(self):
        super().__init__()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)


class ClassBalancedLoss(LongTailLoss):
    """Class-balanced softmax cross-entropy: sample ``i`` weighted by the effective-number
    weight of its class (Cui et al., CVPR 2019).

    Args:
        counts: training images per class, class-index order.
        beta: effective-number hyper-parameter (paper: 0.9, 0.99, 0.999, 0.9999).
        focal_gamma: 0 for cross-entropy; > 0 for the class-balanced focal loss.
        reduction: see the module docstring (Cui et al.'s code divides by ``B``: ``"mean"``).
    """

    def __init__(
        self,
        counts: Sequence[int],
        beta: float = 0.9999,
        focal_gamma: float = 0.0,
        reduction: str = "weighted_mean",
    ):
        super().__init__(reduction)
        self.register_buffer("class_weight", effective_number_weights(counts, beta))
        self.focal_gamma = focal_gamma

    def forward(self, logits, targets):
        per = _focal_terms(logits, targets, self.focal_gamma)
        return self.reduce(per, self.class_weight.to(logits.dtype)[targets])


def _focal_terms(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(B,)`` per-sample ``-(1 - p_t) ** gamma * log p_t`` (cross-entropy at gamma 0)."""
    logp_t = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    if gamma == 0:
        return -logp_t
    return -((1 - logp_t.exp()).clamp_min(0) ** gamma) * logp_t


class FocalLoss(LongTailLoss):
    """Softmax focal loss ``-(1 - p_t) ** gamma * log p_t`` (Lin et al., ICCV 2017, Eq. 4),
    optionally with per-class weights ``alpha``.

    Args:
        gamma: focusing parameter (Lin et al. use 2 for detection; LDAM-DRW's CIFAR-LT focal
            baseline uses 1, the default here).
        class_weight: optional ``(C,)`` weights.
    """

    def __init__(
        self,
        gamma: float = 1.0,
        class_weight: torch.Tensor | None = None,
        reduction: str = "weighted_mean",
    ):
        super().__init__(reduction)
        if gamma < 0:
            raise ConfigError(f"focal gamma={gamma} is invalid; accepted: gamma >= 0")
        self.gamma = gamma
        self.register_buffer("class_weight", class_weight)

    def forward(self, logits, targets):
        w = None if self.class_weight is None else self.class_weight.to(logits.dtype)[targets]
        return self.reduce(_focal_terms(logits, targets, self.gamma), w)


class LDAMLoss(LongTailLoss):
    """LDAM loss with deferred re-weighting (DRW) (Cao et al., NeurIPS 2019, Eq. 13 and Alg. 1).

    The true-class logit is lowered by the margin ``m_c = C' / n_c ** (1/4)`` (scaled so the
    largest margin is ``max_m``) and all logits are multiplied by ``s`` before the softmax.
    DRW: from epoch ``drw_epoch`` on (0-based; paper 160 of 200) samples are re-weighted with
    the effective-number weights (``beta = 0.9999``); before it, no weights.

    ``s = 30`` assumes the logits are cosine similarities in ``[-1, 1]`` — the reference uses a
    normalised last layer (:class:`NormedLinear`, installed by :func:`use_normed_classifier`);
    with an ordinary linear layer use ``s = 1``.

    Args:
        counts: training images per class.
        max_m: largest margin (paper 0.5).
        s: logit scale.
        drw_epoch: first re-weighted epoch; None disables DRW (plain LDAM).
        beta: effective-number hyper-parameter of the DRW weights.
    """

    def __init__(
        self,
        counts: Sequence[int],
        max_m: float = 0.5,
        s: float = 30.0,
        drw_epoch: int | None = 160,
        beta: float = 0.9999,
        reduction: str = "weighted_mean",
    ):
        super().__init__(reduction)
        n = _counts(counts)
        m = 1.0 / n.pow(0.25)
        self.register_buffer("margins", (m * (max_m / m.max())).float())
        self.register_buffer("drw_weight", effective_number_weights(counts, beta))
        self.s, self.drw_epoch = s, drw_epoch
        self.reweight = False

    def start_epoch(self, epoch: int) -> None:
        self.reweight = self.drw_epoch is not None and epoch >= self.drw_epoch

    def forward(self, logits, targets):
        margin = self.margins.to(logits.dtype)[targets]
        adjusted = logits - F.one_hot(targets, logits.shape[1]).to(logits.dtype) * margin[:, None]
        per = F.cross_entropy(self.s * adjusted, targets, reduction="none")
        w = self.drw_weight.to(logits.dtype)[targets] if self.reweight else None
        return self.reduce(per, w)


class NormedLinear(nn.Module):
    """Cosine classifier ``normalize(x) @ normalize(W)``, logits in ``[-1, 1]``; the last layer
    of the LDAM-DRW reference (Cao et al. 2019, code). Input ``(B, in)``, output ``(B, out)``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x):
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


def use_normed_classifier(model: nn.Module) -> nn.Module:
    """Replace the last ``nn.Linear`` of ``model`` (in module order) by a :class:`NormedLinear`
    of the same shape, in place; returns ``model``. Call before building the optimiser.

    Raises:
        ConfigError: the model has no ``nn.Linear``.
    """
    last = None
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                last = (parent, name, child)
    if last is None:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer to normalise")
    parent, name, lin = last
    new = NormedLinear(lin.in_features, lin.out_features).to(lin.weight.device, lin.weight.dtype)
    setattr(parent, name, new)
    return model


def log_prior(counts: Sequence[int]) -> torch.Tensor:
    """``(C,)`` float32 ``log(n_c / sum(n))``."""
    n = _counts(counts)
    return (n / n.sum()).log().float()


class LogitAdjustedLoss(LongTailLoss):
    """Logit-adjusted cross-entropy ``CE(logits + tau * log prior, y)`` (Menon et al., ICLR
    2021, Eq. 10); at ``tau = 1`` it is the balanced softmax (Ren et al., NeurIPS 2020).
    Predict with the raw logits (the adjustment only enters training).

    Args:
        counts: training images per class (the prior).
        tau: adjustment strength (paper: 1).
    """

    def __init__(self, counts: Sequence[int], tau: float = 1.0):
        super().__init__()
        self.register_buffer("adjustment", tau * log_prior(counts))

    def forward(self, logits, targets):
        return F.cross_entropy(logits + self.adjustment.to(logits.dtype), targets)


def class_balanced_weights(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """``(N,)`` float64 per-sample weights ``1 / n_{y_i}``: every class equally likely under
    ``torch.utils.data.WeightedRandomSampler(weights, N)``."""
    labels = torch.as_tensor(labels).long().cpu()
    n = torch.bincount(labels, minlength=num_classes or 0).double()
    return 1.0 / n[labels]


def class_balanced_indices(
    labels: torch.Tensor, *, seed: int, epoch: int, num_samples: int | None = None
) -> torch.Tensor:
    """One epoch of class-balanced re-sampling: ``(num_samples,)`` int64 positions into
    ``labels`` drawn with replacement so that every class is equally likely (default
    ``num_samples = len(labels)``).

    Depends only on ``(seed, epoch)``, so every data-parallel worker draws the same pool; batch
    it with :func:`raymeta.data.batches.epoch_batches` over ``range(len(pool))`` and index
    ``pool[idx]``.
    """
    w = class_balanced_weights(labels)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 104_729)
    return torch.multinomial(w, num_samples or len(w), replacement=True, generator=gen)


class LossStep:
    """The step interface for a plain loss: forward, loss, backward, SGD step.

    Attributes:
        loss: the :class:`LongTailLoss`.
        resample: the loop should draw batches from :func:`class_balanced_indices`.
    """

    needs_meta = False

    def __init__(self, loss: LongTailLoss, *, resample: bool = False):
        self.loss, self.resample = loss, resample

    def is_meta_step(self, step: int) -> bool:
        return False

    def start_epoch(self, epoch: int) -> None:
        self.loss.start_epoch(epoch)

    def train_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        lr: float,
        step: int,
        meta_x: torch.Tensor | None = None,
        meta_y: torch.Tensor | None = None,
    ) -> StepOutput:
        """One SGD step at ``lr`` on this worker's batch ``x (B, ...)``, ``y (B,)``."""
        set_lr(optimizer, lr)
        loss = self.loss(model(x), y)
        sgd_step(optimizer, loss)
        return StepOutput(loss.detach())

    def state_dict(self) -> dict:
        """Nothing beyond the epoch counter (LDAM's re-weighting follows :meth:`start_epoch`)."""
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass
