"""The learner's updates under a length distribution: their FLOPs against those of the real tokens, part by
part, beside ``realjax compile``'s report (``update_under_lengths`` in its JSON, one line in its table).

The compiled update is priced at one packed shape; what an RL step runs depends on the rows' lengths. Here
the step's rows get response lengths from the named distribution (``realjax.tools.bench.rollout``'s
``oracle_lengths``) and prompt lengths uniform in [prompt / 2, prompt] (as ``realjax bench update
--lengths``), are cut as the trainer cuts them (mini-batches, micro-batches of whole groups) and planned by
the learner's own packing code (``realjax.rl.packing.plan_sequences``: first-fit decreasing, the
sequence buckets and lengths, groups moved between micro-batches). FLOPs by formula, forward +
backward: 6 per matmul weight per token; attention's two products ``12 N H L`` per (query, key) pair.

The real tokens' FLOPs (no learner can do less): every block weight on each real input token, the LM head
on each scored token, causal attention within each row (``n^2 / 2`` pairs). The packed update's, added one
cause at a time (each line of ``parts`` is what that cause adds, in FLOPs per RL step):

1. ``lm_head_on_every_slot``: the LM head scores every packed slot, prompt tokens included;
2. ``attention_block_rounding``: splash computes whole tiles (``block x block`` pairs,
   ``realjax.models.splash_blocks``): per packed sequence, the tiles its rows need (the diagonal tiles
   whole, and every tile between a row's first and its last), priced on the sequences first-fit
   decreasing opens at the update's sequence length ``L``, rows in the order ``pack`` lays them out.
   XLA's attention (``model.attention=xla``) computes the whole ``[L, L]`` square of every sequence
   instead;
3. ``ffd_fill``: those sequences' empty slots (every weight runs on them) and their padding's tiles (each
   padding slot is its own segment: a tile of padding alone is one diagonal tile);
4. ``bucket_rounding``: each micro-batch's count rounded up to its bucket at ``L`` (multiples of the
   data-parallel devices, then up a quarter at a time), with the diagonal tiles of those all-padding
   sequences;
5. ``largest_over_micro_batches``: every micro-batch of an update runs the shape ``(Z, L)`` of the
   fullest (one stacked program), with their attention.

``bound_fewest_sequences_over_real``: what parts 1-2 cost plus the weights on the empty slots of the fewest
sequences of a padded row's length ``C`` every micro-batch's tokens could fill (``ceil(tokens / C)``, no
buckets, their padding's attention left out): about the floor of this design at this tile, short of
scoring only the response slots or a packing finer than whole sequences.
"""

from __future__ import annotations

import numpy as np

from realjax.models.splash_blocks import packed_blocks, tile
from realjax.rl.packing import by_capacity, first_fit_decreasing, plan_sequences, sequence_buckets
from realjax.tools.bench.common import matmul_params
from realjax.tools.bench.rollout import oracle_lengths

PARTS = ("lm_head_on_every_slot", "attention_block_rounding", "ffd_fill", "bucket_rounding",
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
    square of each sequence (XLA) rather than the tiles its rows need (splash). ``lengths``: (prompt,
    response) per row instead of the named distribution's draw. Returns plain numbers (JSON)."""
    if tokens_per_micro_batch <= 0:
        raise ValueError("the update is priced packed: tokens_per_micro_batch must be > 0")
    p_len, r_len = lengths if lengths is not None else step_lengths(name, rows=rows, prompt=prompt,
                                                                    response=response, seed=seed)
    C = prompt + response - 1
    n = (p_len + r_len - 1) * (r_len > 0)  # input tokens a row runs packed (row_lengths' count)
    head = model_cfg.vocab_size * model_cfg.hidden_size
    w_token, h_token = 6.0 * (matmul_params(model_cfg) - head), 6.0 * head
    pair = 12.0 * model_cfg.num_heads * model_cfg.head_dim * model_cfg.num_layers

    updates, M = mini_batches, micro_batches
    B = rows // (updates * M)
    n_UMB = n.reshape(updates, M, B)
    ffd = sequences = moved = 0
    slots = {"ffd": 0, "own_buckets": 0, "run": 0, "fewest": 0}
    pairs = {"rows": 0.0, "ffd": 0.0, "own_buckets": 0.0, "run": 0.0}  # the rows' tiles; all computed tiles
    shapes_run = set()
    for u in range(updates):
        plan = plan_sequences(n_UMB[u], C, tokens_per_micro_batch=tokens_per_micro_batch, multiple=multiple,
                              group_size=group_size if move_groups else 0)
        own = plan_sequences(n_UMB[u], C, tokens_per_micro_batch=tokens_per_micro_batch, multiple=multiple)
        L = plan.length
        block, Lp = tile(L)
        # pairs per counted tile (XLA: one whole square per sequence), and of an all-padding sequence
        tile_pairs, empty_pairs = (L * L, L * L) if full_square else (block * block, block * Lp)
        shapes_run.add((plan.sequences, L))
        rows_MB = n_UMB[u].reshape(-1)[plan.order].reshape(M, B)
        filled = 0.0
        for m in range(M):  # each sequence as ``pack`` lays it out: its rows in first-fit order, then padding
            for members in first_fit_decreasing(rows_MB[m], L):
                need, run = (1, 1) if full_square else packed_blocks(rows_MB[m][members], L)
                pairs["rows"] += need * tile_pairs
                filled += run * tile_pairs
        # each micro-batch's own bucket at the plan's length, then the one all of them run
        buckets = sequence_buckets(B, L, tokens_per_micro_batch, multiple)
        own_z = [next(b for b in buckets if b >= k) for k in plan.needed]
        ffd += int(plan.needed.sum())
        sequences += M * plan.sequences
        for key, z in (("ffd", plan.needed), ("own_buckets", own_z), ("run", [plan.sequences] * M)):
            slots[key] += int(np.sum(z)) * L
            pairs[key] += filled + float(np.sum(z) - plan.needed.sum()) * float(empty_pairs)
        slots["fewest"] += int(np.ceil(rows_MB.sum(1) / C).sum()) * C
        moved += int(plan.capacity < own.capacity)

    real_attention = pair * float((n.astype(float) ** 2).sum()) / 2
    real = w_token * n.sum() + h_token * r_len.sum() + real_attention
    tokens = float(n.sum())
    stages = {  # (slots the weights run on, pairs attention computes)
        "lm_head_on_every_slot": (tokens, None),
        "attention_block_rounding": (tokens, pairs["rows"]),
        "ffd_fill": (slots["ffd"], pairs["ffd"]),
        "bucket_rounding": (slots["own_buckets"], pairs["own_buckets"]),
        "largest_over_micro_batches": (slots["run"], pairs["run"]),
    }
    parts, last = {}, real
    for key, (n_slots, n_pairs) in stages.items():
        total = (w_token + h_token) * n_slots + (real_attention if n_pairs is None else pair * n_pairs)
        parts[key] = total - last
        last = total
    padded_attention = pair * rows * C * C * (1.0 if full_square else 0.5)
    padded = w_token * rows * C + h_token * rows * response + padded_attention
    bound = (w_token + h_token) * slots["fewest"] + pair * pairs["rows"]
    return {"lengths": name, "rows": rows, "micro_batches_per_step": updates * M, "rows_per_micro_batch": B,
            "seq_len": C, "mean_prompt": float(p_len.mean()), "mean_response": float(r_len.mean()),
            "real_tokens": int(tokens),
            "attention": "full square" if full_square else f"splash tiles of {tile(C)[0]} from the segments",
            "linear_flops_per_token": w_token + h_token, "attention_flops_per_pair": pair,
            "real_flops": real, "real_attention_share": real_attention / real,
            "attention_pairs": {"real": real_attention / pair, **pairs},
            "packed_flops": last, "packed_over_real": last / real, "padded_over_real": padded / real,
            "parts_flops": parts, "parts_over_real": {k: v / real for k, v in parts.items()},
            "slots": slots, "sequences_ffd": ffd, "sequences_run": sequences,
            "shapes_run": sorted(shapes_run, key=by_capacity),
            "updates_with_groups_moved": moved, "updates": updates,
            "bound_fewest_sequences_over_real": bound / real}


def largest_shape(u: dict | None, budget: tuple[int, int]) -> tuple[int, int]:
    """The packed ``(Z, L)`` an update's memory is priced at: the largest capacity the priced updates ran
    (``u`` from :func:`update_under_lengths`), or ``budget`` (the token budget's bucket) when unpriced."""
    return max([budget] + [tuple(zl) for zl in (u or {}).get("shapes_run", [])], key=by_capacity)


def format_update_line(u: dict) -> str:
    """One line of ``realjax compile``'s table."""
    parts = ", ".join(f"{k.replace('_', ' ')} +{v:.3f}" for k, v in u["parts_over_real"].items())
    return (f"updates under {u['lengths']} lengths, packed: {u['packed_over_real']:.2f} x the real tokens' FLOPs "
            f"(padded {u['padded_over_real']:.2f} x; {parts}); at the fewest sequences, no buckets: "
            f"{u['bound_fewest_sequences_over_real']:.2f} x")


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
