"""The study's table of the gradient-weight mechanism: per objective, the rollouts' gradient weights
|dS/ds| (``realjax.grad_weights``) that the runs measured, next to final pass@1, so a study shows whether
the paper's mechanism is there even where pass@1 ties."""

from __future__ import annotations

import math

import numpy as np

from realjax.grad_weights import PREFIX, STATS

COLUMNS = tuple(f"{label} {stat}" for label in ("pos", "neg") for stat in STATS)


def run_means(train: dict) -> dict[str, float]:
    """Per column, the mean over a run's training steps (NaN when the run did not log it)."""
    out = {}
    for col in COLUMNS:
        label, stat = col.split()
        steps_values = train.get(f"{PREFIX}{label}_{stat}")
        out[col] = float(np.mean(steps_values[1])) if steps_values is not None and len(steps_values[1]) else math.nan
    return out


def grad_weight_table(results) -> str:
    """One row per objective: mean final pass@1 over finished seeds, then each gradient-weight statistic
    averaged over steps, then over the seeds that logged it."""
    groups: dict[str, list] = {}
    for r in results:
        groups.setdefault(r.loss, []).append(r)
    head = ["objective", "final pass@1", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for loss, runs in groups.items():
        finals = [r.final for r in runs if not math.isnan(r.final)]
        per_run = [run_means(r.train) for r in runs]
        cells = [loss, f"{np.mean(finals):.3f}" if finals else "n/a"]
        for col in COLUMNS:
            vals = [m[col] for m in per_run if not math.isnan(m[col])]
            cells.append(f"{np.mean(vals):.3g}" if vals else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
