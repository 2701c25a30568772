"""Where metrics go: ``metrics.jsonl`` (one JSON object per line, with ``step``), TensorBoard events,
W&B when installed and enabled, and a progress bar. Only process 0 writes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def _clean(value: Any):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class MetricsWriter:
    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "realjax", run_name: str = "run", config: dict | None = None,
                 progress: bool = True, total_steps: int = 0, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                print("realjax: logging.wandb is on but wandb is not installed; skipping W&B", file=sys.stderr)
            else:
                self._wandb = wandb_lib.init(project=wandb_project, name=run_name, config=config, resume="allow")
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="RL steps", unit="step", dynamic_ncols=True)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run replays those steps)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _clean(v) if not isinstance(v, str) else v for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in row.items() if k != "step" and isinstance(v, float)}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
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
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
