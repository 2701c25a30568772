"""``realjax train``: RL training from a YAML config (default: the demo) plus key=value overrides."""

from __future__ import annotations

import sys

from realjax.cli import CliError
from realjax.preemption import STOP


def run(args) -> int:
    with STOP:  # before JAX is imported: a preemption while starting up must still exit 0
        return _train(args)


def _train(args) -> int:
    # Imported here, inside STOP: these load JAX, and a preemption while it loads must still exit 0.
    from realjax.checkpoint import CheckpointUnreadable
    from realjax.config import ConfigError, demo_config_path, load_config
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
