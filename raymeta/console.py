"""Progress output on the console: stage banners in the driver, one line per epoch or trial.

Quiet under CI: nothing is printed when ``$CI`` or ``$RAYMETA_QUIET`` is set. Results tables and
error lines are not progress and are always printed.
"""

from __future__ import annotations

import os


def progress_enabled() -> bool:
    """Progress lines are printed unless ``$CI`` or ``$RAYMETA_QUIET`` is set."""
    return not (os.environ.get("CI") or os.environ.get("RAYMETA_QUIET"))


def stage(message: str) -> None:
    """A progress banner for a stage of a command (quiet under CI / ``RAYMETA_QUIET``)."""
    if progress_enabled():
        print(f"\n== {message}", flush=True)
