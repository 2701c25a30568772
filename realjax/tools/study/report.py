"""What ``realjax study`` reports: per-run numbers read back from ``metrics.jsonl``, means with 95%
t-intervals over seeds, paired differences against REAL, and ``summary.md`` (figures: ``figures``; statistics: ``results``).

Definitions (also printed in ``summary.md``):

* final pass@1: held-out pass@1 at the last step; mean over seeds +- the 95% t-interval half-width.
* AUC: the trapezoid area under the held-out pass@1 curve over the evaluated steps, divided by the step
  range (the average pass@1 during training; rewards learning early, and staying up).
* final entropy / length: mean over the last ``FINAL_WINDOW`` RL steps of the rollouts' token entropy
  and mean response length.
* steps to threshold: the first evaluated step whose pass@1 is at least the run's own step-0 pass@1
  plus ``THRESHOLD``; median over seeds (a run that never gets there counts as infinite).
* diverged: a run the trainer aborted (``TrainingDiverged``: non-finite updates in a row), or whose
  final pass@1 is more than ``COLLAPSE`` below its step-0 pass@1. Aborted runs have no final numbers
  and are left out of the means (the n column says how many seeds remain).
* paired difference: per seed, objective minus REAL (same prompts, same data order), mean +- 95% t.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

import jax
import numpy as np

from realjax.tools.study.design import PAPER_HPARAMS
from realjax.tools.study.figures import plot_curves
from realjax.tools.study.mechanism import grad_weight_table
from realjax.tools.study.results import (COLLAPSE, FIGURES, FINAL_WINDOW, REFERENCE, THRESHOLD, RunResult, by_loss,
                                          mean_ci, median_steps, paired)


def _fmt(mean: float, half: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if np.isfinite(half) else "")


def _paired_cell(d: dict | None) -> str:
    if d is None:
        return "—"
    if not d["n"]:
        return "n/a"
    return f"{d['mean']:+.3f}" + (f" ± {d['half']:.3f}" if np.isfinite(d["half"]) else "")


def results_table(results: list[RunResult]) -> str:
    """The main table: one row per objective."""
    groups, diffs = by_loss(results), paired(results)
    head = ["objective", "n", "final pass@1", f"Δ vs {REFERENCE} (paired)", "AUC pass@1", "final entropy",
            "final length", f"steps to base+{THRESHOLD:.2f}", "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for loss, runs in groups.items():
        final = mean_ci(r.final for r in runs)
        med, reached = median_steps(runs)
        d = diffs.get(loss)
        aborted = sum(r.status == "diverged" for r in runs)
        cells = [loss, f"{final[2]}/{len(runs)}", _fmt(*final[:2]),
                 _paired_cell(d),
                 _fmt(*mean_ci(r.auc for r in runs)[:2]), _fmt(*mean_ci(r.final_entropy for r in runs)[:2]),
                 _fmt(*mean_ci(r.final_length for r in runs)[:2], 1),
                 ("not reached" if med == math.inf else "n/a" if math.isnan(med) else f"{med:g}")
                 + f" ({reached}/{len(runs)} reached)",
                 f"{sum(r.diverged for r in runs)}/{len(runs)}" + (f" ({aborted} aborted)" if aborted else "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(results: list[RunResult]) -> str:
    """Per objective: the per-seed differences to REAL in final pass@1, and the mean differences in final
    pass@1 and AUC with their 95% intervals."""
    final, auc = paired(results, "final"), paired(results, "auc")
    seeds = sorted({r.seed for r in results})
    lines = ["| objective | " + " | ".join(f"seed {s}" for s in seeds) + f" | Δ final vs {REFERENCE} | "
             f"Δ AUC vs {REFERENCE} |", "|" + "---|" * (len(seeds) + 3)]
    for loss, d in final.items():
        cells = [f"{d['diffs'][s]:+.3f}" if s in d["diffs"] else "" for s in seeds]
        lines.append(f"| {loss} | " + " | ".join(cells) + f" | {_paired_cell(d)} | {_paired_cell(auc[loss])} |")
    return "\n".join(lines)


def per_seed_table(results: list[RunResult]) -> str:
    groups = by_loss(results)
    seeds = sorted({r.seed for r in results})
    lines = ["| objective | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|" + "---|" * (len(seeds) + 1)]
    for loss, runs in groups.items():
        cell = {r.seed: ("aborted" if r.status == "diverged" else "missing" if r.status == "missing"
                         else f"{r.final:.3f}" + (" (collapsed)" if r.collapsed else "")) for r in runs}
        lines.append(f"| {loss} | " + " | ".join(cell.get(s, "") for s in seeds) + " |")
    base = {r.seed: r.base for r in results if np.isfinite(r.base)}
    lines.append("| *step 0 (base)* | " + " | ".join(f"{base[s]:.3f}" if s in base else "" for s in seeds) + " |")
    return "\n".join(lines)


def findings(results: list[RunResult]) -> list[str]:
    """Plain statements generated from the numbers (no editorial choice of which to show)."""
    groups = by_loss(results)
    means = {loss: mean_ci(r.final for r in runs)[0] for loss, runs in groups.items()}
    ranked = sorted((m, loss) for loss, m in means.items() if np.isfinite(m))[::-1]
    out = ["Ranking by mean final pass@1: " + " > ".join(f"{loss} {m:.3f}" for m, loss in ranked) + "."]
    for loss, d in paired(results).items():
        if not d["n"] or not np.isfinite(d["half"]):
            continue
        lo, hi = d["mean"] - d["half"], d["mean"] + d["half"]
        verdict = ("higher than" if lo > 0 else "lower than" if hi < 0 else "not distinguishable from")
        out.append(f"{loss} is {verdict} {REFERENCE} on final pass@1 (paired over {d['n']} seeds: "
                   f"{d['mean']:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]).")
    return out


def headline(results: list[RunResult]) -> str:
    return "\n".join(findings(results))


# ----------------------------------------------------------------------------------------------------
# The base policy's spread
# ----------------------------------------------------------------------------------------------------
_BINS = (("never (0)", lambda f: f == 0), ("(0, 1/4)", lambda f: 0 < f < 0.25),
         ("[1/4, 1/2)", lambda f: 0.25 <= f < 0.5), ("[1/2, 3/4)", lambda f: 0.5 <= f < 0.75),
         ("[3/4, 1)", lambda f: 0.75 <= f < 1), ("always (1)", lambda f: f == 1))


def _fractions(base: dict) -> np.ndarray:
    return np.array([p["correct"] for p in base["problems"]], np.float64) / base["settings"]["n"]


def spread_line(base: dict) -> str:
    f = _fractions(base)
    return (f"per-problem pass rate: {np.mean(f == 0):.0%} never, {np.mean((f > 0) & (f < 1)):.0%} sometimes, "
            f"{np.mean(f == 1):.0%} always ({f.size} held-out problems)")


def spread_tables(base: dict) -> str:
    f = _fractions(base)
    lines = ["| fraction of samples correct | " + " | ".join(name for name, _ in _BINS) + " |",
             "|" + "---|" * (len(_BINS) + 1),
             "| problems | " + " | ".join(str(int(sum(map(test, f)))) for _, test in _BINS) + " |"]
    sources = sorted({p["source"] for p in base["problems"]})
    if 1 < len(sources) <= 12:
        lines += ["", "| source | problems | pass@1 | never | sometimes | always |", "|---|---|---|---|---|---|"]
        for src in sources:
            g = f[[p["source"] == src for p in base["problems"]]]
            lines.append(f"| {src} | {g.size} | {g.mean():.3f} | {np.mean(g == 0):.0%} | "
                         f"{np.mean((g > 0) & (g < 1)):.0%} | {np.mean(g == 1):.0%} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# summary.md
# ----------------------------------------------------------------------------------------------------
def _setup(cfg, hparams: dict, base: dict) -> str:
    r, o, e, t = cfg.rollout, cfg.optim, cfg.eval, cfg.trainer
    problems = len(base["problems"])
    model = ("`realjax/assets/demo` (Qwen2 architecture, 0.8M parameters, briefly warm-started)"
             if cfg.model.path == "demo" else f"`{cfg.model.path}`")
    rows = [("model", "DeepSeek-R1-Distill-Qwen-1.5B", model),
            ("training data", "DeepScaleR (~40k math problems)", f"`{cfg.data.train}`"),
            ("RL steps", "~1400 (Fig. 4)", str(t.steps)),
            ("prompts x rollouts per step", "128 x 8", f"{r.prompts_per_step} x {r.group_size}"),
            ("optimizer updates per rollout batch", "4", str(o.mini_batches)),
            ("learning rate (all objectives)", "2e-6 constant", f"{o.lr:.1e} {o.schedule}"),
            ("grad clip / weight decay", "1.0 / 0.01", f"{o.grad_clip} / {o.weight_decay}"),
            ("response budget", "8192 tokens", f"{r.max_new_tokens} tokens"),
            ("rollout temperature", "0.6", f"{r.temperature}"),
            ("held-out eval", "6 benchmarks, n=16 (Fig. 4: AIME24, n=8)",
             f"{problems} problems of `{cfg.data.eval}`, n={e.n}, every {t.eval_every} steps"),
            ("eval sampling", "T=0.6, top-p 0.95", f"T={e.temperature:g}, top-p {e.top_p:g}")]
    lines = ["| | paper (PAPER.md 3.1) | this study |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "| objective | hyperparameters | the paper's (PAPER.md 3.2)? |", "|---|---|---|"]
    lines += [f"| {loss} | " + ", ".join(f"{k}={v}" for k, v in hp.items()) + " | "
              + ("yes" if hp == PAPER_HPARAMS.get(loss) else "no: overridden") + " |" for loss, hp in hparams.items()]
    return "\n".join(lines)


def _header(results, base, command, invocations: list[dict]) -> list[str]:
    runs_time = sum(r.wall_time_s for r in results if np.isfinite(r.wall_time_s))
    seeds = len({r.seed for r in results})
    base_s = base.get("wall_time_s", 0.0)
    return [
        f"# realjax study: {len(by_loss(results))} objectives x {seeds} seed{'s' * (seeds > 1)}",
        "",
        f"Command: `{command}`  ",
        (f"Time: the {len(results)} runs took {_duration(runs_time)} and the base check {_duration(base_s)} on "
         f"{platform.machine()} with {_cpus()} CPU cores, jax {jax.__version__}. {_invocations(invocations)}  "),
        "Generated by `realjax study` from the runs' `metrics.jsonl`; nothing here is tuned to match the paper.",
    ]


def _results(results) -> list[str]:
    return [
        "## Results",
        "",
        (f"Held-out pass@1 at step 0 (the base policy, mean over seeds): {mean_ci(r.base for r in results)[0]:.3f}."
         " ± is the 95% t-interval over seeds."),
        "",
        results_table(results),
        "",
        *(f"- {line}" for line in findings(results)),
        "",
        *(f"![{title}]({name})" for name, _, title in FIGURES),
        "",
        "### Gradient weights per rollout (|dS/ds|, mean over training steps and seeds)",
        "",
        ("The push each rollout's score got from the loss sum S (REAL: at most 1/tau; GRPO: |A| times its "
         "ratio), for positives and negatives, and within terciles of the rollout's mean token log-prob "
         "(t1 least confident). See README \"Gradient weights\"."),
        "",
        grad_weight_table(results),
        "",
        "### Final held-out pass@1 per seed",
        "",
        per_seed_table(results),
        "",
        f"### Paired differences to {REFERENCE} (same seed = same prompts in the same order)",
        "",
        paired_table(results),
    ]


def _spread(base) -> list[str]:
    return [
        f"## The base policy: spread of per-problem pass rates (n={base['settings']['n']} samples each)",
        "",
        (f"Pass@1 {base['pass@1']:.3f}; {spread_line(base)}. RL can only move problems that are sometimes "
         "solved (a group of all-right or all-wrong rollouts has no learning signal for any objective here)."),
        "",
        spread_tables(base),
    ]


_DESIGN = ("Every run is the demo config with the study budget below; only `loss.*`, `name` and `seed` differ "
           "between runs. The seed fixes the prompt order, the rollout keys and the eval keys, so all "
           "objectives see the same prompts in the same order for a given seed (paired comparison). "
           "DAPO is clip-higher + token-mean without dynamic sampling or overlong filtering, as the paper ran "
           "it. The learning rate is larger than the paper's (a tiny model, a few dozen steps) and "
           "is the same for every objective; clip ranges, tau and the KL coefficient are the paper's.")


def summary_markdown(results, base, cfg, hparams, command, invocations: list[dict]) -> str:
    definitions = (__doc__.split("Definitions (also printed in ``summary.md``):")[1].strip().replace("``", "`")
                   .replace("`FINAL_WINDOW`", str(FINAL_WINDOW)).replace("`THRESHOLD`", f"{THRESHOLD:.2f}")
                   .replace("`COLLAPSE`", f"{COLLAPSE:.2f}"))
    parts = [*_header(results, base, command, invocations), "", *_results(results), "", *_spread(base), "",
             "## Set-up and scaling", "", _DESIGN, "", _setup(cfg, hparams, base), "", "## Definitions", "",
             definitions, ""]
    return "\n".join(parts)


def _invocations(invocations: list[dict]) -> str:
    """The invocations that trained runs: wall and CPU time, and the machine's load (it may be shared)."""
    if not invocations:
        return ""
    each = [f"{i['runs_trained']} runs in {_duration(i['wall_s'])} wall, {_duration(i['cpu_s'])} CPU of the study "
            f"process, 1-minute load average {i['load_mean']:.1f} on average (max {i['load_max']:.1f}; the machine "
            "may be shared with other jobs)" for i in invocations]
    return f"Trained in {len(invocations)} invocation{'s' * (len(invocations) > 1)}: " + "; ".join(each) + "."


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def write(out: Path, results, base, cfg, *, hparams, command, invocations: list[dict]) -> list[Path]:
    """summary.md and the figures in ``out``; returns their paths. ``invocations``: the time records of
    the invocations that trained (runs_trained, wall_s, cpu_s, load_mean, load_max)."""
    out = Path(out)
    paths = plot_curves(out, results)
    (out / "summary.md").write_text(summary_markdown(results, base, cfg, hparams, command, invocations))
    return [out / "summary.md", *paths]
