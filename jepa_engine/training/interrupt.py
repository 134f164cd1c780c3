"""Ctrl-C in a training loop: the first SIGINT asks the loop to stop after its step (and checkpoint),
a second one stops at once."""
from __future__ import annotations

import signal
import threading


class DeferredInterrupt:
    """``with DeferredInterrupt() as stop:`` a training loop's Ctrl-C: the first SIGINT only sets
    ``stop.requested`` (the loop finishes its step, writes a checkpoint and raises KeyboardInterrupt),
    a second one raises at once. Installed in the main thread only (no SIGINT arrives elsewhere); the
    previous handler is back on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._installed = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:            # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "DeferredInterrupt":
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
        return False
