"""SIGINT (Ctrl-C) and SIGTERM: stop with one line and exit 128 + signal number, never a traceback.

``fastddpm`` commands run inside :func:`signals_raise`, where both signals raise
:class:`Interrupted` at once; :func:`fastddpm.cli.main` turns that into one line on stderr and
exit code 130 (SIGINT) or 143 (SIGTERM). A loop with state worth saving (training) runs inside
:class:`DeferredInterrupts` instead: the first signal is only recorded, the loop finishes its
step, saves, and raises :class:`Interrupted` itself; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

__all__ = ["Interrupted", "signals_raise", "DeferredInterrupts", "HANDLED_SIGNALS"]

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A second Ctrl-C within this many seconds of the first is the same keypress arriving twice
# (under torchrun every worker gets it from the terminal and again from the agent).
SECOND_SIGNAL_AFTER_S = 1.0


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM. ``detail`` says what was saved (or that nothing was)."""

    def __init__(self, signum: int = signal.SIGINT, detail: str = ""):
        super().__init__(detail)
        self.signum = int(signum)
        self.detail = detail

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def _handlers(handler) -> Iterator[None]:
    """Install ``handler`` for :data:`HANDLED_SIGNALS` (main thread only), restore on exit."""
    if not _in_main_thread():  # signal.signal works only there; elsewhere change nothing
        yield
        return
    previous: Dict[int, object] = {}
    try:
        for signum in HANDLED_SIGNALS:
            previous[signum] = signal.signal(signum, handler)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within this block SIGINT and SIGTERM raise :class:`Interrupted` (SIGTERM would otherwise
    end the process without running any cleanup)."""
    with _handlers(_raise_interrupted):
        yield


class DeferredInterrupts:
    """Context manager: the first SIGINT / SIGTERM only sets :attr:`signum`; the loop polls it at
    a point where its state is consistent, saves and stops. A second SIGINT, a second or more
    after the first, raises :class:`Interrupted` at once. A SIGTERM after the first signal, or a
    SIGINT right after it, is only noted: ``torchrun`` passes a Ctrl-C (or its own SIGTERM) on to
    workers that may have had it from the terminal already, and that must not cut the save short."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._context = None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = int(signum)
            self._first_at = time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self._first_at >= SECOND_SIGNAL_AFTER_S:
            raise Interrupted(self.signum, "a second Ctrl-C: stopped at once, without saving")

    def __enter__(self) -> "DeferredInterrupts":
        self._context = _handlers(self._handle)
        self._context.__enter__()
        return self

    def __exit__(self, *exc_info) -> bool:
        """Restore the previous handlers (a no-op if never entered, or already left)."""
        context, self._context = self._context, None
        return bool(context.__exit__(*exc_info)) if context is not None else False
