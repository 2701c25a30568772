"""The ``realjax`` command (also ``python -m realjax``): the only place that parses arguments and prints.

``parser`` declares every sub-command's arguments; ``realjax.cli.<command>`` runs one (imported when it
runs, so ``realjax --help`` answers without initialising JAX). The library raises typed errors
(``ConfigError``, ``DataError``, ...); the commands turn them into ``CliError``, printed here as one line
with exit code 2.
"""

from __future__ import annotations

import os
import sys

from realjax.cli.parser import build_parser


class CliError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


def _quiet_third_party() -> None:
    """Keep notices that do not concern realjax out of the user's terminal: transformers warns that
    "PyTorch was not found" when it is imported without torch, but realjax only uses its tokenizers and
    configs. Set before any command imports transformers; a user's own setting wins."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet_third_party()
    try:
        return int(args.func(args) or 0)
    except (CliError, FileNotFoundError, NotADirectoryError) as e:
        print(f"realjax {args.command}: error: {e}", file=sys.stderr)
        return 2
