"""Define-by-run search spaces (Optuna) for every hand-designed family.

Each family has its own conditional hyper-parameters; ranges have defaults that users override
per family and per parameter in the pipeline YAML (``search.ranges``)::

    search:
      ranges:
        multistep: {lr: [0.01, 0.5]}
        cosine: {final_lr_fraction: [0.0, 0.05]}

A range is ``[low, high]``; parameters in :data:`LOG_SCALE` are sampled log-uniformly.
``search.momentum`` (default ``[0.0, 0.9]``) adds the SGD momentum to every SGD family as a
categorical choice (:func:`resolve_choices`); ``search_weight_decay`` adds a log-uniform weight
decay. The sampled values are returned as a flat dict (``lr``, family parameters,
``momentum``, ``weight_decay``, ``betas``) that :func:`to_method` turns into a run.

The online schedule learners (:mod:`raymeta.tune.online`) have ranges too
(:data:`ONLINE_RANGES`, overridden under ``search.ranges.pbt`` / ``search.ranges.pb2``).
"""

from __future__ import annotations

from typing import Any

from raymeta.errors import ConfigError

#: family -> parameter -> default [low, high]; ``milestones`` is sampled as two fractions.
DEFAULT_RANGES: dict[str, dict[str, list[float]]] = {
    "fixed": {"lr": [1e-3, 1.0]},
    "multistep": {
        "lr": [1e-3, 1.0],
        "decay": [0.05, 0.5],
        "first_milestone": [0.3, 0.7],
        "second_milestone": [0.7, 0.95],
    },
    "exponential": {"lr": [1e-3, 1.0], "decay": [0.5, 0.99]},
    "cosine": {"lr": [1e-3, 1.0], "final_lr_fraction": [0.0, 0.1]},
    "sgdr": {"lr": [1e-3, 1.0], "first_cycle_epochs": [0.25, 2.0], "cycle_mult": [1, 2]},
    "onecycle": {"lr": [1e-3, 1.0], "warmup_fraction": [0.1, 0.5]},
    "warmup_cosine": {
        "lr": [1e-3, 1.0],
        "warmup_fraction": [0.01, 0.2],
        "final_lr_fraction": [0.0, 0.1],
    },
    "adam": {"lr": [1e-4, 1e-1], "beta1": [0.8, 0.95], "beta2": [0.99, 0.9999]},
    "hd": {"lr": [1e-3, 1.0], "hypergradient_lr": [1e-5, 1e-2]},
}
LOG_SCALE = {"lr", "hypergradient_lr", "weight_decay"}
INTEGER = {"cycle_mult"}
WEIGHT_DECAY = [1e-5, 1e-2]  # search_weight_decay: log-uniform, every SGD family
FAMILIES = tuple(DEFAULT_RANGES)
#: online schedule learner -> parameter -> default [low, high]: the LR that PBT and PB2 mutate
#: (log scale, the fixed family's range) and PB2's momentum interval (PB2 models continuous
#: hyper-parameters only; PBT shifts along the ``search.momentum`` choices instead).
ONLINE_RANGES: dict[str, dict[str, list[float]]] = {
    "pbt": {"lr": DEFAULT_RANGES["fixed"]["lr"]},
    "pb2": {"lr": DEFAULT_RANGES["fixed"]["lr"], "momentum": [0.0, 0.95]},
}


def resolve_ranges(
    family: str, overrides: dict[str, list[float]] | None, *, weight_decay: bool
) -> dict[str, list[float]]:
    """The ranges to search for ``family``: defaults, updated by ``overrides``.

    Raises:
        ConfigError: unknown family or parameter, or an empty or inverted range.
    """
    if family not in DEFAULT_RANGES:
        raise ConfigError(f"unknown search family {family!r}; accepted: {', '.join(FAMILIES)}")
    ranges = dict(DEFAULT_RANGES[family])
    if family != "adam" and weight_decay:
        ranges["weight_decay"] = WEIGHT_DECAY
    return _checked(family, ranges, overrides)


def resolve_online_ranges(
    method: str, overrides: dict[str, list[float]] | None, *, momentum: bool
) -> dict[str, list[float]]:
    """The ranges of the online schedule learner ``method`` (``pbt`` or ``pb2``):
    :data:`ONLINE_RANGES`, without PB2's momentum interval when ``momentum`` is not searched,
    updated by ``overrides``.

    Raises:
        ConfigError: unknown parameter, or an empty or inverted range.
    """
    ranges = dict(ONLINE_RANGES[method])
    if not momentum:
        ranges.pop("momentum", None)
    ranges = _checked(method, ranges, overrides)
    if "momentum" in ranges and not 0 <= ranges["momentum"][0] < ranges["momentum"][1] < 1:
        raise ConfigError(
            f"search.ranges.{method}.momentum: needs 0 <= low < high < 1, got {ranges['momentum']}"
        )
    return ranges


def resolve_choices(family: str, momentum: list[float] | None) -> dict[str, list[float]]:
    """The categorical hyper-parameters of ``family``: the SGD momentum values ``momentum``
    (``search.momentum``) for every family but Adam, none when ``momentum`` is None."""
    return {"momentum": list(momentum)} if momentum is not None and family != "adam" else {}


def _checked(
    name: str, ranges: dict[str, list[float]], overrides: dict[str, list[float]] | None
) -> dict[str, list[float]]:
    """``ranges`` updated by ``overrides``, every range checked (one-line errors)."""
    ranges = dict(ranges)
    for param, bounds in (overrides or {}).items():
        if param not in ranges:
            hint = (
                " (the momentum values searched are search.momentum)" if param == "momentum" else ""
            )
            raise ConfigError(
                f"search.ranges.{name}.{param}: unknown parameter; accepted: "
                f"{', '.join(ranges)}{hint}"
            )
        ranges[param] = bounds
    for param, bounds in ranges.items():
        where = f"search.ranges.{name}.{param}"
        if not (isinstance(bounds, list | tuple) and len(bounds) == 2):
            raise ConfigError(f"{where}: expected [low, high], got {bounds!r}")
        low, high = bounds
        if not low < high:
            raise ConfigError(f"{where}: empty or inverted range [{low}, {high}] (need low < high)")
        if param in LOG_SCALE and low <= 0:
            raise ConfigError(f"{where}: log-scale range needs low > 0, got {low}")
    return ranges


class DefineByRun:
    """An Optuna define-by-run space for ``OptunaSearch`` (picklable, so Tune can save the
    searcher for ``--resume``): samples ``family``'s hyper-parameters in ``ranges`` and
    ``choices`` (categorical) and returns ``constants`` (passed to the trainable)."""

    def __init__(
        self,
        family: str,
        ranges: dict[str, list[float]],
        constants: dict[str, Any],
        choices: dict[str, list[float]] | None = None,
    ):
        self.family, self.ranges, self.constants = family, ranges, constants
        self.choices = choices or {}

    def __call__(self, trial) -> dict[str, Any]:
        for name, (low, high) in self.ranges.items():
            if name in INTEGER:
                trial.suggest_int(name, int(low), int(high))
            else:
                trial.suggest_float(name, float(low), float(high), log=name in LOG_SCALE)
        for name, values in self.choices.items():
            trial.suggest_categorical(name, values)
        return self.constants


def to_method(family: str, sampled: dict[str, Any]) -> dict[str, Any]:
    """Sampled values -> a method dict (``schedule``, ``lr``, ``params``, ``optimizer``
    overrides) as :class:`raymeta.config.MethodConfig` accepts it."""
    params = {k: v for k, v in sampled.items() if k in DEFAULT_RANGES[family] and k != "lr"}
    method: dict[str, Any] = {"name": family, "schedule": family, "lr": float(sampled["lr"])}
    optimizer: dict[str, Any] = {}
    if family == "multistep":
        params = {
            "decay": params["decay"],
            "milestones": [params["first_milestone"], params["second_milestone"]],
        }
    elif family == "adam":
        method["schedule"] = "fixed"
        optimizer = {"optimizer": "adam", "betas": [params.pop("beta1"), params.pop("beta2")]}
    elif family == "hd":
        method["schedule"] = "fixed"
        optimizer = {"optimizer": "sgd_hd", "hypergradient_lr": params.pop("hypergradient_lr")}
    for extra in ("momentum", "weight_decay"):
        if extra in sampled:
            optimizer[extra] = float(sampled[extra])
    method["params"] = params
    if optimizer:
        method["optimizer"] = optimizer
    return method
