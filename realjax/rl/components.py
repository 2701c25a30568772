"""Building the pieces of a run from its config: processes, model path, data, rewards."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from realjax import data as data_lib
from realjax.config import Config, ConfigError

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


# -- learner decisions shared by Trainer and `realjax compile` (which must model the same programs) ------
def make_run_optimizer(cfg: Config):
    """AdamW of ``optim.*``; its schedule counts optimizer updates (``mini_batches`` per RL step)."""
    from realjax.rl.update import make_optimizer

    o = cfg.optim
    return make_optimizer(o.lr, weight_decay=o.weight_decay, grad_clip=o.grad_clip, b1=o.b1, b2=o.b2, eps=o.eps,
                          schedule=o.schedule, warmup_updates=o.warmup_steps * o.mini_batches,
                          total_updates=cfg.trainer.steps * o.mini_batches)


def uses_reference(cfg: Config) -> bool:
    """GRPO with a KL term keeps frozen reference weights and scores the batch under them."""
    return cfg.loss.name == "grpo" and cfg.loss.hparams().get("kl_coef", 0.0) > 0


def recomputes_old_logp(cfg: Config, compute_dtype: str) -> bool:
    """Whether one scoring pass recomputes old log-probs (``auto``: whenever compute is not fp32, where the
    sampler's incremental numbers differ from a full forward pass)."""
    mode = cfg.rollout.old_logp
    return mode == "recompute" or (mode == "auto" and compute_dtype != "float32")


def scoring_chunks(cfg: Config) -> int:
    """How many row chunks a scoring pass over the whole batch is cut into (one micro-batch's rows each)."""
    return cfg.optim.mini_batches * cfg.optim.micro_batches


def eval_prompts_per_call(cfg: Config) -> int:
    """Prompts per evaluation sampler call (``eval.n`` rows each)."""
    return cfg.eval.prompts_per_call or cfg.rollout.prompts_per_call or 8


def sampling_configs(cfg: Config, stop_ids: tuple[int, ...]):
    """The rollout's and the evaluation's ``SamplingConfig``."""
    from realjax.sampling import SamplingConfig

    r, e = cfg.rollout, cfg.eval
    rollout = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                             top_k=r.top_k, stop_ids=stop_ids, window_tokens=r.window_tokens)
    evaluation = SamplingConfig(max_new_tokens=e.max_new_tokens or r.max_new_tokens, temperature=e.temperature,
                                top_p=e.top_p, top_k=e.top_k, stop_ids=stop_ids, window_tokens=r.window_tokens)
    return rollout, evaluation


def build_reward_fn(cfg: Config):
    """(reward_fn(completions, rows) -> list[float], eval verifier(completions, ground_truths), close)."""
    from realjax.rewards import VerifierPool, load_reward_fn

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
