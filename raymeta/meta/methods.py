"""The registry of long-tailed methods: every method by name, its label, whether it needs a meta
set, and its builder.

A new long-tailed method is one entry of :data:`METHODS`: a builder ``build(context,
**params)`` and the constructors its ``params`` go to (``takes``). The parameters a method
accepts are the keyword parameters (with defaults) of those constructors, read with
:func:`inspect.signature`; :func:`check_params` refuses any other key before anything is built.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from raymeta.errors import ConfigError
from raymeta.meta.base import LookaheadMethod
from raymeta.meta.lookahead import Average, identity_average
from raymeta.meta.losses import (
    ClassBalancedLoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    LongTailLoss,
    LossStep,
    use_normed_classifier,
)
from raymeta.meta.mfm import MFMTrainer
from raymeta.meta.mwn import MetaWeightNetTrainer, WeightNet
from raymeta.models.modulation import Modulation, ModulatorNet, build_modulation

LongTailMethod = LossStep | LookaheadMethod

# Supplied by the builder, never by the user: the workers' mean, and frozen (transfer).
_CONTEXT = frozenset({"average", "frozen"})


@dataclass(frozen=True)
class BuildContext:
    """What a builder gets besides the method's own parameters (see :func:`build_method`)."""

    counts: Sequence[int]
    model: nn.Module
    input_shape: Sequence[int] | None
    epochs: int | None
    average: Average
    modulation: Modulation | None


@dataclass(frozen=True)
class MethodInfo:
    """One long-tailed method.

    Attributes:
        label: the default display name (tables, run names).
        needs_meta_set: the method meta-learns on a balanced meta set (unless a meta-trained
            modulation is given for transfer).
        build: ``build(context: BuildContext, **params) -> LossStep | LookaheadMethod``.
        takes: the constructors ``params`` go to; their keyword parameters with defaults
            (except ``average`` and ``frozen``) are the accepted parameters.
    """

    label: str
    needs_meta_set: bool
    build: Callable[..., LongTailMethod]
    takes: tuple[Callable, ...]

    @property
    def params(self) -> list[str]:
        """The accepted parameter names, sorted."""
        return sorted({name for fn in self.takes for name in _keywords(fn)})

    @property
    def defaults(self) -> dict[str, object]:
        """Accepted parameter name -> its default (the first constructor's that takes it)."""
        out: dict[str, object] = {}
        for fn in self.takes:
            for name, default in _defaults(fn).items():
                out.setdefault(name, default)
        return out


def _defaults(fn: Callable) -> dict[str, object]:
    """``fn``'s parameters that can be passed by keyword and have a default -> the default."""
    return {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is not p.empty
        and p.name not in _CONTEXT
    }


def _keywords(fn: Callable) -> list[str]:
    """Names of ``fn``'s parameters that can be passed by keyword and have a default."""
    return list(_defaults(fn))


def _same_kind(value: object, default: object) -> bool:
    """Whether ``value`` may replace ``default``: numbers for numbers (not booleans), booleans
    for booleans, strings for strings, sequences for sequences; anything where the default is
    None or of another type."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int | float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, tuple | list):
        return isinstance(value, tuple | list)
    return True


def _take(params: dict, fn: Callable) -> dict:
    """Remove from ``params`` and return the entries that are keyword parameters of ``fn``."""
    return {k: params.pop(k) for k in _keywords(fn) if k in params}


def _loss(cls: type[LongTailLoss], *, counts: bool = False, resample: bool = False):
    """The builder of a plain loss ``cls`` (given the class counts first when ``counts``),
    stepped by a :class:`LossStep` (on class-balanced batches when ``resample``)."""

    def build(ctx: BuildContext, **params) -> LossStep:
        loss = cls(ctx.counts, **params) if counts else cls(**params)
        loss.average = ctx.average
        return LossStep(loss, resample=resample)

    return build


def _ldam_drw(ctx: BuildContext, **params) -> LossStep:
    """LDAM-DRW: the model's last linear layer becomes a
    :class:`~raymeta.meta.losses.NormedLinear` (in place); ``drw_epoch`` defaults to
    ``int(0.8 * epochs)`` when ``epochs`` is known (the paper's 160 of 200)."""
    if ctx.epochs is not None:
        params.setdefault("drw_epoch", int(0.8 * ctx.epochs))
    use_normed_classifier(ctx.model)
    return _loss(LDAMLoss, counts=True)(ctx, **params)


def _mwn(ctx: BuildContext, **params) -> MetaWeightNetTrainer:
    ref = next(ctx.model.parameters())
    wnet = WeightNet(**_take(params, WeightNet)).to(ref.device, ref.dtype)
    return MetaWeightNetTrainer(wnet, average=ctx.average, **params)


def _mfm(kind: str) -> Callable[..., MFMTrainer]:
    """The builder of ``mfm_{kind}``: a modulation of ``kind`` built and attached to the model,
    or (transfer) the given meta-trained modulation attached and frozen, with no meta set."""

    def build(ctx: BuildContext, **params) -> MFMTrainer:
        sites = params.pop("sites", None)
        network = _take(params, ModulatorNet) if kind == "network" else {}
        if ctx.modulation is not None:
            if network:
                raise ConfigError(
                    f"{', '.join(network)}: set by the registered modulator network, not a "
                    "parameter of transfer"
                )
            ref = next(ctx.model.parameters())
            ctx.modulation.to(ref.device, ref.dtype).attach(ctx.model, sites)
            return MFMTrainer(ctx.modulation, frozen=True, average=ctx.average, **params)
        if ctx.input_shape is None:
            raise ConfigError(f"method 'mfm_{kind}' needs input_shape=(channels, size, size)")
        if kind == "network":  # ours: 1e-3 degraded a 2-epoch Fashion-MNIST-LT pilot
            params.setdefault("meta_lr", 1e-4)
        mod = build_modulation(kind, ctx.model, ctx.input_shape, sites=sites, **network)
        return MFMTrainer(mod, average=ctx.average, **params)

    return build


METHODS: dict[str, MethodInfo] = {
    "ce": MethodInfo("CE", False, _loss(CrossEntropyLoss), (CrossEntropyLoss,)),
    "cb_reweight": MethodInfo(
        "CB re-weighting", False, _loss(ClassBalancedLoss, counts=True), (ClassBalancedLoss,)
    ),
    "cb_resample": MethodInfo(
        "CB re-sampling", False, _loss(CrossEntropyLoss, resample=True), (CrossEntropyLoss,)
    ),
    "focal": MethodInfo("focal", False, _loss(FocalLoss), (FocalLoss,)),
    "ldam_drw": MethodInfo("LDAM-DRW", False, _ldam_drw, (LDAMLoss,)),
    "logit_adjust": MethodInfo(
        "logit adjustment", False, _loss(LogitAdjustedLoss, counts=True), (LogitAdjustedLoss,)
    ),
    "mwn": MethodInfo("Meta-Weight-Net", True, _mwn, (WeightNet, MetaWeightNetTrainer)),
    "mfm_direct": MethodInfo("MFM (direct)", True, _mfm("direct"), (build_modulation, MFMTrainer)),
    "mfm_network": MethodInfo(
        "MFM (network)", True, _mfm("network"), (build_modulation, ModulatorNet, MFMTrainer)
    ),
}


def check_params(name: str, params: dict) -> None:
    """Check a method's name and parameter keys against :data:`METHODS`, before building.

    Raises:
        ConfigError: (one line) an unknown method, keys that are not parameters of the
            method (naming them and the accepted ones), or a value whose type does not match
            the parameter's default (a string for a number, a number for a boolean).
    """
    info = METHODS.get(name)
    if info is None:
        raise ConfigError(f"unknown long-tail method {name!r}; accepted: {', '.join(METHODS)}")
    bad = [key for key in params if key not in info.params]
    if bad:
        accepted = ", ".join(info.params) or "none"
        raise ConfigError(
            f"method {name!r} has no parameter {', '.join(map(repr, bad))}; accepted: {accepted}"
        )
    defaults = info.defaults
    for key, value in params.items():
        if not _same_kind(value, defaults[key]):
            raise ConfigError(
                f"method {name!r} parameter {key}={value!r} has the wrong type; accepted: a "
                f"{type(defaults[key]).__name__} like the default {defaults[key]!r}"
            )


def build_method(
    name: str,
    class_counts: Sequence[int],
    model: nn.Module,
    *,
    input_shape: Sequence[int] | None = None,
    epochs: int | None = None,
    average: Average = identity_average,
    modulation: Modulation | None = None,
    **params,
) -> LongTailMethod:
    """Build the long-tailed method ``name`` of :data:`METHODS` on ``model``.

    Names and their ``params`` (the keyword parameters of the classes named): ``ce``,
    ``cb_resample`` (:class:`~raymeta.meta.losses.CrossEntropyLoss`, the latter on
    class-balanced batches); ``cb_reweight`` (:class:`~raymeta.meta.losses.ClassBalancedLoss`);
    ``focal`` (:class:`~raymeta.meta.losses.FocalLoss`); ``ldam_drw``
    (:class:`~raymeta.meta.losses.LDAMLoss`; replaces the model's last linear layer by a
    :class:`~raymeta.meta.losses.NormedLinear` in place, ``drw_epoch`` defaults to
    ``int(0.8 * epochs)`` when ``epochs`` is given); ``logit_adjust``
    (:class:`~raymeta.meta.losses.LogitAdjustedLoss`); ``mwn``
    (:class:`~raymeta.meta.mwn.WeightNet` and :class:`~raymeta.meta.mwn.MetaWeightNetTrainer`);
    ``mfm_direct`` / ``mfm_network`` (:func:`~raymeta.models.modulation.build_modulation`,
    :class:`~raymeta.models.modulation.ModulatorNet` for the network, and
    :class:`~raymeta.meta.mfm.MFMTrainer`; ``meta_lr`` defaults to 1e-4 for ``mfm_network``,
    whose shared network moves every channel at once: at 1e-3 it lowered the top-1 accuracy of
    a 2-epoch Fashion-MNIST-LT IF 100 pilot from 73% to 60-62%).

    Args:
        class_counts: training images per class, class-index order.
        model: the classifier, not yet DDP-wrapped; build the method before its optimiser
            (``ldam_drw`` changes the model, ``mfm_*`` attach hooks).
        input_shape: ``(C, S, S)`` of one input; required by ``mfm_*`` (without
            ``modulation``).
        epochs: the run's length in epochs (``ldam_drw``'s default ``drw_epoch``).
        average: mean of a tensor across data-parallel workers (identity for one).
        modulation: a meta-trained :class:`~raymeta.models.modulation.Modulation` (e.g. a
            registered modulator network): an ``mfm_*`` method attaches it to ``model`` (at
            ``sites``, default the model's default sites) and trains the classifier with it
            frozen, with no meta set (transfer).

    Returns:
        A :class:`~raymeta.meta.losses.LossStep` or a
        :class:`~raymeta.meta.base.LookaheadMethod`.

    Raises:
        ConfigError: an unknown name or parameter key (:func:`check_params`), or a bad value
            that a constructor checks. Other errors raised inside a constructor (e.g. a
            ``TypeError`` from a value of the wrong type) propagate unchanged.
    """
    check_params(name, params)
    context = BuildContext(class_counts, model, input_shape, epochs, average, modulation)
    return METHODS[name].build(context, **params)
