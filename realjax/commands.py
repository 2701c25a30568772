"""What the ``realjax`` sub-commands do (``realjax/cli.py`` only declares their arguments)."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

from realjax.cli import CliError


def demo_config_path() -> Path:
    """The demo config shipped inside the package (a copy of configs/demo.yaml)."""
    return Path(str(resources.files("realjax") / "configs" / "demo.yaml"))


def train(args) -> int:
    """`realjax train`: RL training from a YAML config (default: the demo) plus key=value overrides."""
    from realjax.preemption import STOP

    with STOP:  # before JAX is imported: a preemption while starting up must still exit 0
        return _train(args)


def _train(args) -> int:
    from realjax.checkpoint import CheckpointUnreadable
    from realjax.config import ConfigError, load_config
    from realjax.data import DataError
    from realjax.rl import TrainingDiverged
    from realjax.rl.trainer import Trainer
    from realjax.rundir import WriteFailed, write_failed
    from realjax.sharding import ShardingError

    try:
        try:
            cfg = load_config(args.config or demo_config_path(), args.overrides)
            trainer = Trainer(cfg)
        except (ConfigError, DataError, ShardingError) as e:
            raise CliError(str(e)) from None
        try:
            summary = trainer.run()
        except WriteFailed:
            raise
        except OSError as e:  # outside the checkpointer and the metrics writer (plots, export)
            failed = write_failed(e, cfg.run_dir)
            if failed is None:
                raise
            raise failed from e
    except (TrainingDiverged, CheckpointUnreadable, WriteFailed) as e:
        print(f"realjax train: error: {e}", file=sys.stderr)
        return 1
    if trainer.main and not summary.get("stopped"):
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    before, after = summary.get("pass@1_before"), summary.get("pass@1_after")
    steps, run, wall = summary["steps"], summary.get("steps_run", summary["steps"]), summary["wall_time_s"]
    if run == steps:
        lines = [f"done: {steps} RL steps in {wall:.0f} s"]
    else:  # a resumed run: what this invocation did, then the whole run
        lines = [f"done: {run} RL steps in {wall:.0f} s (resumed at step {summary['resumed_at']}); "
                 f"{steps} steps in {summary['total_wall_time_s']:.0f} s in all"]
    if before is not None and after is not None:
        lines.append(f"held-out pass@1: {before:.3f} -> {after:.3f} ({100 * (after - before):+.1f} points)")
    elif after is not None:
        lines.append(f"held-out pass@1: {after:.3f}")
    lines.append(f"run directory: {summary['run_dir']} (metrics.jsonl, tensorboard/, checkpoints/)")
    if summary.get("plots"):
        lines.append(f"training dynamics: {summary['plots']}")
    if summary.get("export"):
        lines.append(f"exported HF model: {summary['export']}")
    print("\n".join(lines), flush=True)


def export(args) -> int:
    """`realjax export`: restore a run's checkpoint and write it as an HF model directory (a LoRA run's
    merged; with ``--peft``, its adapters alone too)."""
    import jax.numpy as jnp
    from flax import nnx

    from realjax.checkpoint import CheckpointUnreadable, Checkpointer, base_identity, check_base
    from realjax.config import load_config
    from realjax.models import from_pretrained, save_pretrained
    from realjax.models import lora as lora_lib
    from realjax.rl.components import model_path

    run = Path(args.run)
    if not (run / "config.yaml").exists():
        raise CliError(f"{run} is not a run directory (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    source = model_path(cfg)
    lora = cfg.model.lora.model_config()
    if args.peft and lora is None:
        raise CliError(f"--peft: {run} trains every weight (model.lora.rank is 0): there are no adapters")
    model = from_pretrained(source, dtype=cfg.model.param_dtype, lora=lora)
    graphdef, state = nnx.split(model)
    params, frozen = lora_lib.split_policy(state, lora)
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
        from realjax.models.peft import save_peft_adapters

        print(f"wrote its adapters (PEFT layout) to {save_peft_adapters(policy, args.peft, base_model=str(source))}")
    return 0


def _read_prompts(args) -> list:
    """Prompts as chat messages (list) or raw text (str), from --prompt or a JSONL file."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise CliError("--prompt is empty")
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise CliError(f"prompt file {path} does not exist")
    prompts = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"{path}:{i}: not JSON ({e.msg})") from None
        item = obj.get("messages", obj.get("prompt")) if isinstance(obj, dict) else None
        if not item:
            raise CliError(f'{path}:{i}: expected an object with "prompt" (text) or "messages" (chat turns)')
        prompts.append(item)
    if not prompts:
        raise CliError(f"prompt file {path} holds no prompts")
    return prompts


def sample(args) -> int:
    """`realjax sample`: completions of a local HF model as JSONL."""
    from realjax.data import prompt_text
    from realjax.models import from_pretrained, load_tokenizer, stop_token_ids
    from realjax.models.config import resolve_dtype
    from realjax.sampling import Sampler, SamplingConfig, sample_ids

    prompts = _read_prompts(args)
    tok = load_tokenizer(args.model)
    model = from_pretrained(args.model, dtype=resolve_dtype(args.dtype))
    texts = []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
        texts.append(prompt_text(messages, tok, chat_template=not args.no_chat_template))
    ids = [tok(t, add_special_tokens=args.no_chat_template)["input_ids"] for t in texts]
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, stop_ids=stop_token_ids(args.model, tok))
    sampler = Sampler(cfg, pad_id=tok.pad_token_id)
    results = sample_ids(model, sampler, ids, n=args.n, seed=args.seed, prompts_per_batch=args.batch_prompts,
                         progress=True)
    out = open(args.output, "w") if args.output else None
    for text, samples in zip(texts, results):
        for s in samples:
            row = {"prompt": text, "completion": tok.decode(s["token_ids"], skip_special_tokens=True),
                   "token_ids": s["token_ids"], "logprobs": s["logprobs"], "finished": s["finished"]}
            if out:
                out.write(json.dumps(row) + "\n")
            else:
                print(row["completion"])
    if out:
        out.close()
        print(f"wrote {sum(len(r) for r in results)} completions to {args.output}")
    return 0


