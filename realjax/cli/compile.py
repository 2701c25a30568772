"""``realjax compile``: AOT-compile the RL step for a TPU topology on this host; exit 0 when every program
fits the chip's HBM, 1 when one does not, 2 on errors."""

from __future__ import annotations

import json
import os
import sys
import time

import jax

from realjax.cli import CliError
from realjax.config import ConfigError, demo_config_path, load_config
from realjax.tools.aot.compile import compile_report
from realjax.tools.aot.report import format_report
from realjax.tools.aot.topology import TpuUnavailable, parse_topology
from realjax.tools.bench.rollout import oracle_lengths


def _host_is_cpu() -> None:
    """Compile-only devices need no TPU backend. Unless the user chose platforms, keep JAX off local chips
    (on a TPU worker they may be training; JAX's Cloud TPU start-up would otherwise pick "tpu,cpu")."""
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def run(args) -> int:
    """``realjax compile``: exit 0 when every program fits the chip's HBM, 1 when one does not, 2 on errors."""
    _host_is_cpu()
    try:
        cfg = load_config(args.config or demo_config_path(), args.overrides)
        parse_topology(args.topology)
        oracle_lengths(args.lengths, 1, 1)  # an unknown name fails now, not after minutes of compiling
        t0 = time.perf_counter()
        c0 = time.process_time()  # CPU time of every thread: the compiles may run side by side
        rep = compile_report(cfg, args.topology, lengths=args.lengths, workers=args.jobs, log=lambda message: print(
            f"realjax compile: {time.perf_counter() - t0:5.0f} s (cpu {time.process_time() - c0:5.0f} s) {message}",
            file=sys.stderr, flush=True))
    except (ConfigError, TpuUnavailable, ValueError) as e:
        raise CliError(str(e).splitlines()[0]) from None
    if args.json:
        print(json.dumps(rep, sort_keys=True))
    else:
        print(format_report(rep, f"--config {args.config}" if args.config else "(demo)"))
    return 0 if rep["fits"] else 1
