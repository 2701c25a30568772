"""Building the pieces of a run from its config: processes, model path, data, rewards. (The learner's and
the samplers' decisions are the run plan's: ``realjax.rl.plan``.)"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from realjax import data as data_lib
from realjax.config import Config, ConfigError
from realjax.rewards import VerifierPool, load_reward_fn

DEMO_ASSET = Path(__file__).resolve().parents[1] / "assets" / "demo"


def init_distributed(cfg: Config) -> None:
    """Start multi-process JAX when configured (``distributed.*``) or when launched on a pod.

    Must run before anything touches a device. On CPU the collectives go through gloo.
    """
    d = cfg.distributed
    if jax.distributed.is_initialized():
        return
    if d.coordinator:
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=d.coordinator, num_processes=d.num_processes,
                                   process_id=d.process_id)
    elif d.auto and _on_multihost_cluster():
        jax.distributed.initialize()  # Cloud TPU pods and SLURM describe themselves to JAX


def _on_multihost_cluster() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def model_path(cfg: Config) -> Path | None:
    """The model directory; ``demo`` is the tiny Qwen2 shipped in the package. None when the run starts
    from random weights of ``model.preset`` (``model.path`` empty): device checks and benchmarks."""
    if not cfg.model.path:
        if not cfg.model.preset:
            raise ConfigError("model.path is empty and no model.preset is set: nothing to train")
        return None
    path = DEMO_ASSET if cfg.model.path == "demo" else Path(cfg.model.path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model.path: {cfg.model.path} is not a directory (a local HF model dir or 'demo')")
    return path


def build_reward_fn(cfg: Config):
    """(reward_fn(completions, rows) -> list[float], eval verifier(completions, ground_truths), close)."""
    r = cfg.reward
    pool = VerifierPool(num_workers=r.workers or None, timeout_s=r.timeout_s, require_think=r.require_think)

    def verifier(completions, ground_truths):
        return pool.score(completions, ground_truths)

    if r.fn == "math":
        def reward(completions, rows):
            return pool.score(completions, [row["ground_truth"] for row in rows])
    else:
        reward = load_reward_fn(r.fn)
    return reward, verifier, pool


def training_rows(cfg: Config, tokenizer):
    """Rendered training rows and the load/render report (checked against data.max_bad_fraction)."""
    rows, report = data_lib.load_rows(cfg.data.train)
    rows, report = data_lib.render_prompts(rows, tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens,
                                           chat_template=cfg.data.chat_template, report=report)
    report.check(cfg.data.max_bad_fraction)
    if len(rows) < cfg.rollout.prompts_per_step:
        raise ConfigError(f"data.train has {len(rows)} usable prompts, fewer than rollout.prompts_per_step="
                          f"{cfg.rollout.prompts_per_step}")
    return rows, report


def eval_sets(cfg: Config, tokenizer, train_rows) -> tuple[dict[str, list], list[str]]:
    """Held-out sets by name: rendered, limited, and without any prompt that is also a training prompt."""
    if not cfg.data.eval:
        return {}, []
    seen = {r["prompt_text"] for r in train_rows}
    sets, notes = {}, []
    for name, (rows, report) in data_lib.load_many(cfg.data.eval).items():
        rows, report = data_lib.render_prompts(rows, tokenizer, max_prompt_tokens=cfg.data.max_prompt_tokens,
                                               chat_template=cfg.data.chat_template, report=report)
        held_out = [r for r in rows if r["prompt_text"] not in seen]
        if len(held_out) < len(rows):
            notes.append(f"eval {name}: dropped {len(rows) - len(held_out)} problems that are also training prompts")
        if cfg.data.eval_limit:
            held_out = held_out[: cfg.data.eval_limit]
        notes.append(report.summary())
        if not held_out:
            raise ConfigError(f"data.eval: {name} has no usable held-out problems")
        sets[name] = held_out
    return sets, notes
