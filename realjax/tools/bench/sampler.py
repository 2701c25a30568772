"""``realjax bench sampler``: realjax's Sampler vs transformers ``generate`` on the same weights, and vs the
memory-bandwidth bound measured in the same run."""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realjax.models import init_model
from realjax.sampling import Sampler, SamplingConfig
from realjax.tools.bench.common import decode_bytes_per_step, hf_copy, matvec_probe, torch_name, torch_threads
from realjax.tools.bench.timing import compile_seconds, interleaved, median


def bench_sampler(cfg, *, batch: int, prompt: int, new: int, repeats: int, baseline: bool = True,
                  bandwidth_mb: float = 512) -> dict:
    model = init_model(cfg, seed=0)
    graphdef, state = nnx.split(model)
    ids_BT = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    ids, mask = jnp.asarray(ids_BT), jnp.ones((batch, prompt), jnp.int32)
    # Greedy with no stop ids: every row generates all `new` tokens, in both implementations.
    sampler = Sampler(SamplingConfig(max_new_tokens=new, temperature=0.0), pad_id=0)
    key, outputs = jax.random.key(0), []

    def realjax_call():  # Sampler.__call__'s two programs, timed apart
        t0 = time.perf_counter()
        ds = jax.block_until_ready(sampler.prefill_program(graphdef, state, ids, mask, key, 1))
        t1 = time.perf_counter()
        outputs.append(jax.block_until_ready(sampler.finish(sampler.decode(graphdef, state, ds))))
        t2 = time.perf_counter()
        return {"prefill": t1 - t0, "decode": t2 - t1, "total": t2 - t0}

    compile_s = compile_seconds(sampler.prefill_program, graphdef, state, ids, mask, key, 1)
    ds = sampler.prefill_program(graphdef, state, ids, mask, key, 1)
    compile_s += sum(compile_seconds(sampler.decode_program, graphdef, state, sampler.with_window(ds, w))
                     for w in sampler.windows(ds))
    calls = {"realjax": realjax_call}
    if bandwidth_mb:
        calls["bandwidth"] = probe = matvec_probe(batch, cfg.hidden_size, bandwidth_mb)
    with contextlib.ExitStack() as stack:
        if baseline:
            calls["baseline"] = _hf_generate(stack.enter_context(hf_copy(model)), ids_BT, new)
        _, rounds = interleaved(calls, repeats)
    if not (np.asarray(outputs[-1].lengths) == new).all():
        raise RuntimeError("a row stopped early: the comparison needs every row to generate all tokens")
    rj = rounds["realjax"]
    res = {"config": f"{cfg.family} L={cfg.num_layers} D={cfg.hidden_size} V={cfg.vocab_size} {cfg.dtype}",
           "batch": batch, "prompt": prompt, "new_tokens": new,
           "realjax_tok_s": batch * new / median(rj, "total"),
           "realjax_decode_tok_s": batch * (new - 1) / median(rj, "decode"), "prefill_s": median(rj, "prefill"),
           "decode_step_ms": 1e3 * median(rj, "decode") / (new - 1), "compile_s": compile_s}
    if bandwidth_mb:
        step_bytes = decode_bytes_per_step(cfg, batch, prompt + new / 2)
        bound = lambda i: batch * rounds["bandwidth"][i]["bandwidth_gb_s"] * 1e9 / step_bytes
        idx = range(len(rj))
        res.update({k: median(rounds["bandwidth"], k) for k in rounds["bandwidth"][0]},
                   bandwidth_matrix_mb=probe.matrix_mb, bytes_per_step_mb=step_bytes / 2**20,
                   lm_head_share_of_bytes=cfg.vocab_size * cfg.hidden_size * jnp.dtype(cfg.param_dtype).itemsize / step_bytes,
                   bound_tok_s=float(np.median([bound(i) for i in idx])),
                   # round by round: the decode rate against the bandwidth measured next to it
                   fraction_of_bound=float(np.median([batch * (new - 1) / rj[i]["decode"] / bound(i) for i in idx])),
                   fraction_of_bound_end_to_end=float(np.median([batch * new / rj[i]["total"] / bound(i) for i in idx])))
    if baseline:
        got = rounds["baseline"][-1]["tokens"]
        res.update(baseline=torch_name("transformers generate"),
                   baseline_tok_s=batch * new / median(rounds["baseline"], "total"),
                   ratio=median(range(len(rj)), lambda i: rounds["baseline"][i]["total"] / rj[i]["total"]),
                   torch_threads=torch_threads(),
                   # same weights, greedy: the first tokens agree (random weights give near-ties later on)
                   first_token_agreement=float(np.mean(got[:, 0] == np.asarray(outputs[-1].tokens)[:, 0])))
    return res


def _hf_generate(hf, ids_BT, new: int):
    """transformers ``generate`` (torch CPU, KV cache, greedy, EOS off) as one interleaved contender."""
    import torch  # lazy: torch only for the baseline (--no-baseline runs without it)

    ids_t = torch.tensor(ids_BT, dtype=torch.long)

    def call():
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
        total = time.perf_counter() - t0
        tokens = out[:, ids_BT.shape[1]:].numpy()
        if tokens.shape != (ids_BT.shape[0], new):
            raise RuntimeError(f"transformers generated {tokens.shape}, expected {(ids_BT.shape[0], new)}")
        return {"total": total, "tokens": tokens}

    return call


