"""Where metrics go: ``metrics.jsonl`` (one JSON object per line, with ``step``), TensorBoard events,
W&B when installed and enabled, and a progress bar. Only process 0 writes."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from realjax.rundir import atomic_write_text, writing


def _clean(value: Any):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Appends one row per ``log`` call; ``rows`` counts them, so a checkpoint can record how many rows
    it covers.

    A resumed run replays the steps after its checkpoint, so on start the writer keeps only the rows that
    checkpoint covers (``keep_rows``; 0 when there is no checkpoint, so a kill before the first checkpoint
    leaves nothing behind) and rebuilds the TensorBoard events from them: metrics.jsonl and TensorBoard
    then hold each row exactly once after any sequence of kills. ``keep_rows=None`` (a checkpoint written
    before rows were counted) keeps the rows up to ``start_step``.
    """

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "realjax", run_name: str = "run", config: dict | None = None,
                 progress: bool = True, total_steps: int = 0, start_step: int = 0, keep_rows: int | None = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rows = 0
        self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        with writing(self.path.parent):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = self._keep(keep_rows, start_step)
        self.rows = len(kept)
        if tensorboard:
            self._tb = _rebuilt_tensorboard(Path(run_dir) / "tensorboard", kept)
        if wandb:
            try:
                import wandb as wandb_lib  # lazy: optional, not a dependency
            except ImportError:
                print("realjax: logging.wandb is on but wandb is not installed; skipping W&B", file=sys.stderr)
            else:
                self._wandb = wandb_lib.init(project=wandb_project, name=run_name, config=config, resume="allow")
        if progress:
            from tqdm import tqdm  # lazy: only the progress bar needs it

            self._bar = tqdm(total=total_steps, initial=start_step, desc="RL steps", unit="step", dynamic_ncols=True)

    def _keep(self, keep_rows: int | None, start_step: int) -> list[dict]:
        """Cut metrics.jsonl to the rows a checkpoint covers (atomically) and return them."""
        text = self.path.read_text(errors="replace") if self.path.exists() else ""
        lines, rows = _complete_rows(text)
        if keep_rows is None:
            n = next((i for i, r in enumerate(rows) if r.get("step", 0) > start_step), len(rows))
        else:
            n = min(keep_rows, len(rows))
        if n < len(rows) or len(lines) > len(rows):
            atomic_write_text(self.path, "".join(lines[:n]))
        return rows[:n]

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _clean(v) if not isinstance(v, str) else v for k, v in metrics.items()}}
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows += 1
        numeric = _numeric(row)
        if self._tb is not None:
            _add_scalars(self._tb, row["step"], numeric)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        self._bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items() if _clean(v) is not None}, refresh=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Close every sink. Runs while a failure unwinds too (a full disk), so a sink that cannot flush
        is let go quietly: metrics.jsonl already holds every row and TensorBoard is rebuilt on resume."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            with contextlib.suppress(OSError):
                self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _complete_rows(text: str) -> tuple[list[str], list[dict]]:
    """(lines, rows): the rows are the leading lines that are whole JSON objects. A kill in the middle of
    a write leaves part of a line; nothing from there on is trusted."""
    lines = text.splitlines(keepends=True)
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict) or not line.endswith("\n"):
            break
        rows.append(row)
    return lines, rows


def _numeric(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, float)}


def _add_scalars(tb, step: int, numeric: dict[str, float]) -> None:
    for k, v in numeric.items():
        tb.add_scalar(k, v, step)


def _rebuilt_tensorboard(directory: Path, rows: list[dict]):
    """A SummaryWriter whose one event file holds ``rows`` and nothing else.

    Older event files are deleted: they may hold steps the resumed run is about to log again, and
    metrics.jsonl holds everything they did. (tensorboardX's ``purge_step`` would hide whole steps, and
    the final evaluation is re-logged at a step whose training row stays.)
    """
    from tensorboardX import SummaryWriter  # lazy: 5 s to import, and only when TensorBoard logging is on

    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("events.out.tfevents.*"):
            old.unlink()
        tb = SummaryWriter(str(directory))
        for row in rows:
            _add_scalars(tb, int(row.get("step", 0)), _numeric(row))
        tb.flush()
    return tb
