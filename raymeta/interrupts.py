"""Ctrl+C and SIGTERM: one outcome for every command.

The first SIGINT (Ctrl+C) or SIGTERM stops the whole command with ``KeyboardInterrupt``
(:class:`Interrupted` once it leaves a pipeline); the command line prints
``raymeta: interrupted; resume with --resume`` when the output folder holds saved work that
``--resume`` continues, else ``raymeta: interrupted; nothing saved to resume; ...``, and exits
with 130 (:func:`raymeta.cli.run_command`), the session marks its MLflow runs KILLED and shuts down the Ray it
started (:mod:`raymeta.session`), and a stage that did not finish is never recorded as done.

Left alone, three behaviours of the libraries (Ray 2.60) make the outcome depend on when the
signal comes:

- ``ray.init`` replaces the SIGTERM handler with ``sys.exit(15)``;
- ``tune.run`` (behind ``Tuner.fit``) installs a SIGINT handler that ends the experiment
  gracefully (the state is saved once more, unfinished trials stay unfinished) and makes
  ``fit`` *return*; the handler only sets an event Tune's loop reads (it does not chain to
  the previous handler), so a signal that lands as the last trial ends leaves no trace in what
  ``fit`` returns, and the handler stays installed after ``fit`` returns, so the next Ctrl+C
  is swallowed (``TUNE_DISABLE_SIGINT_HANDLER=1`` would disable it; the interrupt then lands
  in the middle of Tune's loop instead);
- Ray Train V2's ``TorchTrainer.fit``, in the main thread only, installs a SIGINT handler that
  aborts the run and ends the process with ``sys.exit(0)``, and leaves it installed too.

Hence: :func:`sigterm_as_sigint` makes SIGTERM do whatever SIGINT does at that moment;
:func:`fit_tuner` keeps Tune's graceful stop, puts the previous handlers back afterwards and
raises ``KeyboardInterrupt`` when a SIGINT or SIGTERM arrived during ``fit`` (recorded whichever
handler took it) or the experiment ended with unfinished trials;
:func:`call_off_main_thread` runs Train's ``fit`` in a helper thread, where Train installs no
handler, while the main thread waits interruptibly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


class Interrupted(KeyboardInterrupt):
    """Ctrl+C or SIGTERM stopped a pipeline (:func:`raymeta.pipeline.run_pipeline`).

    Attributes:
        resumable: its output folder holds saved work that ``--resume`` continues
            (:func:`raymeta.session.can_resume`).
    """

    def __init__(self, resumable: bool):
        super().__init__()
        self.resumable = resumable


def _sigterm(signum, frame) -> None:
    """SIGTERM does what SIGINT would do now (Tune's graceful stop during a search, else
    ``KeyboardInterrupt``)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not _sigterm:
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_sigint() -> Iterator[None]:
    """Within the block, SIGTERM is handled as SIGINT (main thread only; elsewhere a no-op).
    Install it after ``ray.init``, which replaces the SIGTERM handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _own_sigint_back() -> Iterator[None]:
    """Restore the SIGINT (and SIGUSR1) handlers a library call replaced and left behind."""
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)} if main else {}
    env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "0"  # Tune's graceful stop, whatever the env
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _stop_signals_received() -> Iterator[set[int]]:
    """Record the SIGINT and SIGTERM the process receives within the block, whichever Python
    handler takes them: the interpreter writes the number of every signal it catches to the
    wakeup fd (:func:`signal.set_wakeup_fd`, here a non-blocking pipe) before any handler runs,
    so a handler that swallows the signal (Tune's) cannot hide it.

    Yields a set of signal numbers, filled when the block ends (also when it raises). In a
    thread other than the main one the set stays empty (only the main thread can set the
    wakeup fd; Tune installs no handler there, and SIGINT raises ``KeyboardInterrupt`` in the
    main thread as usual). The previous wakeup fd is put back."""
    received: set[int] = set()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end)
    try:
        yield received
    finally:
        signal.set_wakeup_fd(previous)
        seen = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_end, 512):
                seen += chunk
        os.close(read_end)
        os.close(write_end)
        received.update(s for s in (signal.SIGINT, signal.SIGTERM) if s in seen)


def fit_tuner(tuner, total: int):
    """``tuner.fit()`` with a deterministic outcome under Ctrl+C / SIGTERM (module docstring).

    Args:
        tuner: a ``ray.tune.Tuner`` (new or restored).
        total: the trials the experiment must finish (its samples or grid points).

    Returns:
        The ``ResultGrid`` of a finished experiment (every trial terminated or errored).

    Raises:
        KeyboardInterrupt: the experiment was interrupted: a SIGINT or SIGTERM arrived while
            ``fit`` ran, even one that landed as the last trial ended, or fewer than ``total``
            trials ended (its state is saved; ``--resume`` restores it).
    """
    # Handlers back first, then the record read: a signal between the two raises here.
    with _stop_signals_received() as received, _own_sigint_back():
        grid = tuner.fit()
    if received or grid.num_terminated + grid.num_errors < total:
        raise KeyboardInterrupt
    return grid


def call_off_main_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a helper thread; the calling thread waits and stays
    interruptible (Ctrl+C raises ``KeyboardInterrupt`` here; the helper thread is a daemon and
    ends with the Ray session). Returns what ``fn`` returns and raises what it raises."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller as is
            box["error"] = exc

    thread = threading.Thread(target=target, name="raymeta-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["value"]
