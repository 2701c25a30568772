"""Timing helpers shared by the benchmarks (``realjax.tools.bench``): interleaved
rounds so that load changes hit every contender alike, medians, compile time apart from call time."""

from __future__ import annotations

import time

import numpy as np


def timed(fn, repeats: int) -> tuple[float, float]:
    """(seconds of one warm-up call, median seconds of ``repeats`` more); ``fn`` must block until done."""
    warm, rounds = interleaved({"fn": lambda: {"s": seconds(fn)}}, repeats)
    return warm["fn"]["s"], median(rounds["fn"], "s")


def interleaved(calls: dict, repeats: int) -> tuple[dict, dict]:
    """One warm-up call of each contender, then ``repeats`` rounds that call each in turn, so a change in
    the machine's load during the run hits all of them alike (ratios are then taken round by round).

    Each call returns a dict of its own measurements. Returns ``(warm, rounds)``: by name, the warm-up
    call's dict with its wall time under ``"s"``, and the list of the timed rounds' dicts.
    """
    warm, rounds = {}, {name: [] for name in calls}
    for name, call in calls.items():
        t0 = time.perf_counter()
        out = call()
        warm[name] = {**out, "s": time.perf_counter() - t0}
    for _ in range(max(repeats, 1)):
        for name, call in calls.items():
            rounds[name].append(call())
    return warm, rounds


def median(rows: list[dict], key) -> float:
    """The median over rounds of ``row[key]`` (or of ``key(row)`` for a function)."""
    return float(np.median([key(r) if callable(key) else r[key] for r in rows]))


def compile_seconds(jitted, *args) -> float:
    """Seconds to trace, lower and compile ``jitted`` for ``args``; the call path then reuses the
    executable, so the timed calls never include a compile."""
    return seconds(lambda: jitted.lower(*args).compile())


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
