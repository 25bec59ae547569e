"""The registry of long-tailed methods: every method by name, its label, whether it needs a meta
set, and its builder.

A new long-tailed method is one entry of :data:`METHODS`: a builder ``build(context,
**params)`` and the constructors its ``params`` go to (``takes``). The parameters a method
accepts are the keyword parameters (with defaults) of those constructors, read with
:func:`inspect.signature`; :func:`check_params` refuses any other key before anything is built.

**Logit adjustment and Balanced Softmax are one loss.** The logit-adjusted loss of Menon et
al. (ICLR 2021, Eq. 10), ``CE(logits + tau * log prior)``, is at ``tau = 1`` exactly the
Balanced Softmax loss of Ren et al. (NeurIPS 2020, Eq. 4: ``log n_c`` added to the logits; the
constant ``log sum n`` cancels in the softmax). ``logit_adjust`` is
:class:`~raymeta.meta.losses.LogitAdjustedLoss` with its ``tau`` (default 1, Menon et al.'s);
``balanced_softmax`` is the same class with ``tau`` fixed at 1 and no parameter. At the defaults
the two train bit-identical runs; raymeta's tables until the MFM design search called the
``tau = 1`` row "logit adjustment".

**MFM composes with any plain loss** (``mfm_direct``, ``mfm_network``; docs/mfm.md): its
``base_loss`` is the name of a method of :data:`BASE_LOSSES` (with ``base_params``), which the
classifier trains with (and the look-ahead's virtual step steps), and ``meta_objective`` is
the loss of the look-ahead on the balanced meta set. The defaults of every MFM design choice
are in :data:`MFM_DEFAULTS`.
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

# Supplied by the builder, never by the user: the workers' mean, frozen (transfer), and MFM's
# loss modules and re-sampling (built from base_loss and meta_objective).
_CONTEXT = frozenset({"average", "frozen", "loss", "meta_loss", "resample"})


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
        short: the name of a plain loss in an MFM label, ``"MFM (direct) + LA"``.
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
    short: str | None = None  # in "MFM (direct) + LA" (a plain loss used as MFM's base loss)

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


# a preset name, a list of submodule names or None (the default preset)
_NAME_OR_NAMES = frozenset({"sites"})


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


META_OBJECTIVES = ("ce", "logit_adjust")

#: The defaults of every MFM design choice, per variant (docs/mfm.md, "The design space").
#: Chosen by raymeta's design search, ``raymeta run mfm_design_search.yaml`` (Ray Tune + Optuna,
#: 12 TPE trials per variant on Fashion-MNIST-LT IF 100 with class order seed 100, the 3 best of
#: each re-trained on class orders 100, 101, 102, selected on 100 validation images per class
#: carved from the training data; MLflow parent run mfm-search/mfm-design-search, 2026-12-01):
#: each variant's candidate with the best mean final validation accuracy (direct 81.73 %,
#: network 81.50 %; the network's tie with another candidate went to fewer look-aheads), meta
#: LRs rounded to 3 digits. docs/mfm.md, "How the defaults were chosen".
MFM_DEFAULTS: dict[str, dict[str, object]] = {
    "direct": {
        "sites": "last_stage",
        "base_loss": "cb_resample",
        "base_params": None,
        "meta_objective": "logit_adjust",
        "meta_every": 1,
        "meta_lr": 3.64e-3,
    },
    "network": {
        "sites": "stages+embedding",
        "base_loss": "cb_resample",
        "base_params": None,
        "meta_objective": "logit_adjust",
        "meta_every": 4,
        "meta_lr": 1.10e-4,
        "class_statistics": False,
    },
}


def _meta_objective(name: str, counts: Sequence[int]) -> LongTailLoss:
    """The meta objective ``name`` of :data:`META_OBJECTIVES`: ``ce`` (cross-entropy of the
    raw logits on the balanced meta batch) or ``logit_adjust`` (the logit-adjusted loss with
    ``tau = 1`` and the *training* prior).

    Raises:
        ConfigError: an unknown name.
    """
    if name == "ce":
        return CrossEntropyLoss()
    if name == "logit_adjust":
        return LogitAdjustedLoss(counts, tau=1.0)
    raise ConfigError(f"unknown meta_objective {name!r}; accepted: {', '.join(META_OBJECTIVES)}")


def _base_loss(ctx: BuildContext, name: str, params: dict | None) -> LossStep:
    """MFM's base loss: the plain-loss method ``name`` of :data:`BASE_LOSSES` built on the
    model (LDAM-DRW swaps in its normalised classifier), with ``params``.

    Raises:
        ConfigError: not a plain loss, or bad parameters (:func:`check_params`).
    """
    if name not in BASE_LOSSES:
        raise ConfigError(f"unknown base_loss {name!r}; accepted: {', '.join(BASE_LOSSES)}")
    if not isinstance(params, dict | None):
        raise ConfigError(f"base_params={params!r} is invalid; accepted: a mapping of parameters")
    params = dict(params or {})
    try:
        check_params(name, params)
    except ConfigError as exc:
        raise ConfigError(f"base_params: {exc}") from None
    return METHODS[name].build(ctx, **params)


def _mfm(kind: str) -> Callable[..., MFMTrainer]:
    """The builder of ``mfm_{kind}``: the base loss, then a modulation of ``kind`` built and
    attached to the model, or (transfer) the given meta-trained modulation attached and
    frozen, with no meta set. Its keyword parameters and their defaults are
    ``MFM_DEFAULTS[kind]`` (the signature is set from it below, so the registry reads them)."""
    defaults = MFM_DEFAULTS[kind]

    def build(ctx: BuildContext, **params) -> MFMTrainer:
        given = {k: params.pop(k) for k in list(params) if k in defaults}
        design = {**defaults, **given}
        network = _take(params, ModulatorNet) if kind == "network" else {}
        if kind == "network" and ctx.modulation is None:
            network["class_statistics"] = design["class_statistics"]
        if ctx.modulation is not None:
            own = [*network, *(["class_statistics"] if "class_statistics" in given else [])]
            if own:
                raise ConfigError(
                    f"{', '.join(own)}: set by the registered modulator network, not a "
                    "parameter of transfer"
                )
        elif ctx.input_shape is None:
            raise ConfigError(f"method 'mfm_{kind}' needs input_shape=(channels, size, size)")
        objective = _meta_objective(design["meta_objective"], ctx.counts)
        base = _base_loss(ctx, design["base_loss"], design["base_params"])
        trainer_args = {
            "loss": base.loss,
            "meta_loss": objective,
            "resample": base.resample,
            "meta_every": design["meta_every"],
            "meta_lr": design["meta_lr"],
            "average": ctx.average,
            **params,
        }
        if ctx.modulation is not None:
            ref = next(ctx.model.parameters())
            mod = ctx.modulation.to(ref.device, ref.dtype).attach(ctx.model, design["sites"])
            if isinstance(mod, ModulatorNet):
                mod.set_class_counts(ctx.counts, balanced_batches=base.resample)
            return MFMTrainer(mod, frozen=True, **trainer_args)
        mod = build_modulation(kind, ctx.model, ctx.input_shape, sites=design["sites"], **network)
        if isinstance(mod, ModulatorNet):
            mod.set_class_counts(ctx.counts, balanced_batches=base.resample)
        return MFMTrainer(mod, **trainer_args)

    build.__signature__ = inspect.Signature(
        [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_ONLY)]
        + [
            inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
            for k, v in defaults.items()
        ]
    )
    return build


_MFM = {kind: _mfm(kind) for kind in MFM_DEFAULTS}


def _balanced_softmax(ctx: BuildContext) -> LossStep:
    """Balanced Softmax (Ren et al., NeurIPS 2020): the logit-adjusted loss at ``tau = 1``."""
    return _loss(LogitAdjustedLoss, counts=True)(ctx, tau=1.0)


METHODS: dict[str, MethodInfo] = {
    "ce": MethodInfo("CE", False, _loss(CrossEntropyLoss), (CrossEntropyLoss,), "CE"),
    "cb_reweight": MethodInfo(
        "CB re-weighting",
        False,
        _loss(ClassBalancedLoss, counts=True),
        (ClassBalancedLoss,),
        "CB-RW",
    ),
    "cb_resample": MethodInfo(
        "CB re-sampling",
        False,
        _loss(CrossEntropyLoss, resample=True),
        (CrossEntropyLoss,),
        "CB-RS",
    ),
    "focal": MethodInfo("focal", False, _loss(FocalLoss), (FocalLoss,), "focal"),
    "ldam_drw": MethodInfo("LDAM-DRW", False, _ldam_drw, (LDAMLoss,), "LDAM-DRW"),
    "logit_adjust": MethodInfo(
        "logit adjustment",
        False,
        _loss(LogitAdjustedLoss, counts=True),
        (LogitAdjustedLoss,),
        "LA",
    ),
    "balanced_softmax": MethodInfo("Balanced Softmax", False, _balanced_softmax, (), "BS"),
    "mwn": MethodInfo("Meta-Weight-Net", True, _mwn, (WeightNet, MetaWeightNetTrainer)),
    "mfm_direct": MethodInfo(
        "MFM (direct)", True, _MFM["direct"], (_MFM["direct"], build_modulation, MFMTrainer)
    ),
    "mfm_network": MethodInfo(
        "MFM (network)",
        True,
        _MFM["network"],
        (_MFM["network"], build_modulation, ModulatorNet, MFMTrainer),
    ),
}

#: The plain losses MFM can train its classifier with (``base_loss``).
BASE_LOSSES = tuple(name for name, info in METHODS.items() if info.short is not None)


def method_label(name: str, params: dict | None = None) -> str:
    """The display name of method ``name`` with ``params``: the registry's label, and for MFM
    with a base loss other than cross-entropy (given or the default) ``" + "`` and the base
    loss's short name (``"MFM (direct) + BS"``).

    Raises:
        KeyError: an unknown method.
    """
    info = METHODS[name]
    base = (params or {}).get("base_loss", info.defaults.get("base_loss"))
    if base is None or base == "ce" or base not in METHODS:
        return info.label
    return f"{info.label} + {METHODS[base].short}"


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
        names = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        if key in _NAME_OR_NAMES and (names or value is None):
            continue
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
    (:class:`~raymeta.meta.losses.LogitAdjustedLoss`, ``tau``); ``balanced_softmax`` (the same
    loss at ``tau = 1``, no parameter); ``mwn`` (:class:`~raymeta.meta.mwn.WeightNet` and
    :class:`~raymeta.meta.mwn.MetaWeightNetTrainer`); ``mfm_direct`` / ``mfm_network`` (the
    design choices of :data:`MFM_DEFAULTS`: ``sites`` (a preset of
    :data:`~raymeta.models.modulation.SITE_PRESETS` or submodule names), ``base_loss`` (one of
    :data:`BASE_LOSSES`) and ``base_params``, ``meta_objective`` (one of
    :data:`META_OBJECTIVES`), ``meta_every``, ``meta_lr``, for the network
    ``class_statistics``; then :class:`~raymeta.models.modulation.ModulatorNet`'s ``hidden``,
    ``eps``, ``statistics_momentum`` and :class:`~raymeta.meta.mfm.MFMTrainer`'s
    ``lookahead``, ``meta_optimizer``, ``meta_weight_decay``, ``meta_lr_follows_lr``).

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
