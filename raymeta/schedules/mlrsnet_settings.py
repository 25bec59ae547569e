"""MLR-SNet's settings that a pipeline file sets, without torch (the config checks them, and
``raymeta run`` refuses a bad file, before torch is imported): the cell's sizes and the
meta-objectives of its meta-training (:mod:`raymeta.schedules.mlrsnet`,
:mod:`raymeta.meta.mlrsnet`)."""

from __future__ import annotations

from raymeta.errors import ConfigError

HIDDEN_SIZE = 50  # the cell's LSTM hidden size H (Shu et al., TPAMI 2022: 50)
MLP_HIDDEN = 25  # hidden width of its two gate MLPs (paper: 25)

META_OBJECTIVES = ("lookahead", "delayed")


def check_meta_objective(meta_objective: str, horizon: int | None) -> None:
    """Raise a one-line :class:`ConfigError` for an unknown ``meta_objective`` or a ``horizon``
    that does not fit it: ``lookahead`` takes none, ``delayed`` an integer >= 1."""
    if meta_objective not in META_OBJECTIVES:
        raise ConfigError(
            f"meta_objective {meta_objective!r} is unknown; accepted: {', '.join(META_OBJECTIVES)}"
        )
    if meta_objective == "lookahead" and horizon is not None:
        raise ConfigError(
            f"horizon={horizon} applies to meta_objective delayed, not to lookahead (one step)"
        )
    if horizon is not None and horizon < 1:
        raise ConfigError(f"horizon={horizon} is invalid; accepted: an integer >= 1 (steps)")
