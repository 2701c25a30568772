"""The figures of ``realjax study``: Fig. 4 of the paper in miniature, one PNG per metric.

Left panel: each objective's mean over seeds with a +-1 SD seed band. Right panel: the paired difference
to REAL (same seed, so the same prompts in the same order), mean +- 1 SD over seeds -- the seed-to-seed
spread that all objectives share (which prompts a seed drew) cancels there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from realjax.tools.study.results import FIGURES, REFERENCE, RunResult, by_loss

COLORS = {"real": "tab:blue", "real_bce": "tab:cyan", "real_product": "tab:purple", "real_ordinal": "tab:pink",
          "grpo": "tab:red", "dapo": "tab:orange", "gspo": "tab:green", "dr_grpo": "tab:brown"}


SMOOTH = 5  # training curves: trailing mean over this many RL steps (each step's batch is only 8 prompts)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    c = np.cumsum(np.insert(np.asarray(values, np.float64), 0, 0.0))
    i = np.arange(1, len(values) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def _series(r: RunResult, key: str) -> dict[int, float]:
    """step -> value of one run: the eval curve, or a training series after the trailing mean."""
    steps, values = (r.eval_steps, r.eval_pass) if key == "eval" else r.train[key]
    if key != "eval":
        values = _smooth(values, SMOOTH)
    return dict(zip(steps.tolist(), np.asarray(values, np.float64).tolist()))


def _band(per_seed: list[dict[int, float]]):
    """(steps, mean, sd) over the seeds that have each step."""
    steps = np.array(sorted({s for d in per_seed for s in d}))
    vals = [np.array([d[s] for d in per_seed if s in d]) for s in steps]
    return steps, np.array([v.mean() for v in vals]), np.array([v.std(ddof=1) if v.size > 1 else 0.0 for v in vals])


def _paired_series(runs: list[RunResult], ref: list[RunResult], key: str) -> list[dict[int, float]]:
    """Per seed: objective minus reference at the steps both logged."""
    ref_by_seed = {r.seed: _series(r, key) for r in ref}
    out = []
    for r in runs:
        if r.seed in ref_by_seed:
            mine, theirs = _series(r, key), ref_by_seed[r.seed]
            out.append({s: v - theirs[s] for s, v in mine.items() if s in theirs})
    return out


def plot_curves(out: Path, results: list[RunResult]) -> list[Path]:
    """One figure per metric. Left: the mean over seeds per objective with a +-1 SD seed band. Right:
    the paired difference to REAL (same seed, same prompts), mean +- 1 SD over seeds."""
    import matplotlib  # lazy: matplotlib is optional (the `plots` extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    groups, seeds, paths = by_loss(results), len({r.seed for r in results}), []
    ref = groups.get(REFERENCE, [])
    for filename, key, title in FIGURES:
        fig, (ax, ax_d) = plt.subplots(1, 2, figsize=(13, 4.4))
        for loss, runs in groups.items():
            color, style = COLORS.get(loss, None), "-" if loss.startswith("real") else "--"
            marker = {"marker": "o", "ms": 3} if key == "eval" else {}
            panels = [(ax, [_series(r, key) for r in runs])]
            if ref and loss != REFERENCE:
                panels.append((ax_d, _paired_series(runs, ref, key)))
            for axis, per_seed in panels:
                steps, mean, sd = _band([d for d in per_seed if d])
                if steps.size:
                    axis.plot(steps, mean, style, color=color, label=loss, **marker)
                    axis.fill_between(steps, mean - sd, mean + sd, color=color, alpha=0.08, lw=0)
        smooth = "" if key == "eval" else f"; {SMOOTH}-step trailing mean"
        ax.set_title(f"{title}: mean over {seeds} seed{'s' * (seeds > 1)}, band ±1 SD{smooth}", fontsize=10)
        ax_d.set_title(f"paired difference to {REFERENCE} (same seed = same prompts), mean ± 1 SD", fontsize=10)
        ax_d.axhline(0.0, color=COLORS[REFERENCE], lw=1)
        for axis in (ax, ax_d):
            axis.set_xlabel("RL step")
            axis.grid(alpha=0.3)
            if axis.lines:
                axis.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        paths.append(out / filename)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


