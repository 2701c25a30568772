"""``realjax bench update``: one REAL update (forward, backward, clip, AdamW) vs the same step in torch, and
vs the compute bound (the step's FLOPs at a matmul rate measured in the same run)."""

from __future__ import annotations

import contextlib
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realjax import sharding as shd
from realjax.config import Config, LossSection, OptimSection, RolloutSection, TrainerSection
from realjax.models import init_model
from realjax.rl.batch import UpdateBatch
from realjax.rl.plan import make_plan
from realjax.tools.bench.common import hf_copy, matmul_probe, torch_name, torch_threads, update_flops
from realjax.tools.bench.timing import compile_seconds, interleaved, median


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
    import torch  # lazy: torch only for the baseline

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
    model = init_model(cfg, seed=0)
    batch = update_batch(cfg, rows=rows, prompt=prompt, response=response, group_size=group_size)
    with contextlib.ExitStack() as stack:
        calls = {}
        if baseline:  # first: the realjax step donates (so consumes) the weights the torch copy is made of
            calls["baseline"] = _torch_update(stack.enter_context(hf_copy(model)), batch, group_size=group_size, lr=lr)
        # The trainer's own update program, from a run plan: REAL (tau 0.5), one update of one micro-batch.
        run = Config(loss=LossSection(name="real", values=(("tau", 0.5),)), trainer=TrainerSection(steps=repeats + 1),
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
        res.update(baseline=torch_name("transformers Qwen2 + REAL in torch + torch.optim.AdamW"),
                   baseline_tok_s=tokens / tb, baseline_step_s=tb, loss_torch=warm["baseline"]["loss"],
                   ratio=median(idx, lambda i: rounds["baseline"][i]["s"] / rounds["realjax"][i]["s"]),
                   torch_threads=torch_threads())
        if bound:  # the largest ratio any implementation could reach: the baseline's time over the bound
            res.update(baseline_fraction_of_bound=res["bound_step_s"] / tb, ratio_at_bound=tb / res["bound_step_s"])
    return res


def _torch_update(hf, batch: dict, *, group_size: int, lr: float):
    """The same update in torch (forward, REAL, backward, clip 1.0, AdamW) as one interleaved contender."""
    import torch  # lazy: torch only for the baseline

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


