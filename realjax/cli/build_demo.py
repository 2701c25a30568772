"""``realjax build-demo``: rebuild the embedded demo model (``realjax/assets/demo``) from scratch, reproducibly."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from realjax.tools.demo_model import build


def run(args) -> int:
    jax.config.update("jax_default_matmul_precision", "highest")  # the same bytes on every CPU
    print(json.dumps(build(Path(args.out), args.steps), indent=2))
    return 0
