"""The ``realjax`` command (also ``python -m realjax``): one sub-command per job, imported lazily so that
``realjax --help`` answers without initialising JAX."""

from __future__ import annotations

import argparse
import sys


class CliError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


def _plot(args) -> int:
    from realjax import plots

    if args.what == "gradient-weights":
        out = plots.plot_gradient_weights(args.out or "gradient_weights.png")
    else:
        out = plots.plot_run(args.what, args.out)
    print(f"wrote {out}")
    return 0


def _add_plot(sub):
    p = sub.add_parser("plot", help="figures: `gradient-weights` (paper Fig. 1) or a run dir (Fig. 4 dynamics)")
    p.add_argument("what", help="'gradient-weights', or a run directory holding metrics.jsonl")
    p.add_argument("--out", help="output PNG (gradient-weights) or output directory (run dynamics)")
    p.set_defaults(func=_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realjax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


_COMMANDS = [_add_plot]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CliError, FileNotFoundError, NotADirectoryError) as e:
        print(f"realjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
