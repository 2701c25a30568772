"""The learner's updates under a length distribution: their FLOPs against those of the real tokens, part by
part, beside ``realjax compile``'s report (``update_under_lengths`` in its JSON, one line in its table).

The compiled update is priced at one packed shape; what an RL step runs depends on the rows' lengths. Here
the step's rows get response lengths from the named distribution (``realjax.tools.bench.rollout``'s
``oracle_lengths``) and prompt lengths uniform in [prompt / 2, prompt] (as ``realjax bench update
--lengths``), are cut as the trainer cuts them (mini-batches, micro-batches of whole groups) and planned by
the learner's own packing code (``realjax.rl.packing.plan_sequences``: first-fit decreasing, the sequence
buckets, groups moved between micro-batches). FLOPs by formula, forward + backward: 6 per matmul weight per
token; attention's two products ``12 N H L`` per (query, key) pair.

The real tokens' FLOPs (no learner can do less): every block weight on each real input token, the LM head
on each scored token, causal attention within each row (``n^2 / 2`` pairs). The packed update's, added one
cause at a time (each line of ``parts`` is what that cause adds, in FLOPs per RL step):

1. ``lm_head_on_every_slot``: the LM head scores every packed slot, prompt tokens included;
2. ``attention_whole_sequences``: attention runs over whole packed sequences, causal over all ``C`` tokens
   (splash skips the blocks above the diagonal; segment ids mask inside the blocks it computes, so two rows
   in one sequence cost ``C^2 / 2``, not the sum of their squares); XLA's attention (``model.attention=xla``)
   computes the full ``C^2``. Priced here on the sequences first-fit decreasing opens;
3. ``ffd_fill``: those sequences' empty slots (every weight runs on them);
4. ``bucket_rounding``: each micro-batch's count rounded up to its bucket (multiples of the data-parallel
   devices, then up a quarter at a time), with its attention;
5. ``largest_over_micro_batches``: every micro-batch of an update runs the largest of its micro-batches'
   buckets (one stacked program), with its attention.

``bound_attention_whole_sequences``: what parts 1-2 alone cost when every micro-batch packs into the fewest
sequences its tokens could fill (``ceil(tokens / C)``): the floor of whole-sequence attention at this ``C``.
"""

from __future__ import annotations

import numpy as np

from realjax.rl.packing import plan_sequences
from realjax.tools.bench.common import matmul_params
from realjax.tools.bench.rollout import oracle_lengths

PARTS = ("lm_head_on_every_slot", "attention_whole_sequences", "ffd_fill", "bucket_rounding",
         "largest_over_micro_batches")


def step_lengths(name: str, *, rows: int, prompt: int, response: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prompt [rows], response [rows]) real lengths of an RL step's rows, as ``realjax bench update``
    draws them."""
    rng = np.random.default_rng(seed)
    resp = oracle_lengths(name, rows, response, seed=seed).astype(np.int64)
    return rng.integers(max(prompt // 2, 1), prompt + 1, rows).astype(np.int64), resp


def update_under_lengths(model_cfg, name: str, *, rows: int, group_size: int, mini_batches: int, micro_batches: int,
                         prompt: int, response: int, tokens_per_micro_batch: int, multiple: int,
                         full_square: bool = False, move_groups: bool = True, seed: int = 0,
                         lengths: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """FLOPs per RL step of the updates over ``rows`` rows (one pass each), packed as the trainer packs them,
    against the real tokens' (module docstring). ``full_square``: attention computes the whole [C, C]
    square (XLA) rather than its causal half (splash). ``lengths``: (prompt, response) per row instead of
    the named distribution's draw. Returns plain numbers (JSON)."""
    if tokens_per_micro_batch <= 0:
        raise ValueError("the update is priced packed: tokens_per_micro_batch must be > 0")
    p_len, r_len = lengths if lengths is not None else step_lengths(name, rows=rows, prompt=prompt,
                                                                    response=response, seed=seed)
    C = prompt + response - 1
    n = (p_len + r_len - 1) * (r_len > 0)  # input tokens a row runs packed (row_lengths' count)
    head = model_cfg.vocab_size * model_cfg.hidden_size
    w_token, h_token = 6.0 * (matmul_params(model_cfg) - head), 6.0 * head
    pair = 12.0 * model_cfg.num_heads * model_cfg.head_dim * model_cfg.num_layers
    per_seq = pair * C * C * (1.0 if full_square else 0.5)

    updates, M = mini_batches, micro_batches
    B = rows // (updates * M)
    n_UMB = n.reshape(updates, M, B)
    ffd = bucket_own = shared = fewest = 0
    moved = 0
    for u in range(updates):
        plan = plan_sequences(n_UMB[u], C, tokens_per_micro_batch=tokens_per_micro_batch, multiple=multiple,
                              group_size=group_size if move_groups else 0)
        own = plan_sequences(n_UMB[u], C, tokens_per_micro_batch=tokens_per_micro_batch, multiple=multiple)
        ffd += int(plan.needed.sum())
        # each micro-batch's own bucket (what it would run alone), on the plan's micro-batches
        buckets = [plan_sequences(n_UMB[u].reshape(-1)[plan.order].reshape(M, B)[m:m + 1], C,
                                  tokens_per_micro_batch=tokens_per_micro_batch, multiple=multiple).sequences
                   for m in range(M)]
        bucket_own += int(sum(buckets))
        shared += M * plan.sequences
        fewest += int(np.ceil(n_UMB[u].reshape(-1)[plan.order].reshape(M, B).sum(1) / C).sum())
        moved += int(plan.sequences < own.sequences)

    real_attention = pair * float((n.astype(float) ** 2).sum()) / 2
    real = w_token * n.sum() + h_token * r_len.sum() + real_attention
    tokens = float(n.sum())
    stages = {  # (slots the weights run on, sequences attention runs over)
        "lm_head_on_every_slot": (tokens, None),
        "attention_whole_sequences": (tokens, ffd),
        "ffd_fill": (ffd * C, ffd),
        "bucket_rounding": (bucket_own * C, bucket_own),
        "largest_over_micro_batches": (shared * C, shared),
    }
    parts, last = {}, real
    for key, (slots, seqs) in stages.items():
        total = (w_token + h_token) * slots + (real_attention if seqs is None else per_seq * seqs)
        parts[key] = total - last
        last = total
    padded_attention = pair * rows * C * C * (1.0 if full_square else 0.5)
    padded = w_token * rows * C + h_token * rows * response + padded_attention
    bound = (w_token + h_token) * tokens + per_seq * fewest
    return {"lengths": name, "rows": rows, "micro_batches_per_step": updates * M, "rows_per_micro_batch": B,
            "seq_len": C, "mean_prompt": float(p_len.mean()), "mean_response": float(r_len.mean()),
            "real_tokens": int(tokens), "attention": "full square" if full_square else "causal over whole sequences",
            "linear_flops_per_token": w_token + h_token, "attention_flops_per_pair": pair,
            "real_flops": real, "real_attention_share": real_attention / real,
            "packed_flops": last, "packed_over_real": last / real, "padded_over_real": padded / real,
            "parts_flops": parts, "parts_over_real": {k: v / real for k, v in parts.items()},
            "sequences": {"ffd": ffd, "own_buckets": bucket_own, "run": shared, "fewest": fewest},
            "updates_with_groups_moved": moved, "updates": updates,
            "bound_attention_whole_sequences_over_real": bound / real}


def format_update_line(u: dict) -> str:
    """One line of ``realjax compile``'s table."""
    parts = ", ".join(f"{k.replace('_', ' ')} +{v:.3f}" for k, v in u["parts_over_real"].items())
    return (f"updates under {u['lengths']} lengths, packed: {u['packed_over_real']:.2f} x the real tokens' FLOPs "
            f"(padded {u['padded_over_real']:.2f} x; {parts}); whole-sequence attention alone at the fewest "
            f"sequences: {u['bound_attention_whole_sequences_over_real']:.2f} x")


def price_config(cfg, model_cfg, name: str, *, prompt: int, multiple: int, attention: str) -> dict | None:
    """:func:`update_under_lengths` for a run config (``prompt``: its prompt bucket; ``multiple``: the
    data-parallel devices; ``attention``: the resolved back end, XLA's computing the full square); None
    without packing (``optim.tokens_per_micro_batch`` 0)."""
    r, o = cfg.rollout, cfg.optim
    if not o.tokens_per_micro_batch:
        return None
    return update_under_lengths(model_cfg, name, rows=r.prompts_per_step * r.group_size, group_size=r.group_size,
                                mini_batches=o.mini_batches, micro_batches=o.micro_batches, prompt=prompt,
                                response=r.max_new_tokens, tokens_per_micro_batch=o.tokens_per_micro_batch,
                                multiple=multiple, full_square=attention == "xla", seed=cfg.seed)
