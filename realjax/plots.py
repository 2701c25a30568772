"""Figures: the paper's gradient-weight analysis (Fig. 1) and training dynamics (Fig. 4) of a run.

Every curve is computed from the library's own code: the gradient weights by autodiff of the loss
functions in ``realjax.losses``, the dynamics from a run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from realjax import losses

# Fig. 1 set-up: a group of 8 rollouts with 4 positives (the on-policy REAL weight is then 0.4 at s = 0,
# where the paper's curve sits) and GRPO's clip 0.2; REAL's tau is 0.5.
_GROUP, _N_POS, _TAU, _CLIP = 8, 4, 0.5, 0.2


def gradient_weights(s_grid) -> dict[str, np.ndarray]:
    """|dL/ds| of one rollout as its score s sweeps ``s_grid``, for GRPO and REAL, positive and negative.

    GRPO is token-level: one single-token rollout, its token's log-ratio s_t = s, weight per token
    (the batch mean undone). REAL: rollout k's length-normalised score s, the others on-policy (s = 0),
    weight per group.
    """
    r = jnp.array([1.0] * _N_POS + [0.0] * (_GROUP - _N_POS))
    zeros = jnp.zeros((_GROUP, 1))

    def weight(loss_fn, row, **hp):
        def loss_of_s(s):
            logp = zeros.at[row, 0].set(s)
            return loss_fn(logp, zeros, jnp.ones_like(zeros), r, group_size=_GROUP, **hp)[0]

        grad = jax.jit(jax.vmap(jax.grad(loss_of_s)))
        return np.abs(np.asarray(grad(jnp.asarray(s_grid, jnp.float32))))

    return {
        "grpo_pos": weight(losses.grpo_loss, 0, clip_eps=_CLIP) * _GROUP,  # undo the mean over rows
        "grpo_neg": weight(losses.grpo_loss, _GROUP - 1, clip_eps=_CLIP) * _GROUP,
        "real_pos": weight(losses.real_loss, 0, tau=_TAU),  # one group: the group mean is the identity
        "real_neg": weight(losses.real_loss, _GROUP - 1, tau=_TAU),
    }


def plot_gradient_weights(out: str | Path, *, s_max: float = 3.0, points: int = 601) -> Path:
    """Draw the paper's Fig. 1 from autodiff of ``grpo_loss`` and ``real_loss``; returns the PNG path."""
    import matplotlib  # lazy: matplotlib is optional (the `plots` extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    s = np.linspace(-s_max, s_max, points)
    w = gradient_weights(s)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = (("pos", "positive rollouts (r = 1)", math.log(1 + _CLIP)),
              ("neg", "negative rollouts (r = 0)", math.log(1 - _CLIP)))
    for ax, (side, title, clip_at) in zip(axes, panels):
        ax.plot(s, w[f"grpo_{side}"], color="tab:red", label=f"GRPO |A e^s|, clip {_CLIP} (per token)")
        ax.plot(s, w[f"real_{side}"], color="tab:blue", label=f"REAL, tau {_TAU} (per rollout)")
        ax.axhline(1 / _TAU, color="tab:blue", ls=":", lw=1, label="1/tau bound")
        ax.axvline(clip_at, color="tab:red", ls="--", lw=1, label=f"clip edge s = {clip_at:.2f}")
        ax.set_title(title)
        ax.set_xlabel("relative log-prob s (GRPO: token s_t, REAL: length-normalised s)")
        ax.set_ylim(0, 4.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("|gradient weight|")
    axes[1].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Gradient weights from autodiff of realjax.losses (group of {_GROUP}, {_N_POS} positive)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------------------------
# Training dynamics (paper Fig. 4) from metrics.jsonl
# ----------------------------------------------------------------------------------------------------
DYNAMICS_PANELS = (
    ("reward/mean", "training reward"),
    ("eval/pass@1", "held-out pass@1"),
    ("entropy", "entropy"),
    ("response_length/mean", "response length"),
    ("kl", "KL(old || new)"),
    ("grad_norm", "grad norm"),
)


# The gradient-weight mechanism measured in the run (realjax.grad_weights): one panel per label.
GRAD_WEIGHT_PANELS = (("pos", "gradient weight |dS/ds|: positives"), ("neg", "gradient weight |dS/ds|: negatives"))


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def ema(y: np.ndarray, decay: float = 0.8) -> np.ndarray:
    """Exponential moving average, bias-corrected so the first points are not pulled toward 0."""
    out, acc, norm = np.empty(len(y)), 0.0, 0.0
    for i, v in enumerate(y):
        acc, norm = decay * acc + (1 - decay) * v, decay * norm + (1 - decay)
        out[i] = acc / norm
    return out


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric; ``eval/pass@1`` averages the per-dataset ``eval/*/pass@1`` keys."""
    xs, ys = [], []
    for row in rows:
        if key == "eval/pass@1" and key not in row:  # older rows: average the per-dataset values
            vals = [v for k, v in row.items() if k.startswith("eval/") and k.endswith("/pass@1")]
            val = float(np.mean(vals)) if vals else None
        else:
            val = row.get(key)
        if val is not None and np.isfinite(val):
            xs.append(row["step"])
            ys.append(val)
    return np.asarray(xs), np.asarray(ys)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Draw the training dynamics of a run (reward, val pass@1, entropy, length, KL, grad norm) and the
    gradient weights per rollout (positives, negatives; by confidence tercile)."""
    import matplotlib  # lazy: matplotlib is optional (the `plots` extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = read_metrics(metrics)
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    for ax, (side, title) in zip(axes[:, 3], GRAD_WEIGHT_PANELS):
        _grad_weight_panel(ax, rows, side, title)
    for ax, (key, title) in zip(axes[:, :3].flat, DYNAMICS_PANELS):
        x, y = series(rows, key)
        if len(x) > 10 and key != "eval/pass@1":  # per-step metrics are noisy: raw faint, EMA on top
            ax.plot(x, y, color="tab:blue", alpha=0.3, lw=1)
            ax.plot(x, ema(y), color="tab:blue", lw=2, label="EMA 0.8")
            ax.legend(loc="best", fontsize=7)
        else:
            ax.plot(x, y, marker="o", ms=3)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if not len(x):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"training dynamics: {run_dir.name}")
    fig.tight_layout()
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "dynamics.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _grad_weight_panel(ax, rows: list[dict], side: str, title: str) -> None:
    """Mean per rollout, mean within confidence terciles (t1 least confident) and the max, per step."""
    drawn = False
    for suffix, label, style in (("mean", "mean", dict(color="black", lw=2)),
                                 ("t1", "tercile 1 (least confident)", dict(color="tab:red", lw=1)),
                                 ("t2", "tercile 2", dict(color="tab:orange", lw=1)),
                                 ("t3", "tercile 3 (most confident)", dict(color="tab:green", lw=1)),
                                 ("max", "max", dict(color="gray", lw=1, ls=":"))):
        x, y = series(rows, f"grad_weight/{side}_{suffix}")
        if len(x):
            ax.plot(x, ema(y) if len(x) > 10 else y, label=label, **style)
            drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="best", fontsize=6)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
