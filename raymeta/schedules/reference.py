"""Import the MLR-SNet meta-learners released with the reference implementation.

The released files (``mlr_snet_{1,100,200}.pth``: epochs 1, 100, 200 of meta-training ResNet-18
on CIFAR-10) are plain state dicts with keys ``layer1.fc_i2h.{0,2}.*``, ``layer1.fc_h2h.{0,2}.*``
and ``layer3.*``. They ship with raymeta as package data (``reference_checkpoints/``, MIT
licence, origin and checksums in its ``NOTICE``). Two gate layouts exist in the reference code
(docs/design.md section 3):

- ``meta-test`` (the released files): gate blocks input, forget, candidate, output; no offset.
- ``meta-train``: gate blocks input, forget, output, candidate; the forget gate is
  ``sigmoid(pre - 1)``.

:func:`to_canonical` permutes the gate blocks of the two MLP output layers into raymeta's
canonical order (input, forget, candidate, output) and folds any forget offset into the bias.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import torch

from raymeta.errors import ConfigError, DataNotFoundError
from raymeta.schedules.mlrsnet import MLRSNetBundle

CANONICAL = ("input", "forget", "candidate", "output")
LAYOUTS = {
    "meta-test": {"order": ("input", "forget", "candidate", "output"), "forget_offset": 0.0},
    "meta-train": {"order": ("input", "forget", "output", "candidate"), "forget_offset": -1.0},
}
REFERENCE_DIR: Traversable = files("raymeta.schedules") / "reference_checkpoints"
REFERENCE_EPOCHS = (1, 100, 200)


def _canonical_keys() -> list[str]:
    from raymeta.schedules.mlrsnet import MLRSNet

    return list(MLRSNet().state_dict())


def _reference_name(key: str) -> str:
    """A canonical key under its name in the reference code."""
    for ours, theirs in (
        ("fc_i2h.", "layer1.fc_i2h."),
        ("fc_h2h.", "layer1.fc_h2h."),
        ("head.", "layer3."),
    ):
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return key


def to_canonical(
    state_dict: dict[str, torch.Tensor], layout: str = "meta-test"
) -> dict[str, torch.Tensor]:
    """Map a reference state dict into a canonical :class:`~raymeta.schedules.MLRSNet` state dict.

    Raises:
        ConfigError: unknown layout, or keys/shapes that are not a reference MLR-SNet.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown MLR-SNet layout {layout!r}; accepted: {', '.join(LAYOUTS)}")
    spec = LAYOUTS[layout]
    rename = {"layer1.fc_i2h.": "fc_i2h.", "layer1.fc_h2h.": "fc_h2h.", "layer3.": "head."}
    out = {}
    for key, value in state_dict.items():
        prefix = next((p for p in rename if key.startswith(p)), None)
        if prefix is None:
            raise ConfigError(f"unexpected key {key!r} in an MLR-SNet reference state dict")
        out[rename[prefix] + key[len(prefix) :]] = value.detach().clone().float()
    missing = sorted(set(_canonical_keys()) - set(out))
    if missing:
        raise ConfigError(
            f"the MLR-SNet reference state dict lacks {len(missing)} key(s), e.g. "
            f"{_reference_name(missing[0])!r}; accepted: layer1.fc_i2h.*, layer1.fc_h2h.*, layer3.*"
        )
    hidden = out["head.weight"].shape[1]
    perm = torch.cat(
        [torch.arange(hidden) + hidden * spec["order"].index(gate) for gate in CANONICAL]
    )
    for key in ("fc_i2h.2.weight", "fc_i2h.2.bias", "fc_h2h.2.weight", "fc_h2h.2.bias"):
        if out[key].shape[0] != 4 * hidden:
            raise ConfigError(f"{key} has {out[key].shape[0]} rows, expected 4*{hidden}")
        out[key] = out[key][perm]
    forget = slice(hidden, 2 * hidden)  # canonical position of the forget block
    out["fc_i2h.2.bias"][forget] += spec["forget_offset"]
    return out


def load_reference(
    directory: str | Path | Traversable | None = None, layout: str = "meta-test"
) -> MLRSNetBundle:
    """Load ``mlr_snet_{1,100,200}.pth`` into one three-checkpoint bundle.

    Args:
        directory: folder holding the three files; None reads the copies shipped with raymeta
            (:data:`REFERENCE_DIR`).
        layout: ``meta-test`` (the released files) or ``meta-train`` (see :data:`LAYOUTS`).

    Raises:
        DataNotFoundError: a file is missing (the message names it).
        ConfigError: unknown layout, or a file that is not a reference MLR-SNet state dict
            (unreadable, not a dict of tensors, missing keys, wrong shapes; one line naming it).
    """
    directory = REFERENCE_DIR if directory is None else directory
    if isinstance(directory, str):
        directory = Path(directory)
    cells = []
    for epoch in REFERENCE_EPOCHS:
        path = directory / f"mlr_snet_{epoch}.pth"
        if not path.is_file():
            raise DataNotFoundError(f"reference meta-learner {path} not found")
        try:
            with path.open("rb") as f:
                raw = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # random bytes, a truncated file, a pickle of other objects
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ConfigError(
                f"{path} is not a PyTorch state dict that loads with weights_only=True ({reason})"
            ) from None
        if not (isinstance(raw, dict) and all(isinstance(v, torch.Tensor) for v in raw.values())):
            raise ConfigError(
                f"{path} holds a {type(raw).__name__}, not a state dict (a dict of tensors)"
            )
        try:
            cells.append(to_canonical(raw, layout))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    hidden, mlp_hidden = cells[0]["head.weight"].shape[1], cells[0]["fc_i2h.0.weight"].shape[0]
    try:
        return MLRSNetBundle(
            cells,
            list(REFERENCE_EPOCHS),
            hidden,
            mlp_hidden,
            source=f"reference release (ResNet-18 / CIFAR-10, {layout} layout) from {directory}",
        )
    except RuntimeError as exc:  # load_state_dict: shapes that do not make one cell
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(
            f"the checkpoints in {directory} do not fit one MLR-SNet ({reason})"
        ) from None
