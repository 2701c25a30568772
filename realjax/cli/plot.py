"""``realjax plot``: the paper's gradient-weight figure (Fig. 1), or a run's training dynamics (Fig. 4)."""

from __future__ import annotations

from realjax import plots


def run(args) -> int:
    if args.what == "gradient-weights":
        out = plots.plot_gradient_weights(args.out or "gradient_weights.png")
    else:
        out = plots.plot_run(args.what, args.out)
    print(f"wrote {out}")
    return 0
