"""Checkpoints with orbax: parameters, optimizer state, and a JSON record of everything else a run needs
to continue exactly (step, seed, data position, counters, how many metrics rows the step covers).

The RNG needs no saved state: every step's key is ``fold_in(key(seed), step)``, so the seed and the step
reproduce it. Restores go straight to each array's sharding (the target carries it). Multi-host runs
write one checkpoint collectively (orbax coordinates the processes).

What survives what:

* A kill during a save leaves orbax's temporary directory, never a step: the previous checkpoints stand
  (orbax removes the leftover on the next start).
* A failed write (full disk, permissions) raises ``WriteFailed`` naming the file and the OS error; older
  checkpoints are only deleted (``keep``) after a newer one is complete, so the last good one stays.
* A LoRA run's checkpoint holds the adapters and their optimizer state, not the base weights: its record
  names the base (``base_identity``: path and a hash of its config and weight files), and a restore onto
  another base is refused (``BaseMismatch``) rather than resuming adapters on weights they were not
  trained on.
* A checkpoint written with the decoder's blocks as a list (``model.scan_layers=false``, or before scanned
  layers) restores into a scanned model, and the reverse: the restore reads the checkpoint's own tree and
  stacks or unstacks the blocks' weights and their optimizer moments (``realjax.checkpoint_layers``). A
  tree that matches the model in neither layout raises ``LayoutMismatch`` naming an array, and is not
  taken for damage (older checkpoints of the run are left alone).
* Every finished checkpoint gets a manifest of its files' sizes (``MANIFEST``). On restore a checkpoint
  with a missing, emptied or truncated file, or one orbax cannot read, is reported in one line and the
  next older one is used; the damaged directory is renamed ``<step>.damaged`` (kept for inspection, out
  of orbax's way: the resumed run will save that step again). ``CheckpointUnreadable`` when none is left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from realjax import checkpoint_layers as layers
from realjax.rundir import atomic_write_text, exception_chain, write_failed, writing

MANIFEST = "realjax_manifest.json"


class CheckpointUnreadable(RuntimeError):
    """A checkpoint (or every checkpoint of a run) cannot be read; ``str()`` is one line."""


class LayoutMismatch(CheckpointUnreadable):
    """A checkpoint's arrays are not the model's, in either block layout (another model, another LoRA)."""


class BaseMismatch(CheckpointUnreadable):
    """A LoRA checkpoint's adapters were trained on another base model than the run's."""


def base_identity(model_path, model_cfg, cfg) -> dict:
    """What identifies a LoRA run's frozen base: the model directory and a hash of its config.json and of
    each weight file's name, size and safetensors header (the tensor table; reading it is cheap), or, for
    random weights of a preset, the preset and the seed."""
    if model_path is None:
        return {"preset": cfg.model.preset, "seed": cfg.seed}
    root = Path(model_path).resolve()
    h = hashlib.sha256((root / "config.json").read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = fh.read(min(n, 1 << 26))
        h.update(f"{f.name}:{f.stat().st_size}:".encode() + header)
    return {"path": str(root), "sha256": h.hexdigest()}


def check_base(meta: dict, base: dict | None, step: int) -> None:
    """Raise ``BaseMismatch`` unless checkpoint ``meta`` was written for ``base`` (None: no LoRA)."""
    saved = meta.get("base")
    if saved == base or (saved and base and saved.get("sha256") and saved.get("sha256") == base.get("sha256")):
        return  # (the same files moved to another path are the same base)
    if base is None:
        raise BaseMismatch(f"checkpoint step {step} holds LoRA adapters (base {saved}), but model.lora is off")
    if saved is None:
        raise BaseMismatch(f"checkpoint step {step} holds no LoRA base record, but model.lora is on")
    raise BaseMismatch(f"checkpoint step {step} holds adapters for base {saved}, not for this run's base {base}")


@dataclasses.dataclass(frozen=True)
class Restored:
    """The newest readable checkpoint, and one line for each newer one that had to be skipped."""

    step: int
    params: Any
    opt_state: Any
    meta: dict
    skipped: tuple[str, ...] = ()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a concrete pytree: the restore target."""
    def one(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(one, tree)


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs each failed read or write from every worker thread with a traceback; the exception that
    follows carries the cause, which the caller reports in one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _stderr_kept_unless_failed():
    """Hold what is written to file descriptor 2 during the block; pass it on unless the block fails.

    When a write fails (a full disk), TensorStore's threads keep completing the other writes into
    orbax's closed event loop and print a traceback for each straight to fd 2 (hundreds of lines that
    bury the cause). Only a failed save drops them; its cause is raised and reported in one line.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    chunks: list[bytes] = []

    def drain():
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the reader sees the end
        os.close(saved)
        reader.join()
        os.close(read_end)
        if not failed and chunks:
            os.write(2, b"".join(chunks))


def _why(exc: BaseException, root: Path) -> str:
    """One line for an orbax/TensorStore read failure: the innermost message that names a file of the
    checkpoint, else the outermost message."""
    chain = list(exception_chain(exc))
    # A KeyError's str() is the repr of its message.
    texts = [str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e) for e in chain]
    first = [(e, (text.strip().splitlines() or [""])[0]) for e, text in zip(chain, texts)]
    named = [(e, line) for e, line in first if str(root) in line]
    e, line = (named or first)[-1 if named else 0]
    line = line if len(line) <= 300 else line[:297] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


class Checkpointer:
    """Keep the last ``keep`` checkpoints of a run under ``directory``."""

    def __init__(self, directory: str | Path, *, keep: int = 3):
        self.directory = Path(directory).absolute()
        # Synchronous: save() waits for the write anyway, and a failure then surfaces in save() itself
        # rather than in a background thread. A save cut short leaves a temporary directory, removed on
        # the next start.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                              enable_async_checkpointing=False)
        with writing(self.directory):
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- writing ---------------------------------------------------------------------------------------
    def save(self, step: int, params, opt_state, meta: dict[str, Any]) -> None:
        """Write synchronously: a caller that saves and then exits (SIGTERM) must not lose it."""
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                                  meta=ocp.args.JsonSave(meta))
        try:
            with _quiet_orbax(), _stderr_kept_unless_failed():
                self.manager.save(step, args=args, force=True)
                self.manager.wait_until_finished()
        except Exception as e:
            failed = write_failed(e, self.directory / str(step))
            if failed is None:
                raise
            # The failed save's orphaned asyncio tasks would each be reported again when collected.
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            last = self.latest_step()
            failed.context = f"checkpoint step {step} not written; " + (
                f"step {last} is intact: free space and rerun to resume" if last is not None else
                "there is no earlier checkpoint")
            raise failed from None  # the cause is in the message; orbax's thread stacks only bury it
        if jax.process_index() == 0:
            self._write_manifest(step)

    def _write_manifest(self, step: int) -> None:
        root = self.directory / str(step)
        sizes = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
        atomic_write_text(root / MANIFEST, json.dumps(sizes, indent=0))

    # -- reading ---------------------------------------------------------------------------------------
    def damage(self, step: int) -> str | None:
        """The first file of ``step`` that is missing or has another size than when it was written (one
        line), or None. A checkpoint without a readable manifest (older realjax, or a kill right after
        orbax finished) is left to orbax's own checks."""
        root = self.directory / str(step)
        try:
            sizes = json.loads((root / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        for name, size in sizes.items():
            path = root / name
            if not path.is_file():
                while not path.parent.exists():
                    path = path.parent
                return f"{path}: missing"
            actual = path.stat().st_size
            if actual != size:
                what = "empty" if actual == 0 else "truncated" if actual < size else "longer than written"
                return f"{path}: {what} ({actual} of {size} bytes)"
        return None

    def _read(self, step: int, **items):
        """(``{name: tree}`` for each item, meta) of ``step``, each tree placed and laid out like the given
        (abstract or concrete) one, whichever block layout the checkpoint holds."""
        root = self.directory / str(step)
        damage = self.damage(step)
        if damage:
            raise CheckpointUnreadable(f"checkpoint step {step} is damaged: {damage}")
        target = {name: abstract_like(like) for name, like in items.items()}
        read_as, mismatch = dict(target), None
        try:
            with _quiet_orbax():
                for name in items:
                    try:
                        saved = _tree(ocp.StandardCheckpointer().metadata(root / name))
                        read_as[name] = layers.saved_layout(saved, target[name])
                    except layers.LayoutMismatch as e:
                        # Tried as is all the same: a damaged tree record may hide readable arrays
                        mismatch = mismatch or e
                out = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore(), **{name: ocp.args.StandardRestore(t) for name, t in read_as.items()}))
        except Exception as e:
            if mismatch is not None and mismatch.saved_arrays:  # a readable record of other arrays: not damage
                raise LayoutMismatch(f"checkpoint step {step} ({root}) does not fit the model: {mismatch}") from None
            raise CheckpointUnreadable(f"checkpoint step {step} cannot be read ({root}): {_why(e, root)}") from e
        trees = {name: out[name] if read_as[name] is target[name] else layers.to_layout(out[name], target[name])
                 for name in items}
        return trees, out.meta

    def restore(self, step: int, params_like, opt_state_like):
        """(params, opt_state, meta) of ``step``, placed like the given (abstract or concrete) trees."""
        trees, meta = self._read(step, params=params_like, opt_state=opt_state_like)
        return trees["params"], trees["opt_state"], meta

    def restore_params(self, step: int, params_like):
        trees, meta = self._read(step, params=params_like)
        return trees["params"], meta

    def restore_latest(self, params_like, opt_state_like) -> Restored | None:
        """The newest checkpoint that reads, falling back past damaged ones; None when there is none.

        Raises ``CheckpointUnreadable`` (one line listing each failure) when no checkpoint reads.
        """
        steps = self.all_steps()
        skipped = []
        for step in reversed(steps):
            try:
                params, opt_state, meta = self.restore(step, params_like, opt_state_like)
            except LayoutMismatch:
                raise  # not damage: the older checkpoints hold the same arrays
            except CheckpointUnreadable as e:
                skipped.append(str(e))
                continue
            self._set_aside([s for s in steps if s > step])
            return Restored(step, params, opt_state, meta, tuple(skipped))
        if skipped:
            raise CheckpointUnreadable(f"no readable checkpoint in {self.directory}: " + "; ".join(skipped))
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Rename damaged steps to ``<step>.damaged`` (not a step name to orbax) so the run can save them
        again."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                src, dst = self.directory / str(step), self.directory / f"{step}.damaged"
                with writing(dst):
                    if dst.exists():
                        shutil.rmtree(dst)
                    os.replace(src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("realjax_checkpoint_set_aside")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()


def _tree(metadata):
    """The tree of an orbax metadata object (newer orbax wraps it), or the metadata itself."""
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)
