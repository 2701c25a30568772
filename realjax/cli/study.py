"""``realjax study``: the CPU mini-replication of Table 1 (``realjax.tools.study``), resumable."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from realjax.cli import CliError
from realjax.config import ConfigError, demo_config_path
from realjax.tools.study import report
from realjax.tools.study.design import DEFAULT_LOSSES, INVOCATIONS
from realjax.tools.study.results import load_run
from realjax.tools.study.runs import StudyError, base_spread, enable_compile_cache, pending, plan, run_all


def _command(args) -> str:
    """The command line that reproduces this study (defaults left out)."""
    parts = ["realjax study"]
    if args.config:
        parts.append(f"--config {args.config}")
    if tuple(x.strip() for x in args.losses.split(",")) != DEFAULT_LOSSES:
        parts.append(f"--losses {args.losses}")
    for flag, value, default in (("--seeds", args.seeds, 5), ("--out", args.out, "study"),
                                 ("--base-n", args.base_n, 16)):
        if value != default:
            parts.append(f"{flag} {value}")
    return " ".join([*parts, *args.overrides])


def run(args) -> int:
    t0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    if args.base_n < 1:
        raise CliError(f"--base-n must be >= 1, got {args.base_n}")
    out = Path(args.out)
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    try:
        runs = plan(args.config or demo_config_path(), args.overrides, losses, args.seeds, out)
        pending(runs)  # a mismatched run directory fails here, before any compute
    except (ConfigError, StudyError) as e:
        raise CliError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    enable_compile_cache(out / ".jax_cache")
    print(f"study: {len(losses)} objectives x {args.seeds} seeds = {len(runs)} runs of {runs[0].cfg.trainer.steps} "
          f"steps -> {out}", flush=True)
    base = base_spread(runs[0].cfg, args.base_n, out / "base.json")
    print(f"study: base policy pass@1 {base['pass@1']:.3f} (n={args.base_n}); "
          f"{report.spread_line(base)}", flush=True)
    finished, trained = run_all(runs, log=lambda s: print(s, flush=True))
    if trained:  # the time record of every invocation that trained, for the report
        loads = [load0, *(m["load_1min"] for m in trained)]
        record = {"runs_trained": len(trained), "wall_s": round(time.perf_counter() - t0, 1),
                  "cpu_s": round(time.process_time() - cpu0, 1), "load_mean": round(sum(loads) / len(loads), 2),
                  "load_max": round(max(loads), 2), "date": time.strftime("%Y-%m-%d %H:%M")}
        with open(out / INVOCATIONS, "a") as f:
            f.write(json.dumps(record) + "\n")
    if not finished:
        return 130
    results = [load_run(r.cfg.run_dir, r.loss, r.seed) for r in runs]
    invocations = [json.loads(line) for line in (out / INVOCATIONS).read_text().splitlines() if line.strip()] \
        if (out / INVOCATIONS).exists() else []
    paths = report.write(out, results, base, runs[0].cfg, hparams={
        n: runs[i].cfg.loss.hparams() for i, n in enumerate(losses)}, command=_command(args), invocations=invocations)
    print("\n".join(["study: wrote " + ", ".join(str(p) for p in paths), report.headline(results)]), flush=True)
    return 0
