"""Checkpoints with orbax: parameters, optimizer state, and a JSON record of everything else a run needs
to continue exactly (step, seed, data position, counters).

The RNG needs no saved state: every step's key is ``fold_in(key(seed), step)``, so the seed and the step
reproduce it. Restores go straight to each array's sharding (the target carries it). Multi-host runs
write one checkpoint collectively (orbax coordinates the processes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a concrete pytree: the restore target."""
    def one(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


class Checkpointer:
    """Keep the last ``keep`` checkpoints of a run under ``directory``."""

    def __init__(self, directory: str | Path, *, keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict[str, Any]) -> None:
        """Write synchronously: a caller that saves and then exits (SIGTERM) must not lose it."""
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                                  meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, params_like, opt_state_like):
        """(params, opt_state, meta) of ``step``, placed like the given (abstract or concrete) trees."""
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_like(params_like)),
                                  opt_state=ocp.args.StandardRestore(abstract_like(opt_state_like)),
                                  meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out.params, out.opt_state, out.meta

    def restore_params(self, step: int, params_like):
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_like(params_like)),
                                  meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out.params, out.meta

    def close(self) -> None:
        self.manager.close()
