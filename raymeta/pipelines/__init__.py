"""The pipelines shipped with raymeta, as package data: ``raymeta run quickstart.yaml`` works
from any folder, in an editable or a regular install."""

from __future__ import annotations

from pathlib import Path

from raymeta.errors import ConfigError

PIPELINES_DIR = Path(__file__).resolve().parent


def packaged_pipelines() -> list[str]:
    """File names of the shipped pipelines, sorted (e.g. ``quickstart.yaml``)."""
    return sorted(p.name for p in PIPELINES_DIR.glob("*.yaml"))


def shipped_pipeline(name: str | Path) -> Path | None:
    """The shipped pipeline called ``name`` (a bare file name, e.g. ``quickstart.yaml``), or
    None if raymeta ships none of that name."""
    path = PIPELINES_DIR / Path(name).name
    return path if Path(name).name == str(name) and path.is_file() else None


def find_pipeline(name: str | Path) -> Path:
    """``name`` itself if it is an existing file, else the shipped pipeline of that name.

    Raises:
        ConfigError: neither (one line listing the shipped pipelines).
    """
    if Path(name).is_file():
        return Path(name)
    shipped = shipped_pipeline(name)
    if shipped is not None:
        return shipped
    raise ConfigError(
        f"pipeline file {name} not found, and raymeta ships no pipeline of that name; "
        f"shipped: {', '.join(packaged_pipelines())}"
    )
