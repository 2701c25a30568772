"""``realjax bench rl-step``: whole RL steps of a config through the Trainer, split into phases from the
steps' ``time/*`` metrics."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from realjax.config import demo_config_path, load_config
from realjax.rl.trainer import Trainer
from realjax.tools.bench.timing import median

_PHASES = ("rollout", "verifier", "scoring", "update", "host")


def bench_rl_step(config: str | None, *, steps: int, overrides: list[str] = ()) -> dict:
    if steps < 2:
        raise ValueError("--steps must be >= 2: the first step includes the compiles and is left out")
    with tempfile.TemporaryDirectory(prefix="realjax-bench-") as out:
        fixed = [f"output_dir={out}", "name=bench", f"trainer.steps={steps}", "trainer.eval_every=0",
                 "eval.before=false", "data.eval=", "trainer.export=false", f"trainer.save_every={10**9}",
                 "trainer.log_every=1", "logging.progress=false", "logging.tensorboard=false", "logging.wandb=false"]
        cfg = load_config(config or demo_config_path(), [*overrides, *fixed])  # the bench's settings win
        t0 = time.perf_counter()
        Trainer(cfg).run()
        wall = time.perf_counter() - t0
        lines = (Path(out) / "bench" / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if "time/step" in r]
    later = rows[1:]
    res = {"config": str(config or "demo"), "steps": len(rows), "first_step_s": rows[0]["time/step"],
           "step_s": median(later, "time/step"),
           "step_times_s": [round(r["time/step"], 3) for r in rows]}  # a slow later step is a recompile
    for p in _PHASES:
        res[f"{p}_s"] = median(later, lambda r, p=p: r.get(f"time/{p}", 0.0))
    total = sum(r["time/step"] for r in later)
    for p in _PHASES:
        res[f"{p}_fraction"] = sum(r.get(f"time/{p}", 0.0) for r in later) / total
    res["verifier_and_host_fraction"] = res["verifier_fraction"] + res["host_fraction"]
    res["wall_s"] = wall
    return res


