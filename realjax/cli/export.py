"""``realjax export``: a run's checkpoint as an HF safetensors model directory (a LoRA run's merged; with
``--peft``, its adapters alone too, in the PEFT layout)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from realjax.checkpoint import Checkpointer, CheckpointUnreadable, base_identity, check_base
from realjax.cli import CliError
from realjax.config import load_config
from realjax.models import from_pretrained, save_pretrained
from realjax.models import lora as lora_lib
from realjax.models.peft import save_peft_adapters
from realjax.rl.setup import model_path


def run(args) -> int:
    """`realjax export`: restore a run's checkpoint and write it as an HF model directory."""
    run = Path(args.run)
    if not (run / "config.yaml").exists():
        raise CliError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    source = model_path(cfg)
    lora = cfg.model.lora.model_config()
    if args.peft and lora is None:
        raise CliError(f"--peft: {run} trains every weight (model.lora.rank is 0): there are no adapters")
    model = from_pretrained(source, dtype=cfg.model.param_dtype, scan_layers=cfg.model.scan_layers,
                            lora=lora)  # the run's layout
    graphdef, state = nnx.split(model)
    params, frozen = lora_lib.split_policy(state, lora)  # LoRA: the checkpoint holds the adapters only
    ckpt = Checkpointer(run / "checkpoints")
    step = args.step if args.step is not None else ckpt.latest_step()
    if step is None or step not in ckpt.all_steps():
        raise CliError(f"no checkpoint {'at step ' + str(args.step) if args.step is not None else ''} in {run}/checkpoints"
                       f" (have: {ckpt.all_steps()})")
    try:
        params, meta = ckpt.restore_params(step, params)
        check_base(meta, None if lora is None else base_identity(source, model.cfg, cfg), step)
    except CheckpointUnreadable as e:
        raise CliError(str(e)) from None
    policy = lora_lib.merge_policy(graphdef, params, frozen)
    out = save_pretrained(policy, args.out, dtype=jnp.dtype(args.dtype) if args.dtype else None,
                          tokenizer_from=source)
    print(f"wrote step {step} of {run} to {out}" + (" (adapters merged)" if lora else ""))
    if args.peft:
        print(f"wrote its adapters (PEFT layout) to {save_peft_adapters(policy, args.peft, base_model=str(source))}")
    return 0
