"""Benchmarks whose baselines run in the same process: ``realjax bench sampler|update|rl-step|gpu``
(and ``rollout``, in ``realjax.bench_rollout``).

Every time is the median of ``--repeats`` calls after one warm-up call; the warm-up's extra time (the
compile) is reported apart as ``compile_s``. Each benchmark prints a table, or with ``--json`` one JSON
line (anything else the run prints goes to stderr). Targets are documented, never asserted: a shared CPU
is noisy, so each report carries the load average it ran under.

* ``sampler``: new tokens/s of realjax's Sampler vs transformers ``generate`` (torch, KV cache, greedy)
  on the same weights (target >= 4x), and vs the memory-bandwidth bound: a decode step must read every
  weight once plus the KV cache, at the bandwidth of a large fp32 matrix-vector product measured in this
  run (the operation decode is made of), so ``bound_tok_s = batch * bandwidth / bytes_per_step``
  (target >= 80%).
* ``update``: tokens/s of one REAL update (forward, backward, clip, AdamW) vs the same step in torch
  (transformers Qwen2 + REAL written in torch + torch.optim.AdamW; target >= 1.5x), and vs the compute
  bound: the step's FLOPs (``update_flops``) at the rate of a large fp32 matmul measured in this run.
  With ``--lengths`` (``realjax.bench_packing``): rows of realistic lengths, packed vs padded.
* ``rl-step``: whole RL steps of a config (default: the demo) through ``Trainer``; the split of a step
  from its ``time/*`` metrics (target: verifier + host < 10% of a step).
* ``gpu``: the card's copy bandwidth and bf16 matmul rate; batch-1 decode of the 1.5B preset vs the HBM
  roofline (target >= 70%); learner MFU at 8k tokens (one update: bf16 compute, fp32 params, full remat),
  ``6 * params * tokens / time / matmul rate`` counting matmul parameters only (an untied input embedding
  is a gather) and the LM head only on the response tokens it scores (target >= 45%).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from realjax.bench_timing import compile_seconds, interleaved, median, seconds, timed

# The bench's own smoke-test size: every code path of every benchmark in seconds on a CPU.
TINY = {"family": "qwen2", "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 16, "intermediate_size": 128, "rope_theta": 1e6, "tie_word_embeddings": True}


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------
def model_config(name: str, *, layers: int = 0, dtype: str = "float32", param_dtype: str | None = None):
    """A preset (or ``tiny``) with ``layers`` blocks (0 = as published) and the given dtypes."""
    from realjax.models import ModelConfig, preset

    cfg = ModelConfig(**TINY) if name == "tiny" else preset(name)
    if layers:
        cfg = cfg.replace(num_layers=layers)
    return cfg.replace(dtype=dtype, param_dtype=param_dtype or dtype)


def machine() -> dict:
    """Where the numbers came from: backend, devices, cores and the load when the run started."""
    import jax

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "cpu_cores": os.cpu_count(), "load_avg_1m": round(load, 2)}


def decode_bytes_per_step(cfg, batch: int, cache_len: float) -> float:
    """Bytes one decode step must read: every weight once as stored (an untied input embedding only for
    the ``batch`` rows it gathers) plus the K and V caches of all layers up to ``cache_len`` slots."""
    import jax.numpy as jnp

    n = cfg.num_params()
    if not cfg.tie_word_embeddings:
        n -= (cfg.vocab_size - batch) * cfg.hidden_size
    kv = 2 * cfg.num_layers * batch * cache_len * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    return n * jnp.dtype(cfg.param_dtype).itemsize + kv


def matmul_params(cfg) -> int:
    """Parameters that take part in a matmul (an untied input embedding is a gather, not a matmul)."""
    return cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)


def matvec_probe(rows: int, dim: int, mbytes: float, calls: int = 3):
    """A function measuring the GB/s at which ``x[rows, dim] @ W`` reads an fp32 W of about ``mbytes`` MB:
    the operation every decode step is made of (not an elementwise copy, which streams differently).
    Both weight layouts of decode are measured, [dim, out] contracted on its first axis like the block
    weights and [out, dim] on its last like a tied LM head; the faster sets the bound. Each probe returns
    the median of ``calls`` products per layout."""
    import jax
    import jax.numpy as jnp

    out = max(1, int(mbytes * 2**20 / 4 / dim))
    x = jnp.full((rows, dim), 0.5, jnp.float32)
    layouts = {name: (jnp.full(shape, 0.01, jnp.float32), jax.jit(lambda x, w, spec=spec: jnp.einsum(spec, x, w)))
               for name, shape, spec in (("in_out", (dim, out), "bd,do->bo"), ("out_in", (out, dim), "bd,od->bo"))}

    def probe() -> dict:
        res = {}
        for name, (w, f) in layouts.items():
            t = np.median([seconds(lambda f=f, w=w: f(x, w).block_until_ready()) for _ in range(calls)])
            res[f"bandwidth_{name}_gb_s"] = w.nbytes / t / 1e9
        res["bandwidth_gb_s"] = max(res.values())
        return res

    probe.matrix_mb = out * dim * 4 / 2**20
    return probe


def matmul_probe(m: int, k: int, n: int, dtype: str = "float32", calls: int = 3):
    """A function measuring the FLOP/s of ``x[m, k] @ w[k, n]`` (median of ``calls``): the rate of the
    large matmuls an update is made of, measured next to it (the bound on the update's speed)."""
    import jax
    import jax.numpy as jnp

    x, w = jnp.full((m, k), 0.5, dtype), jnp.full((k, n), 0.01, dtype)
    f = jax.jit(lambda x, w: x @ w)
    f(x, w).block_until_ready()

    def probe() -> dict:
        t = np.median([seconds(lambda: f(x, w).block_until_ready()) for _ in range(calls)])
        return {"matmul_gflop_s": 2 * m * k * n / t / 1e9}

    return probe


def update_flops(cfg, *, rows: int, prompt: int, response: int) -> float:
    """FLOPs of one update (forward + backward = 6 per weight per token): every block weight on all
    ``prompt + response - 1`` input positions, the LM head on the ``response`` positions it scores, and
    attention's two [T, T] products (computed in full, masked, as the model does)."""
    T = prompt + response - 1
    head = cfg.vocab_size * cfg.hidden_size
    blocks = matmul_params(cfg) - head
    attention = 2 * 2 * T * T * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return 6 * blocks * rows * T + 6 * head * rows * response + 3 * rows * attention


@contextlib.contextmanager
def hf_copy(model):
    """The realjax model as a transformers model on the same weights (fp32 torch, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    from realjax.models import save_pretrained

    with tempfile.TemporaryDirectory(prefix="realjax-bench-") as d:
        save_pretrained(model, d)
        yield AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def report(title: str, result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"bench": title, **result}, default=float), flush=True)
        return
    width = max(map(len, result))
    print(f"realjax bench {title}")
    for k, v in result.items():
        print(f"  {k:<{width}}  {_fmt(v)}")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------------
# sampler: realjax Sampler vs transformers generate vs the bandwidth bound
# ----------------------------------------------------------------------------------------------------
def bench_sampler(cfg, *, batch: int, prompt: int, new: int, repeats: int, baseline: bool = True,
                  bandwidth_mb: float = 512) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from realjax.models import init_model
    from realjax.sampling import Sampler, SamplingConfig

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
        res.update(baseline=_torch_name("transformers generate"),
                   baseline_tok_s=batch * new / median(rounds["baseline"], "total"),
                   ratio=median(range(len(rj)), lambda i: rounds["baseline"][i]["total"] / rj[i]["total"]),
                   torch_threads=_torch_threads(),
                   # same weights, greedy: the first tokens agree (random weights give near-ties later on)
                   first_token_agreement=float(np.mean(got[:, 0] == np.asarray(outputs[-1].tokens)[:, 0])))
    return res


def _hf_generate(hf, ids_BT, new: int):
    """transformers ``generate`` (torch CPU, KV cache, greedy, EOS off) as one interleaved contender."""
    import torch

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


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _torch_name(what: str) -> str:
    import torch
    import transformers

    return f"{what}: torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------------------------------
# update: one REAL step in realjax vs the same step in torch
# ----------------------------------------------------------------------------------------------------
def update_batch(cfg, *, rows: int, prompt: int, response: int, group_size: int, seed: int = 0) -> dict:
    """A full-length rollout batch [rows, ...] whose groups all hold a positive and a negative."""
    rng = np.random.default_rng(seed)
    return {"prompt_ids": rng.integers(0, cfg.vocab_size, (rows, prompt)).astype(np.int32),
            "prompt_mask": np.ones((rows, prompt), np.int32),
            "tokens": rng.integers(0, cfg.vocab_size, (rows, response)).astype(np.int32),
            "resp_mask": np.ones((rows, response), np.float32),
            "old_logp": (-math.log(cfg.vocab_size) + 0.05 * rng.standard_normal((rows, response))).astype(np.float32),
            "rewards": (np.arange(rows) % group_size % 2 == 0).astype(np.float32)}


def torch_real_loss(logp_BT, old_logp_BT, mask_BT, rewards_B, *, group_size: int, tau: float):
    """REAL in torch (the baseline's loss): ``s`` = mean over response tokens of ``logp - old_logp``;
    per group ``log(1 + sum_pos e^{-s/tau}) + log(1 + sum_neg e^{s/tau})``; degenerate groups 0."""
    import torch

    s_PR = ((mask_BT * (logp_BT - old_logp_BT)).sum(-1) / mask_BT.sum(-1).clamp(min=1.0)).view(-1, group_size)
    r_PR = rewards_B.view(-1, group_size)
    pos_PR, neg_PR = r_PR == 1, r_PR == 0

    def log1p_sum_exp(x_PR, m_PR):  # the anchor logit 0 joins the logsumexp: exact 0 on an empty set
        x_PR = torch.where(m_PR, x_PR, torch.full_like(x_PR, -math.inf))
        return torch.logsumexp(torch.cat([torch.zeros_like(x_PR[:, :1]), x_PR], -1), -1)

    per_group = log1p_sum_exp(-s_PR / tau, pos_PR) + log1p_sum_exp(s_PR / tau, neg_PR)
    valid_P = pos_PR.any(-1) & neg_PR.any(-1)
    return (per_group * valid_P).sum() / s_PR.shape[0]


def bench_update(cfg, *, rows: int, prompt: int, response: int, group_size: int, repeats: int,
                 baseline: bool = True, lr: float = 1e-6, bound: bool = True) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from realjax import sharding as shd
    from realjax.config import Config, LossSection, OptimSection, RolloutSection, TrainerSection
    from realjax.models import init_model
    from realjax.rl.batch import UpdateBatch
    from realjax.rl.plan import make_plan

    model = init_model(cfg, seed=0)
    batch = update_batch(cfg, rows=rows, prompt=prompt, response=response, group_size=group_size)
    with contextlib.ExitStack() as stack:
        calls = {}
        if baseline:  # first: the realjax step donates (so consumes) the weights the torch copy is made of
            calls["baseline"] = _torch_update(stack.enter_context(hf_copy(model)), batch, group_size=group_size, lr=lr)
        # The trainer's own update program, from a run plan: REAL (tau 0.5), one update of one micro-batch.
        run = Config(loss=LossSection(name="real", tau=0.5), trainer=TrainerSection(steps=repeats + 1),
                     rollout=RolloutSection(group_size=group_size, prompts_per_step=rows // group_size,
                                            temperature=1.0, max_new_tokens=response),
                     optim=OptimSection(lr=lr, mini_batches=1, micro_batches=1))
        graphdef, params = nnx.split(model)
        plan = make_plan(run, shd.make_mesh(None, jax.devices()[:1]), compute_dtype=cfg.dtype, abstract_params=params,
                         stop_ids=(0,))
        step = plan.update_step(graphdef)
        carry = [plan.init_state(params)]
        batch_j = jax.tree.map(lambda x: jnp.asarray(x)[None], UpdateBatch(  # one micro-batch
            prompt_ids_BQ=batch["prompt_ids"], prompt_mask_BQ=batch["prompt_mask"], tokens_BA=batch["tokens"],
            resp_mask_BA=batch["resp_mask"], row_mask_B=np.ones(rows, np.float32), old_logp_BA=batch["old_logp"],
            rewards_B=batch["rewards"]))
        compile_s = compile_seconds(step, *carry, batch_j)

        def realjax_call():
            t0 = time.perf_counter()
            carry[0], metrics = step(carry[0], batch_j)
            loss = float(jax.block_until_ready(metrics["loss"].value))
            return {"s": time.perf_counter() - t0, "loss": loss}

        calls = {"realjax": realjax_call, **calls}
        if bound:  # the MLP's up-projection over every token: the step's typical large matmul
            calls["matmul"] = matmul_probe(rows * (prompt + response - 1), cfg.hidden_size, cfg.intermediate_size,
                                           cfg.dtype)
        warm, rounds = interleaved(calls, repeats)
    tokens = rows * (prompt + response)
    t = median(rounds["realjax"], "s")
    res = {"config": f"{cfg.family} L={cfg.num_layers} D={cfg.hidden_size} V={cfg.vocab_size} {cfg.dtype}",
           "rows": rows, "tokens_per_row": prompt + response, "group_size": group_size,
           "realjax_tok_s": tokens / t, "realjax_step_s": t, "compile_s": compile_s,
           "loss_realjax": warm["realjax"]["loss"], "jax_devices": len(jax.devices())}
    if bound:
        flops = update_flops(cfg, rows=rows, prompt=prompt, response=response)
        rate = median(rounds["matmul"], "matmul_gflop_s") * 1e9
        res.update(flops_per_step=flops, matmul_gflop_s=rate / 1e9, bound_step_s=flops / rate,
                   fraction_of_bound=flops / rate / t)
    if baseline:
        tb = median(rounds["baseline"], "s")
        idx = range(len(rounds["realjax"]))
        res.update(baseline=_torch_name("transformers Qwen2 + REAL in torch + torch.optim.AdamW"),
                   baseline_tok_s=tokens / tb, baseline_step_s=tb, loss_torch=warm["baseline"]["loss"],
                   ratio=median(idx, lambda i: rounds["baseline"][i]["s"] / rounds["realjax"][i]["s"]),
                   torch_threads=_torch_threads())
        if bound:  # the largest ratio any implementation could reach: the baseline's time over the bound
            res.update(baseline_fraction_of_bound=res["bound_step_s"] / tb, ratio_at_bound=tb / res["bound_step_s"])
    return res


def _torch_update(hf, batch: dict, *, group_size: int, lr: float):
    """The same update in torch (forward, REAL, backward, clip 1.0, AdamW) as one interleaved contender."""
    import torch

    N = batch["tokens"].shape[1]
    b = {k: torch.from_numpy(v) for k, v in batch.items()}
    ids = torch.cat([b["prompt_ids"], b["tokens"][:, :-1]], 1).long()
    mask = torch.cat([b["prompt_mask"], b["resp_mask"][:, :-1].int()], 1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    targets = b["tokens"].long()[..., None]
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def call():
        t0 = time.perf_counter()
        # logits only where response tokens are predicted: the last N of the Tp + N - 1 positions
        logits = hf(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=N).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets)[..., 0]
        loss = torch_real_loss(logp, b["old_logp"], b["resp_mask"], b["rewards"], group_size=group_size, tau=0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        return {"s": time.perf_counter() - t0, "loss": float(loss.detach())}

    return call


# ----------------------------------------------------------------------------------------------------
# rl-step: the split of whole RL steps
# ----------------------------------------------------------------------------------------------------
_PHASES = ("rollout", "verifier", "scoring", "update", "host")


def bench_rl_step(config: str | None, *, steps: int, overrides: list[str] = ()) -> dict:
    from realjax.commands import demo_config_path
    from realjax.config import load_config
    from realjax.rl.trainer import Trainer

    if steps < 2:
        raise ValueError("--steps must be >= 2: the first step includes the compiles and is left out")
    with tempfile.TemporaryDirectory(prefix="realjax-bench-") as out:
        fixed = [f"output_dir={out}", "name=bench", f"trainer.steps={steps}", "trainer.eval_every=0",
                 "eval.before=false", "data.eval=", "trainer.export=false", f"trainer.save_every={10**9}",
                 "trainer.log_every=1", "logging.progress=false", "logging.tensorboard=false", "logging.wandb=false"]
        cfg = load_config(config or demo_config_path(), [*overrides, *fixed])  # the bench's settings win
        t0 = time.perf_counter()
        Trainer(cfg).run()
        wall = time.perf_counter() - t0
        lines = (Path(out) / "bench" / "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if "time/step" in r]
    later = rows[1:]
    res = {"config": str(config or "demo"), "steps": len(rows), "first_step_s": rows[0]["time/step"],
           "step_s": median(later, "time/step"),
           "step_times_s": [round(r["time/step"], 3) for r in rows]}  # a slow later step is a recompile
    for p in _PHASES:
        res[f"{p}_s"] = median(later, lambda r, p=p: r.get(f"time/{p}", 0.0))
    total = sum(r["time/step"] for r in later)
    for p in _PHASES:
        res[f"{p}_fraction"] = sum(r.get(f"time/{p}", 0.0) for r in later) / total
    res["verifier_and_host_fraction"] = res["verifier_fraction"] + res["host_fraction"]
    res["wall_s"] = wall
    return res


# ----------------------------------------------------------------------------------------------------
# gpu: the card's roofline, batch-1 decode against it, learner MFU
# ----------------------------------------------------------------------------------------------------
def copy_bandwidth(mbytes: float, repeats: int = 10) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((int(mbytes * 2**20 / 4),), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)  # a fresh output buffer: one read and one write of every byte
    _, t = timed(lambda: f(x).block_until_ready(), repeats)
    return 2 * x.nbytes / t / 1e9


def matmul_rate(n: int, repeats: int = 10, dtype: str = "bfloat16", chain: int = 10) -> float:
    """FLOP/s of [n, n] @ [n, n] matmuls in ``dtype`` (fp32 accumulation), ``chain`` dependent ones per call
    so launch and sync overheads do not count (a lower rate would flatter the MFU)."""
    import jax
    import jax.numpy as jnp

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


# ----------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------
def main(args) -> int:
    import jax

    if args.bench == "gpu" and jax.default_backend() != "gpu" and not args.allow_cpu:
        print(f"realjax bench gpu: needs a GPU (the JAX backend here is {jax.default_backend()!r}); "
              "run it on a GPU machine", file=sys.stderr)
        return 2
    info = machine()
    with contextlib.redirect_stdout(sys.stderr):  # only the report goes to stdout
        if args.bench == "sampler":
            res = bench_sampler(model_config(args.preset, layers=args.layers), batch=args.batch, prompt=args.prompt,
                                new=args.new, repeats=args.repeats, baseline=not args.no_baseline,
                                bandwidth_mb=args.bandwidth_mb)
        elif args.bench == "update" and args.lengths:
            from realjax.bench_packing import bench_packed_update

            res = bench_packed_update(model_config(args.preset, layers=args.layers), rows=args.rows,
                                      prompt=args.prompt, response=args.response, group_size=args.group_size,
                                      lengths=args.lengths, repeats=args.repeats,
                                      tokens_per_micro_batch=args.tokens_per_micro_batch)
        elif args.bench == "update":
            res = bench_update(model_config(args.preset, layers=args.layers), rows=args.rows, prompt=args.prompt,
                               response=args.response, group_size=args.group_size, repeats=args.repeats,
                               baseline=not args.no_baseline)
        elif args.bench == "rollout":
            from realjax.bench_rollout import bench_rollout

            res = bench_rollout(model_config(args.preset, layers=args.layers), rows=args.rows,
                                group_size=args.group_size, prompt=args.prompt, new=args.new, lengths=args.lengths,
                                slots=args.slots, compact_every=args.compact_every,
                                window_tokens=args.window_tokens, temperature=args.temperature,
                                repeats=args.repeats)
        elif args.bench == "rl-step":
            res = bench_rl_step(args.config, steps=args.steps, overrides=args.overrides)
        else:
            res = bench_gpu(model_config(args.preset, layers=args.layers), prompt=args.prompt, new=args.new,
                            tokens=args.tokens, seq=args.seq, copy_mb=args.copy_mb, matmul_n=args.matmul_n,
                            repeats=args.repeats, remat=args.remat)
    report(args.bench, {**res, **info, "load_avg_1m_end": round(os.getloadavg()[0], 2)}, args.json)
    return 0
