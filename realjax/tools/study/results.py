"""A study run read back from its run directory (``RunResult``), and the statistics over seeds: means with
95% t-intervals, paired differences against REAL, AUC and steps to a threshold (definitions: ``report``)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from realjax.grad_weights import METRIC_NAMES as GRAD_WEIGHT_METRICS
from realjax.plots import read_metrics, series
from realjax.tools.study.design import DONE_FILE

FINAL_WINDOW = 5
THRESHOLD = 0.10
COLLAPSE = 0.10
REFERENCE = "real"
# The figures: file, metric ("eval" = held-out pass@1), title.
FIGURES = (("pass_at_1.png", "eval", "held-out pass@1"), ("entropy.png", "entropy", "token entropy of rollouts"),
           ("reward.png", "reward/mean", "training reward"),
           ("response_length.png", "response_length/mean", "response length (tokens)"))

# Two-sided 95% quantiles of Student's t (scipy is not a dependency); df -> t_{0.975, df}.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t95(df: int) -> float:
    """t_{0.975, df}; between tabulated dfs the next smaller one (conservative); 1.96 past 120."""
    if df < 1:
        return math.nan
    return _T95[max(k for k in _T95 if k <= df)] if df <= 120 else 1.960


def mean_ci(values) -> tuple[float, float, int]:
    """(mean, 95% half-width, n) over the finite values; the half-width is nan below 2 values."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if not x.size:
        return math.nan, math.nan, 0
    half = t95(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else math.nan
    return float(x.mean()), float(half), int(x.size)


def area_under_curve(steps, values) -> float:
    """Trapezoid area under ``values(steps)`` divided by the step range (one point: its value)."""
    s, v = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    if s.size == 0:
        return math.nan
    if s.size == 1 or s[-1] == s[0]:
        return float(v[-1])
    return float(np.sum((v[1:] + v[:-1]) * np.diff(s)) / 2.0 / (s[-1] - s[0]))


def steps_to_threshold(steps, values, threshold: float) -> int | None:
    """The first step whose value is >= threshold, or None."""
    for s, v in zip(steps, values):
        if v >= threshold:
            return int(s)
    return None


# ----------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    loss: str
    seed: int
    status: str  # finished | diverged (aborted) | missing
    eval_steps: np.ndarray
    eval_pass: np.ndarray
    train: dict  # metric -> (steps, values)
    base: float = math.nan
    final: float = math.nan
    auc: float = math.nan
    final_entropy: float = math.nan
    final_length: float = math.nan
    reached: int | None = None
    collapsed: bool = False
    wall_time_s: float = math.nan

    @property
    def diverged(self) -> bool:
        return self.status == "diverged" or self.collapsed


def _last_per_step(steps, values):
    """One value per step, the last logged (a run resumed after its final checkpoint evaluates again)."""
    last = dict(zip(steps.tolist(), values.tolist()))
    return np.array(sorted(last), dtype=np.int64), np.array([last[s] for s in sorted(last)], np.float64)


def load_run(run_dir: str | Path, loss: str, seed: int) -> RunResult:
    """Read a study run back: its eval curve, training series and the derived numbers."""
    run_dir = Path(run_dir)
    marker_path, metrics_path = run_dir / DONE_FILE, run_dir / "metrics.jsonl"
    marker = json.loads(marker_path.read_text()) if marker_path.exists() else {"status": "missing"}
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    steps, passes = _last_per_step(*series(rows, "eval/pass@1"))
    train = {k: _last_per_step(*series([r for r in rows if "loss" in r], k))
             for k in ("entropy", "reward/mean", "response_length/mean", *GRAD_WEIGHT_METRICS)}
    r = RunResult(loss, seed, marker["status"], steps, passes, train, wall_time_s=marker.get("wall_time_s", math.nan))
    if steps.size and steps[0] == 0:
        r.base = float(passes[0])
        r.reached = steps_to_threshold(steps[1:], passes[1:], r.base + THRESHOLD)
    if r.status == "finished" and steps.size:
        r.final, r.auc = float(passes[-1]), area_under_curve(steps, passes)
        r.final_entropy = float(np.mean(train["entropy"][1][-FINAL_WINDOW:]))
        r.final_length = float(np.mean(train["response_length/mean"][1][-FINAL_WINDOW:]))
        r.collapsed = bool(r.final < r.base - COLLAPSE)
    return r


# ----------------------------------------------------------------------------------------------------
# Across seeds
# ----------------------------------------------------------------------------------------------------
def by_loss(results: list[RunResult]) -> dict[str, list[RunResult]]:
    out: dict[str, list[RunResult]] = {}
    for r in results:
        out.setdefault(r.loss, []).append(r)
    return out


def paired(results: list[RunResult], field: str = "final", reference: str = REFERENCE) -> dict[str, dict]:
    """Per objective: the per-seed differences ``field(objective) - field(reference)`` over the seeds where
    both are finite, and their mean +- 95% half-width."""
    groups = by_loss(results)
    ref = {r.seed: getattr(r, field) for r in groups.get(reference, [])}
    out = {}
    for loss, runs in groups.items():
        if loss == reference:
            continue
        diffs = {r.seed: getattr(r, field) - ref[r.seed] for r in runs
                 if r.seed in ref and np.isfinite(getattr(r, field)) and np.isfinite(ref[r.seed])}
        mean, half, n = mean_ci(diffs.values())
        out[loss] = {"diffs": diffs, "mean": mean, "half": half, "n": n}
    return out


def median_steps(runs: list[RunResult]) -> tuple[float, int]:
    """(median steps to threshold with never = inf, how many runs reached it)."""
    values = [r.reached if r.reached is not None else math.inf for r in runs if r.status == "finished"]
    return (float(np.median(values)) if values else math.nan), sum(v != math.inf for v in values)

