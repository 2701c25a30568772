"""SIGTERM (a TPU preemption) and Ctrl-C as a stop request that the trainer honours at a step boundary.

The handlers must exist from the first moment of a run: a VM can be preempted while JAX initialises or the
weights load, and the default SIGTERM action would end the process by the signal (a non-zero exit that a
scheduler reads as a crash). ``realjax train`` enters ``STOP`` before it imports JAX; the trainer enters
it again (nesting is free) so that in-process runs are covered too, and checks ``STOP.requested``.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """A context that turns SIGTERM and SIGINT into ``requested = True``; a second Ctrl-C stops at once.

    Re-entrant: only the outermost ``with`` installs and restores the handlers and clears the request.
    Signals can only be handled on the main thread; elsewhere the context does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._depth = 0
        self._saved: dict = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = True

    def __enter__(self) -> StopRequest:
        if self._depth == 0 and threading.current_thread() is threading.main_thread():
            self.requested = False
            self._saved = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            for s, handler in self._saved.items():
                signal.signal(s, handler)
            self._saved = {}
            self.requested = False


STOP = StopRequest()
