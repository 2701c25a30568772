"""``realjax bench gpu``: the card's copy bandwidth and bf16 matmul rate, batch-1 decode against the HBM
roofline, and learner MFU at 8k tokens."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from realjax.tools.bench.common import decode_bytes_per_step, update_flops
from realjax.tools.bench.sampler import bench_sampler
from realjax.tools.bench.timing import timed
from realjax.tools.bench.update import bench_update


def copy_bandwidth(mbytes: float, repeats: int = 10) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written)."""
    x = jnp.ones((int(mbytes * 2**20 / 4),), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)  # a fresh output buffer: one read and one write of every byte
    _, t = timed(lambda: f(x).block_until_ready(), repeats)
    return 2 * x.nbytes / t / 1e9


def matmul_rate(n: int, repeats: int = 10, dtype: str = "bfloat16", chain: int = 10) -> float:
    """FLOP/s of [n, n] @ [n, n] matmuls in ``dtype`` (fp32 accumulation), ``chain`` dependent ones per call
    so launch and sync overheads do not count (a lower rate would flatter the MFU)."""
    a = jnp.ones((n, n), dtype)

    def f(a):  # each product feeds the next, so none can be hoisted or skipped; 1/n keeps the values at 1
        step = lambda i, c: (jnp.matmul(c, a, preferred_element_type=jnp.float32) * (1.0 / n)).astype(dtype)
        return jax.lax.fori_loop(0, chain, step, a)

    f = jax.jit(f)
    _, t = timed(lambda: f(a).block_until_ready(), repeats)
    return 2 * n**3 * chain / t


def bench_gpu(cfg, *, prompt: int, new: int, tokens: int, seq: int, copy_mb: float, matmul_n: int,
              repeats: int, remat: str = "full") -> dict:
    res = {"config": f"{cfg.family} L={cfg.num_layers} D={cfg.hidden_size} V={cfg.vocab_size}"}
    # Each part's result is printed as it lands: a device session that runs out of time keeps those.
    res["copy_bandwidth_gb_s"] = bw = copy_bandwidth(copy_mb, repeats)
    print(f"bench gpu: copy bandwidth {bw:.0f} GB/s", file=sys.stderr, flush=True)
    res["matmul_tflop_s"] = rate = matmul_rate(matmul_n, repeats) / 1e12
    print(f"bench gpu: bf16 matmul {rate:.0f} TFLOP/s", file=sys.stderr, flush=True)
    dec_cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    dec = bench_sampler(dec_cfg, batch=1, prompt=prompt, new=new, repeats=repeats, baseline=False, bandwidth_mb=0)
    roofline = bw * 1e9 / decode_bytes_per_step(dec_cfg, 1, prompt + new / 2)
    res.update(decode_tok_s=dec["realjax_decode_tok_s"], decode_step_ms=dec["decode_step_ms"],
               decode_roofline_tok_s=roofline, decode_fraction=dec["realjax_decode_tok_s"] / roofline,
               decode_compile_s=dec["compile_s"])
    print(f"bench gpu: decode {res['decode_step_ms']:.2f} ms/token, {res['decode_fraction']:.0%} of the roofline",
          file=sys.stderr, flush=True)
    learn_cfg = cfg.replace(dtype="bfloat16", param_dtype="float32", remat=remat)
    rows, prompt_len = max(tokens // seq, 2), seq // 4
    upd = bench_update(learn_cfg, rows=rows, prompt=prompt_len, response=seq - prompt_len, group_size=rows,
                       repeats=repeats, baseline=False, bound=False)
    flops = update_flops(learn_cfg, rows=rows, prompt=prompt_len, response=seq - prompt_len)
    res.update(learner_tokens=rows * seq, learner_step_s=upd["realjax_step_s"], learner_tok_s=upd["realjax_tok_s"],
               mfu=flops / upd["realjax_step_s"] / (rate * 1e12), learner_compile_s=upd["compile_s"], remat=remat)
    return res


