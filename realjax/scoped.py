"""``scoped``: a context variable set for the duration of a ``with`` block (trace-time settings)."""

from __future__ import annotations

import contextlib
import contextvars


@contextlib.contextmanager
def scoped(var: contextvars.ContextVar, value):
    """Within this block ``var`` holds ``value``; its previous value is restored on exit."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)
