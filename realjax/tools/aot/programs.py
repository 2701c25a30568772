"""One compiled program of ``realjax compile``: its memory and FLOPs, how the FLOPs of scanned layers are
counted, and the worker threads the programs compile on.

Where the time goes (1.5B on v5p-8, this 2-core host): XLA's TPU compile is almost all of it; tracing
and lowering take about a second per program, and so does counting a scanned program's FLOPs. XLA's cost
analysis counts a loop body once, so a scanned program's FLOPs are one layer's: they are scaled by the
ratio of two counts of the uncompiled, unpartitioned HLO, the program with its layer scan unrolled
(``ModelConfig.unroll_scan``) and as compiled (its own lowering, counted before it compiles). The
unrolled lowering is cheap because the remat'd block is traced once and reused for every layer.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import time
from typing import Any

import jax
from jax._src.lib import _jax  # private: no public API counts an uncompiled HLO module on another backend

@dataclasses.dataclass
class Program:
    name: str
    runs: int  # how many times one RL step runs it (decode: steps per call x calls)
    shape: str  # what one run processes, for the table
    resident_bytes: int  # live device buffers that are not its arguments
    memory: dict[str, int] = dataclasses.field(default_factory=dict)
    flops: float = 0.0  # per chip, one run
    bytes_accessed: float = 0.0  # per chip, one run
    compile_s: float = 0.0  # XLA's compile (wall seconds on this host)
    lower_s: float = 0.0  # tracing and lowering to StableHLO
    count_s: float = 0.0  # scanned layers: the FLOP counts of the uncompiled HLO (``hlo_flops``)
    error: str = ""  # RESOURCE_EXHAUSTED text when XLA cannot fit it
    unread_bytes: float = 0.0  # per chip, one run: argument bytes it never reads (cache beyond its window)
    window: int = 0  # a decode window's program: the cache slots it reads
    parts: list = dataclasses.field(default_factory=list)  # decode: the window programs it merges
    cache_bytes: int = 0  # decode: the KV cache, per chip
    interpolated: bool = False  # a decode window priced from its neighbours, not compiled (``interpolate``)

    @property
    def read_bytes(self) -> float:
        """What one run must read at least once: its arguments, less what it provably skips."""
        return self.memory.get("argument", 0) - self.unread_bytes

    @property
    def peak(self) -> int:
        return self.memory.get("peak", 0)

    @property
    def total(self) -> int:
        return self.peak + self.resident_bytes


_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory")
_SIZE = re.compile(r"([\d.]+)([KMGT])\b")


def compile_program(program: Program, lower, log, st, unrolled: float | None = None) -> Any:
    """Compile ``lower(st)``'s program and fill in ``program``; an out-of-memory compile is recorded.

    ``st`` is the run's abstract state (``realjax.tools.aot.compile``): with scanned layers
    (``st.count_graphdef``) the FLOPs are scaled by the count of ``lower(st.unrolled())`` (or
    ``unrolled``, when given) over the compiled program's own uncompiled count."""
    log(f"compiling {program.name} ({program.shape})")
    t0 = time.perf_counter()
    lowered = lower(st)
    program.lower_s, t0 = time.perf_counter() - t0, time.perf_counter()
    scanned = hlo_flops(lowered) if st.count_graphdef is not None else 0.0  # the very program it compiles
    program.count_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if not _OOM.search(str(e)):
            raise
        program.error = str(e).strip().splitlines()[0][:400]
        sizes = [float(v) * 1024 ** " KMGT".index(u) for v, u in _SIZE.findall(program.error)]
        program.memory = {"peak": int(sizes[0]) if sizes else 0}  # "required (X) exceeds available (Y)"
        program.compile_s = time.perf_counter() - t0
        log(f"{program.name} ({program.shape}) does not fit: {program.compile_s:.0f} s of compile")
        return None
    program.compile_s = time.perf_counter() - t0
    # The end of each compile too: with several threads, the log then shows which program held the run up.
    log(f"compiled {program.name} ({program.shape}) in {program.compile_s:.0f} s")
    mem = compiled.memory_analysis()
    stats = {k: int(getattr(mem, k + "_size_in_bytes", 0)) for k in ("argument", "output", "alias", "temp",
                                                                     "generated_code")}
    stats["peak"] = int(getattr(mem, "peak_memory_in_bytes", 0) or
                        stats["argument"] + stats["output"] - stats["alias"] + stats["temp"])
    program.memory = stats
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    program.flops = float(cost.get("flops", 0.0))
    program.bytes_accessed = float(cost.get("bytes accessed", 0.0))
    if st.count_graphdef is not None:
        t0 = time.perf_counter()
        if unrolled is None:
            unrolled = hlo_flops(lower(st.unrolled()))
        program.flops *= unrolled / scanned
        program.count_s += time.perf_counter() - t0
    return compiled


def hlo_flops(lowered) -> float:
    """XLA's FLOP count of a lowered program's uncompiled, unpartitioned HLO (a loop body counted once).

    The TPU client has no cost analysis of an uncompiled program, so the host CPU client counts it: an
    HLO count, independent of the target."""
    cpu = jax.devices("cpu")[0].client
    return _jax.hlo_module_cost_analysis(cpu, lowered._lowering.hlo().as_hlo_module())["flops"]


def window_unrolled_flops(lower, st, windows):
    """``window -> unrolled FLOPs`` of the decode step (``lower(st, window)``). A step's FLOPs are affine in
    its window (attention reads ``window`` slots), so the first and last windows' counts give every
    other's."""
    first, last = (hlo_flops(lower(st.unrolled(), w)) for w in (windows[0], windows[-1]))
    if windows[-1] == windows[0]:
        return lambda w: first
    return lambda w: first + (last - first) * (w - windows[0]) / (windows[-1] - windows[0])


def interpolate(parts: list[Program]) -> None:
    """Fill the decode windows between the first and the widest (both compiled) without compiling them.

    The windows are one program but for the span attention reads: per step, FLOPs and bytes are affine in
    the window (interpolated here), and arguments, outputs and the largest temporaries are the widest's
    (its memory is copied). ``tests/test_aot.py`` compiles every window and compares."""
    first, last = parts[0], parts[-1]
    for p in parts[1:-1]:
        f = (p.window - first.window) / (last.window - first.window)
        p.memory, p.error, p.interpolated = dict(last.memory), last.error or first.error, True
        p.flops = first.flops + f * (last.flops - first.flops)
        p.bytes_accessed = first.bytes_accessed + f * (last.bytes_accessed - first.bytes_accessed)


def merge(name: str, shape: str, parts: list[Program]) -> Program:
    """One row for programs that run in sequence (decode windows): memory of the largest, per-run FLOPs
    and bytes averaged over the runs, so that runs x per-run stays each total."""
    runs = sum(p.runs for p in parts)
    mean = lambda f: sum(f(p) * p.runs for p in parts) / max(runs, 1)
    worst = max(parts, key=lambda p: (bool(p.error), p.peak))
    return Program(name, runs, shape, worst.resident_bytes, memory=dict(worst.memory),
                   flops=mean(lambda p: p.flops), bytes_accessed=mean(lambda p: p.bytes_accessed),
                   compile_s=sum(p.compile_s for p in parts), lower_s=sum(p.lower_s for p in parts),
                   count_s=sum(p.count_s for p in parts), error=worst.error,
                   unread_bytes=mean(lambda p: p.unread_bytes))


class Jobs:
    """The programs' compiles on ``workers`` threads. XLA's compile releases the GIL and runs on one core
    for most of its passes, so independent programs compile side by side; tracing and lowering hold the
    GIL. A job may submit more (a sampler's decode windows once its prefill compiled, which they need).
    With one worker every job runs at once, in submission order (depth first)."""

    def __init__(self, workers: int):
        self._pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 1 else None
        self._futures: list[concurrent.futures.Future] = []

    def submit(self, fn, *args) -> None:
        if self._pool is None:
            fn(*args)
        else:
            self._futures.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        """Until every job has run, those submitted by jobs included; re-raises a job's error."""
        i = 0
        while i < len(self._futures):  # a job appends its own jobs before it ends
            self._futures[i].result()
            i += 1

    def __enter__(self) -> "Jobs":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
