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
        ConfigError: unknown layout, or a file that is not a reference MLR-SNet state dict.
    """
    directory = REFERENCE_DIR if directory is None else directory
    if isinstance(directory, str):
        directory = Path(directory)
    cells = []
    for epoch in REFERENCE_EPOCHS:
        path = directory / f"mlr_snet_{epoch}.pth"
        if not path.is_file():
            raise DataNotFoundError(f"reference meta-learner {path} not found")
        with path.open("rb") as f:
            raw = torch.load(f, map_location="cpu", weights_only=True)
        cells.append(to_canonical(raw, layout))
    hidden, mlp_hidden = cells[0]["head.weight"].shape[1], cells[0]["fc_i2h.0.weight"].shape[0]
    return MLRSNetBundle(
        cells,
        list(REFERENCE_EPOCHS),
        hidden,
        mlp_hidden,
        source=f"reference release (ResNet-18 / CIFAR-10, {layout} layout) from {directory}",
    )
