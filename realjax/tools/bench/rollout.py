"""``realjax bench rollout``: the static sampler vs the continuous-batching engine on realistic lengths.

Rollout lengths decide what a rollout costs: the static sampler runs every row until the longest ends,
the engine (``realjax.sampling.Engine``) only the live ones. Random weights never stop on their own, so
the bench draws each row's length from a named distribution (the *length oracle*: a per-row token
budget, ``budgets=`` of both samplers); every other code path is the real one, and the two runs must
produce the same tokens (``tokens_equal``).

* ``r1-distill``: lognormal with median 0.43 N and sigma 0.5, capped at N (mean ~0.47 N, ~4.5% of rows
  cut at N): R1-Distill-1.5B's responses in DeepScaleR's 8k stage.
* ``all-max``: every row runs N tokens (the bound ``realjax compile`` reports today).
* ``uniform``: uniform over [1, N].

Reports, for both in the same run (interleaved rounds): wall time and useful tokens/s; row-steps run
vs useful tokens (slot utilisation; the first token of each row, drawn from the prefill, counts as one
row-step); KV-cache bytes attention read vs the minimum (each live row reads its own prompt and tokens
once per step); and the engine's ratios to the static sampler. Targets (ISSUE 16; documented, never
asserted): with ``r1-distill``, utilisation >= 85%, >= 1.6x faster, KV bytes <= 1.3x the minimum;
with ``--slots`` = rows / 4, utilisation >= 80%. ``--vllm-python PATH`` adds vLLM on the same weights,
prompts and lengths (``realjax.tools.bench.vllm_baseline``): its useful tokens/s and the engine's ratio to it (target
>= 1.0x).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realjax.models import init_model
from realjax.sampling import Engine, Sampler, SamplingConfig, decode_windows
from realjax.tools.bench.timing import interleaved, median, seconds
from realjax.tools.bench.vllm_baseline import run_vllm

LENGTHS = ("r1-distill", "all-max", "uniform")


def oracle_lengths(name: str, rows: int, new: int, seed: int = 0) -> np.ndarray:
    """Per-row response lengths in [1, new] from the named distribution (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if name == "r1-distill":
        drawn = np.rint(0.43 * new * np.exp(0.5 * rng.standard_normal(rows)))
    elif name == "all-max":
        drawn = np.full(rows, new)
    elif name == "uniform":
        drawn = rng.integers(1, new + 1, rows)
    else:
        raise ValueError(f"unknown length distribution {name!r} (one of {', '.join(LENGTHS)})")
    return np.clip(drawn, 1, new).astype(np.int32)


def static_slots_read(lengths: np.ndarray, prompt: int, windows: tuple[int, ...]) -> int:
    """KV-cache slots the static sampler's attention reads: every row, every step until the longest row
    ends, over the window its step runs in (``decode_windows``)."""
    steps = np.arange(1, int(lengths.max()))  # decode step s writes slot prompt + s - 1
    bounds = np.asarray(windows)
    window_s = bounds[np.searchsorted(bounds, prompt + steps - 1, side="right")]
    return int(lengths.size * window_s.sum())


def minimum_slots_read(lengths: np.ndarray, prompt: int) -> int:
    """The least a decode can read: at step s a live row attends to its prompt and its s tokens."""
    n = lengths.astype(np.int64) - 1  # decode steps of each row
    return int(np.sum(n * prompt + n * (n + 1) // 2))


def step_cost(sampler: Sampler, graphdef, state, vocab: int, *, rows: int, prompt: int, steps: int, key,
              repeats: int, seed: int = 1) -> float:
    """Seconds per decode step of ``sampler`` at ``rows`` rows (early in the cache: its first window): a
    call that decodes ``1 + steps`` tokens per row minus one that decodes only the prefill's token,
    interleaved, median over ``repeats`` rounds."""
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (rows, prompt)), jnp.int32)
    mask = jnp.ones((rows, prompt), jnp.int32)

    def call(tokens):
        budgets = np.full(rows, tokens, np.int32)
        return lambda: {"s": seconds(lambda: jax.block_until_ready(
            sampler(graphdef, state, ids, mask, key, budgets=budgets).tokens))}

    _, rounds = interleaved({"short": call(1), "long": call(1 + steps)}, repeats)
    return median(range(len(rounds["long"])), lambda i: rounds["long"][i]["s"] - rounds["short"][i]["s"]) / steps


def bench_rollout(cfg, *, rows: int, group_size: int, prompt: int, new: int, lengths: str, slots: int,
                  compact_every: int, window_tokens: int, temperature: float, repeats: int, seed: int = 0,
                  top_p: float = 1.0, vllm_python: str | None = None) -> dict:
    if rows % group_size:
        raise ValueError(f"rows ({rows}) must be a multiple of group_size ({group_size})")
    model = init_model(cfg, seed=0)
    graphdef, state = nnx.split(model)
    P = rows // group_size
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (P, prompt)), jnp.int32)
    mask = jnp.ones((P, prompt), jnp.int32)
    budget_B = oracle_lengths(lengths, rows, new, seed)
    sampling = SamplingConfig(max_new_tokens=new, temperature=temperature, top_p=top_p, window_tokens=window_tokens)
    static = Sampler(sampling, pad_id=0)
    engine = Engine(sampling, pad_id=0, slots=slots, compact_every=compact_every)
    key, outputs = jax.random.key(seed), {}

    def run(name, sampler):
        def call():
            t0 = time.perf_counter()
            out = sampler(graphdef, state, ids, mask, key, group_size=group_size, budgets=budget_B)
            outputs[name] = jax.tree.map(np.asarray, jax.block_until_ready(out))
            return {"s": time.perf_counter() - t0}
        return call

    warm, rounds = interleaved({"static": run("static", static), "engine": run("engine", engine)}, repeats)
    if not (outputs["static"].lengths == budget_B).all():
        raise RuntimeError("a row ended before its oracle length: the bench needs rows that never stop")
    useful = int(budget_B.sum())
    kv_slot_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    least = minimum_slots_read(budget_B, prompt)
    static_steps = rows * int(budget_B.max())
    engine_steps = rows + engine.stats.row_steps
    static_kv = static_slots_read(budget_B, prompt, decode_windows(prompt, new, window_tokens))
    engine_kv = engine.stats.cache_slots_read
    s_static, s_engine = median(rounds["static"], "s"), median(rounds["engine"], "s")
    res = {
        "config": f"{cfg.family} L={cfg.num_layers} D={cfg.hidden_size} V={cfg.vocab_size} {cfg.dtype}",
        "lengths": lengths, "rows": rows, "group_size": group_size, "prompt": prompt, "new_tokens": new,
        "top_p": top_p, "slots": slots or rows, "compact_every": compact_every, "window_tokens": window_tokens,
        "mean_length": float(budget_B.mean()), "cut_at_max": float(np.mean(budget_B == new)),
        "useful_tokens": useful,
        "static_s": s_static, "engine_s": s_engine, "speedup": median(
            range(len(rounds["static"])), lambda i: rounds["static"][i]["s"] / rounds["engine"][i]["s"]),
        "static_tok_s": useful / s_static, "engine_tok_s": useful / s_engine,
        "static_row_steps": static_steps, "engine_row_steps": engine_steps,
        "static_utilisation": useful / static_steps, "engine_utilisation": useful / engine_steps,
        "kv_min_gb": least * kv_slot_bytes / 1e9,
        "static_kv_vs_min": static_kv / least, "engine_kv_vs_min": engine_kv / least,
        "engine_chunks": len(engine.stats.chunks), "engine_buckets": len({b for b, _, _ in engine.stats.chunks}),
        "engine_compiles": sum(engine.trace_counts.values()),
        "warmup_static_s": warm["static"]["s"], "warmup_engine_s": warm["engine"]["s"],
        "tokens_equal": bool((outputs["static"].tokens == outputs["engine"].tokens).all()),
        "rows_equal": float(np.mean((outputs["static"].tokens == outputs["engine"].tokens).all(axis=1))),
        "logprobs_max_diff": float(np.abs(outputs["static"].logprobs - outputs["engine"].logprobs).max()),
    }
    # The step-cost model (module docstring): both samplers priced at the same per-step cost.
    smallest = min(b for b, _, _ in engine.stats.chunks)
    probe = min(window_tokens, new - 1, 16)
    t_small, t_full = (step_cost(static, graphdef, state, cfg.vocab_size, rows=b, prompt=prompt, steps=probe, key=key,
                                 repeats=repeats) for b in (smallest, rows))
    per_row = (t_full - t_small) / max(rows - smallest, 1)
    fixed = t_small - smallest * per_row
    static_bound = (int(budget_B.max()) - 1) * t_full
    engine_bound = sum(steps * (fixed + b * per_row) for b, _, steps in engine.stats.chunks)
    res.update(step_fixed_ms=1e3 * fixed, step_per_row_ms=1e3 * per_row, speedup_bound=static_bound / engine_bound,
               speedup_of_bound=res["speedup"] * engine_bound / static_bound)
    if vllm_python:  # after realjax's rounds: the two never share the cores
        res.update(run_vllm(vllm_python, model, np.asarray(ids), budget_B, group_size=group_size,
                            temperature=temperature, top_p=top_p, repeats=repeats, seed=seed))
        res.update(engine_vs_vllm=res["engine_tok_s"] / res["vllm_tok_s"],
                   static_vs_vllm=res["static_tok_s"] / res["vllm_tok_s"])
    return res

