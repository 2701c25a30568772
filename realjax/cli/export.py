"""``realjax export``: a run's checkpoint as an HF safetensors model directory."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from realjax.checkpoint import Checkpointer, CheckpointUnreadable
from realjax.cli import CliError
from realjax.config import load_config
from realjax.models import from_pretrained, save_pretrained
from realjax.rl.setup import model_path


def run(args) -> int:
    """`realjax export`: restore a run's checkpoint and write it as an HF model directory."""
    run = Path(args.run)
    if not (run / "config.yaml").exists():
        raise CliError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    source = model_path(cfg)
    model = from_pretrained(source, dtype=cfg.model.param_dtype)
    graphdef, params = nnx.split(model)
    ckpt = Checkpointer(run / "checkpoints")
    step = args.step if args.step is not None else ckpt.latest_step()
    if step is None or step not in ckpt.all_steps():
        raise CliError(f"no checkpoint {'at step ' + str(args.step) if args.step is not None else ''} in {run}/checkpoints"
                       f" (have: {ckpt.all_steps()})")
    try:
        params, _ = ckpt.restore_params(step, params)
    except CheckpointUnreadable as e:
        raise CliError(str(e)) from None
    out = save_pretrained(nnx.merge(graphdef, params), args.out, dtype=jnp.dtype(args.dtype) if args.dtype else None,
                          tokenizer_from=source)
    print(f"wrote step {step} of {run} to {out}")
    return 0
