"""A verifier worker process: grades ``(idx, pred, golds)`` items with math-verify, one message each.

Started by ``pool.py`` as ``python -c "...; main([IN_FD, OUT_FD, INNER_TIMEOUT_S])"``, a fresh
interpreter that imports only realjax's light rewards package and then sympy. It reads pickled chunks
``[(idx, pred, golds), ...]`` from ``IN_FD`` and writes ``(idx, score, status)`` to ``OUT_FD`` after
each item, so the parent's deadline can be per item. ``None`` or end-of-file on ``IN_FD`` (the parent
is gone) ends it. Items run in this process's main thread, where math-verify's ``signal.alarm``
timeouts work.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from multiprocessing.connection import Connection

from realjax.rewards.equivalence import verify_equivalent


def grade(pred: str, golds: tuple[str, ...], inner_timeout_s: int) -> tuple[float, str]:
    """(score, status) of one item; status is "ok", "timeout" (math-verify's alarm fired: it swallows
    the timeout and answers False, so a 0 that took the whole alarm is counted as one) or "error"."""
    start = time.monotonic()
    try:
        ok = verify_equivalent(pred, golds, timeout_s=inner_timeout_s)
    except Exception:  # a grader bug on one hostile string must not cost the worker
        return 0.0, "error"
    if not ok and time.monotonic() - start >= inner_timeout_s:
        return 0.0, "timeout"
    return float(ok), "ok"


def serve(inbox: Connection, outbox: Connection, inner_timeout_s: int) -> None:
    """The worker loop (module docstring)."""
    grade("1", ("1",), inner_timeout_s)  # warm sympy and the LaTeX grammar before declaring "ready"
    outbox.send("ready")
    while True:
        try:
            chunk = inbox.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for idx, pred, golds in chunk:
            outbox.send((idx, *grade(pred, golds, inner_timeout_s)))


def main(argv: list) -> None:
    """Entry point: ``argv`` is ``[in_fd, out_fd, inner_timeout_s]`` (ints or strings)."""
    in_fd, out_fd, inner_timeout_s = (int(a) for a in argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its timeout warnings become our status
    serve(Connection(in_fd, writable=False), Connection(out_fd, readable=False), inner_timeout_s)


if __name__ == "__main__":
    main(sys.argv[1:])
