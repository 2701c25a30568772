"""``realjax bench update --lengths NAME``: the learner on rollouts of realistic lengths, packed vs padded.

Response lengths come from the rollout bench's named distributions (``realjax.tools.bench.rollout``: ``r1-distill``
is R1-Distill-1.5B's in DeepScaleR's 8k stage), prompt lengths are uniform in [prompt / 2, prompt]. The
same update (REAL, tau 0.5, AdamW, one micro-batch) runs on the rows padded to ``prompt + response`` and
packed (``optim.tokens_per_micro_batch``; by default the batch's own real tokens), in interleaved rounds.

Reports real tokens per second for both (prompt and response tokens that exist, as the trainer's
``throughput/tokens_per_s`` counts them) and their ratio (target >= 1.6x with ``r1-distill``); the compute
bound of the real tokens alone (their FLOPs: every block weight on each input token, the LM head on each
scored token, causal attention within each row, at the rate of a large fp32 matmul measured in this run)
and each program's fraction of it; the FLOPs each program runs; and both losses (they must agree).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realjax import sharding as shd
from realjax.config import Config, DataSection, LossSection, OptimSection, RolloutSection, TrainerSection
from realjax.models import init_model
from realjax.rl.batch import UpdateBatch
from realjax.rl.plan import make_plan
from realjax.tools.bench.common import matmul_params, matmul_probe, update_flops
from realjax.tools.bench.rollout import oracle_lengths
from realjax.tools.bench.timing import compile_seconds, interleaved, median


def length_batch(cfg, *, rows: int, prompt: int, response: int, group_size: int, lengths: str, seed: int = 0):
    """A host ``UpdateBatch`` whose responses have oracle lengths and prompts uniform lengths in [prompt/2,
    prompt] (left-padded); every group holds a positive and a negative."""
    rng = np.random.default_rng(seed)
    resp_len = oracle_lengths(lengths, rows, response, seed=seed)
    prompt_len = rng.integers(max(prompt // 2, 1), prompt + 1, rows)
    pm = (np.arange(prompt)[None] >= prompt - prompt_len[:, None]).astype(np.int32)
    rm = (np.arange(response)[None] < resp_len[:, None]).astype(np.float32)
    old = (-np.log(cfg.vocab_size) + 0.05 * rng.standard_normal((rows, response))) * rm
    return UpdateBatch(prompt_ids_BQ=(rng.integers(0, cfg.vocab_size, (rows, prompt)) * pm).astype(np.int32),
                       prompt_mask_BQ=pm, tokens_BA=rng.integers(0, cfg.vocab_size, (rows, response)).astype(np.int32),
                       resp_mask_BA=rm, row_mask_B=np.ones(rows, np.float32), old_logp_BA=old.astype(np.float32),
                       rewards_B=(np.arange(rows) % group_size % 2 == 0).astype(np.float32))


def _attention_flops(cfg, lengths_sq: float) -> float:
    """Forward + backward FLOPs of attention's two products over sequences whose squared lengths sum to
    ``lengths_sq`` (3 x forward)."""
    return 3 * 2 * 2 * lengths_sq * cfg.num_heads * cfg.head_dim * cfg.num_layers


def real_token_flops(cfg, prompt_len: np.ndarray, resp_len: np.ndarray) -> float:
    """FLOPs no learner can avoid: block weights on each real input token, the LM head on each scored
    token, causal attention (half the square) within each row."""
    head = cfg.vocab_size * cfg.hidden_size
    blocks = matmul_params(cfg) - head
    n = (prompt_len + resp_len - 1) * (resp_len > 0)
    return 6 * blocks * n.sum() + 6 * head * resp_len.sum() + _attention_flops(cfg, (n.astype(float) ** 2).sum() / 2)


def packed_flops(cfg, sequences: int, seq_len: int) -> float:
    """FLOPs the packed program runs: every weight on every packed slot (the LM head included: it scores
    all slots, prompts too), attention's full square per sequence."""
    return 6 * matmul_params(cfg) * sequences * seq_len + _attention_flops(cfg, sequences * float(seq_len) ** 2)


def bench_packed_update(cfg, *, rows: int, prompt: int, response: int, group_size: int, lengths: str,
                        repeats: int, tokens_per_micro_batch: int = 0, lr: float = 1e-6) -> dict:
    host = length_batch(cfg, rows=rows, prompt=prompt, response=response, group_size=group_size, lengths=lengths)
    prompt_len, resp_len = host.prompt_mask_BQ.sum(1), host.resp_mask_BA.sum(1).astype(np.int64)
    budget = tokens_per_micro_batch or int(((prompt_len + resp_len - 1) * (resp_len > 0)).sum())
    model = init_model(cfg, seed=0)
    graphdef, params = nnx.split(model)

    def plan_for(tokens):
        run = Config(loss=LossSection(name="real", values=(("tau", 0.5),)), trainer=TrainerSection(steps=repeats + 1),
                     data=DataSection(max_prompt_tokens=prompt),
                     rollout=RolloutSection(group_size=group_size, prompts_per_step=rows // group_size,
                                            temperature=1.0, max_new_tokens=response),
                     optim=OptimSection(lr=lr, mini_batches=1, micro_batches=1, tokens_per_micro_batch=tokens))
        return make_plan(run, shd.make_mesh(None, jax.devices()[:1]), compute_dtype=cfg.dtype,
                         abstract_params=params, stop_ids=(0,))

    calls, compile_s, info = {}, {}, {}
    for name, tokens in (("padded", 0), ("packed", budget)):
        plan = plan_for(tokens)
        step = plan.update_step(graphdef)
        batch = jax.tree.map(jnp.asarray, plan.pack(host.cut(1)))
        carry = [plan.init_state(jax.tree.map(jnp.copy, params))]  # each contender its own (donated) state
        compile_s[name] = compile_seconds(step, carry[0], batch)
        if batch.packing is not None:
            info["sequences"], info["length"] = (int(n) for n in batch.packing.src_ZC.shape[1:])

        def call(step=step, carry=carry, batch=batch):
            t0 = time.perf_counter()
            carry[0], metrics = step(carry[0], batch)
            loss = float(jax.block_until_ready(metrics["loss"].value))
            return {"s": time.perf_counter() - t0, "loss": loss}

        calls[name] = call
    calls["matmul"] = matmul_probe(int(budget), cfg.hidden_size, cfg.intermediate_size, cfg.dtype)
    warm, rounds = interleaved(calls, repeats)
    real_tokens = int(prompt_len.sum() + resp_len.sum())
    t_pad, t_pack = median(rounds["padded"], "s"), median(rounds["packed"], "s")
    rate = median(rounds["matmul"], "matmul_gflop_s") * 1e9
    bound = real_token_flops(cfg, prompt_len, resp_len)
    z, C = info["sequences"], info["length"]  # the packed shape the plan chose (its length may exceed a row's)
    return {"config": f"{cfg.family} L={cfg.num_layers} D={cfg.hidden_size} V={cfg.vocab_size} {cfg.dtype}",
            "lengths": lengths, "rows": rows, "prompt": prompt, "response": response,
            "mean_response": float(resp_len.mean()), "real_tokens": real_tokens,
            "padded_tokens": rows * (prompt + response), "tokens_per_micro_batch": budget,
            "packed_sequences": z, "packed_seq_len": C, "packed_fill": float(budget / (z * C)),
            "padded_step_s": t_pad, "packed_step_s": t_pack,
            "padded_real_tok_s": real_tokens / t_pad, "packed_real_tok_s": real_tokens / t_pack,
            "ratio": median(range(len(rounds["padded"])),
                            lambda i: rounds["padded"][i]["s"] / rounds["packed"][i]["s"]),
            "matmul_gflop_s": rate / 1e9, "real_flops": bound, "bound_step_s": bound / rate,
            "padded_fraction_of_bound": bound / rate / t_pad, "packed_fraction_of_bound": bound / rate / t_pack,
            "padded_flops": update_flops(cfg, rows=rows, prompt=prompt, response=response),
            "packed_flops": packed_flops(cfg, z, C),
            "packed_flops_over_real": packed_flops(cfg, z, C) / bound,
            "loss_padded": warm["padded"]["loss"], "loss_packed": warm["packed"]["loss"],
            "compile_padded_s": compile_s["padded"], "compile_packed_s": compile_s["packed"],
            "jax_devices": len(jax.devices())}
