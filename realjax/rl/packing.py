"""Packed rollouts: the learner's rows of different lengths laid end to end in fixed-length sequences.

A padded micro-batch runs every row at the full ``Q + A - 1`` positions; with R1-Distill-like lengths about
half of them are padding. Packing puts each row's real tokens (its prompt without left padding and its
response up to the last scored token) into ``Z`` sequences of ``C = Q + A - 1`` tokens, longest rows first
into the first sequence with room (first-fit decreasing). Each row is one segment: it attends causally
within itself only (``realjax.models.attention``) and its RoPE positions restart at 0, so every real token
sees exactly what it saw padded. Log-probs and entropies are gathered back to the ``[B, A]`` layout, so
the losses and the exact accumulation over micro-batches do not change.

The plan is numpy on the host from the masks alone, deterministic (a stable sort), so every process of a
multi-host run, holding the same global batch, derives the same plan. An update's shape ``(Z, L)`` comes
from a bounded set, so an update compiles for a few shapes at most: ``Z`` from the token budget's sequence
count up (a multiple of the data-parallel devices, then a quarter at a time), ``L`` the padded row length
``C`` or whole splash tiles up to an eighth longer (longer sequences take rows that would open another
one: the capacity ``Z * L`` moves in finer steps than whole sequences per device); the plan takes the
smallest capacity that fits, and all micro-batches of an update share it. Because of that sharing, an
update may move whole prompt groups between its micro-batches (``group_size``) when that lowers the
capacity: the update's gradient does not depend on which micro-batch holds a group (every objective is
per group, summed over micro-batches and divided once, ``realjax.rl.update``).

Padding slots each get a segment id of their own (negative: real rows are 1, 2, ...), so a padding query
sees only itself: every back end computes the same unread values for it, and splash skips all its other
tiles (``realjax.models.splash_blocks``).

Axis letters (``realjax/__init__``): Z packed sequences, C tokens of a packed sequence (``L`` of them: at
least a padded row's ``Q + A - 1``); B, Q, A, M as in ``realjax.rl.batch``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from realjax.models.logprobs import token_logprobs
from realjax.models.splash_blocks import SPLASH_BLOCK, tile


class PackingError(ValueError):
    """Rows that cannot be packed as asked (a scored token after padding, a sequence count that does not fit)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Packing:
    """Where each row's tokens sit in the packed sequences (int32; one micro-batch, or ``[M, ...]``).

    ``src_ZC``: flat index into the row-major model input ``[B, T]`` (``T = Q + A - 1``) of the token at each
    packed slot (0 on padding slots). ``segment_ids_ZC``: 1, 2, ... for the rows of a sequence; padding
    slots negative, each its own (``-1 - slot``).
    ``positions_ZC``: the token's RoPE position in its row. ``dst_BA``: flat index into ``[Z * C]`` of the
    slot whose next-token prediction scores response token ``(b, a)``; -1 where nothing is scored (padding;
    a row with an empty response is not packed at all). Rows dropped whole (``row_mask_B``) are packed
    like the others: their log-probs feed the scoring pass's metrics as they do padded.
    """

    src_ZC: Any
    segment_ids_ZC: Any
    positions_ZC: Any
    dst_BA: Any


def row_spans(prompt_mask_BQ, resp_mask_BA) -> tuple[list[np.ndarray], np.ndarray]:
    """Per row, the model-input positions it must run (ascending) and the ``[B, A]`` input position that
    predicts each scored response token (-1 if unscored).

    A row's input is ``[prompt | response[:-1]]``; response token ``a`` is predicted at input ``Q - 1 + a``.
    Only real tokens up to the last scored prediction are kept.
    """
    pm, rm = (np.asarray(x) > 0 for x in (prompt_mask_BQ, resp_mask_BA))
    B, Q = pm.shape
    A = rm.shape[1]
    real_BT = np.concatenate([pm, rm[:, :-1]], axis=1)
    pred_BA = np.where(rm, Q - 1 + np.arange(A)[None, :], -1)
    rows = []
    for b in range(B):
        preds = pred_BA[b][pred_BA[b] >= 0]
        if preds.size == 0:
            rows.append(np.zeros((0,), np.int64))
            continue
        if not real_BT[b, preds].all():
            raise PackingError(f"row {b}: a scored response token is predicted from a padding position (masks "
                               "must be a left-padded prompt and a response prefix)")
        positions = np.flatnonzero(real_BT[b])
        rows.append(positions[positions <= preds.max()])
    return rows, pred_BA


def first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Row indices per sequence: longest first, each into the first sequence with room (deterministic)."""
    order = np.argsort(-lengths, kind="stable")
    room, bins = [], []
    for b in order:
        n = int(lengths[b])
        if n == 0:
            continue
        if n > capacity:
            raise PackingError(f"a row of {n} tokens does not fit a packed sequence of {capacity}")
        fits = np.flatnonzero(np.asarray(room) >= n) if room else []
        if len(fits):
            room[fits[0]] -= n
            bins[fits[0]].append(int(b))
        else:
            room.append(capacity - n)
            bins.append([int(b)])
    return bins


def sequence_buckets(rows: int, seq_len: int, tokens_per_micro_batch: int, multiple: int) -> tuple[int, ...]:
    """The packed sequence counts a micro-batch of ``rows`` may use, ascending: the budget's count (at least
    ``multiple``, the data-parallel devices, and a multiple of it) grown by a quarter at a time until one
    sequence per row, and every multiple of ``multiple`` up to a quarter above the budget's count (where a
    step's counts fall: each step there costs a few percent of the tokens). A quarter bounds the padding a
    bucket adds to 25% while the set stays logarithmic in rows (17 counts from 10 to 256 sequences;
    doubling would waste up to half)."""
    up = lambda n: -(-n // multiple) * multiple
    most = up(rows)
    z = first = max(multiple, up(tokens_per_micro_batch // seq_len))
    out = set(range(first, min(first * 5 // 4, most) + 1, multiple))
    while z < most:
        out.add(z)
        z = max(z + multiple, up(-(-5 * z // 4)))
    return tuple(sorted(out | {most}))


def sequence_lengths(seq_len: int, block: int = SPLASH_BLOCK) -> tuple[int, ...]:
    """The packed sequence lengths an update may use, ascending: a padded row's ``seq_len``, then every
    whole number of splash tiles (``realjax.models.splash_blocks.tile``) past its own up to an eighth longer.

    With rows of up to ``seq_len`` tokens about half that long on average, a micro-batch's sequence count
    moves in steps of the data-parallel devices (a few percent of the tokens each), and every row over
    half a sequence opens one of its own. A tile more per sequence is a finer step of capacity, and longer
    sequences hold such a row beside another: R1-Distill-like lengths fill about 3% more of the slots
    than at ``seq_len`` alone (``realjax compile --lengths`` prices it). An eighth bounds the growth of a
    sequence's attention under back ends that compute the whole square (XLA's)."""
    step, padded = tile(seq_len, block)  # lengths within ``padded`` run the same tiles as ``seq_len``
    return (seq_len,) + tuple(range(padded + step, seq_len + seq_len // 8 + 1, step))


def pack(prompt_mask_BQ, resp_mask_BA, *, sequences: int, length: int = 0) -> Packing:
    """The packing of one micro-batch into ``sequences`` sequences of ``length`` tokens (default and at
    least ``Q + A - 1``, a padded row's; numpy)."""
    spans, pred_BA = row_spans(prompt_mask_BQ, resp_mask_BA)
    B, A = pred_BA.shape
    T = np.shape(prompt_mask_BQ)[1] + A - 1  # a model input row: the row stride of ``src``
    C = length or T
    if C < T:
        raise PackingError(f"packed sequences of {C} tokens are shorter than a row's {T}")
    bins = first_fit_decreasing(np.array([len(s) for s in spans]), C)
    if len(bins) > sequences:
        raise PackingError(f"the rows need {len(bins)} packed sequences, {sequences} were given")
    src = np.zeros((sequences, C), np.int32)
    seg = np.broadcast_to(-1 - np.arange(C, dtype=np.int32), (sequences, C)).copy()  # padding: each its own
    pos = np.zeros((sequences, C), np.int32)
    dst = np.full((B, A), -1, np.int32)
    for z, members in enumerate(bins):
        at = 0
        for i, b in enumerate(members):
            span = spans[b]
            n = len(span)
            src[z, at:at + n] = b * T + span
            seg[z, at:at + n] = i + 1
            pos[z, at:at + n] = np.arange(n)
            # The packed slot of input position p is at + (rank of p in the span).
            scored = pred_BA[b] >= 0
            dst[b, scored] = z * C + at + np.searchsorted(span, pred_BA[b, scored])
            at += n
    return Packing(src_ZC=src, segment_ids_ZC=seg, positions_ZC=pos, dst_BA=dst)


def row_lengths(prompt_mask_BQ, resp_mask_BA) -> np.ndarray:
    """[B] tokens each row runs packed (0 for an empty response)."""
    spans, _ = row_spans(prompt_mask_BQ, resp_mask_BA)
    return np.array([len(s) for s in spans], np.int64)


def balanced_groups(lengths_MB: np.ndarray, group_size: int) -> np.ndarray:
    """[M * B] row order (new row i is old row ``order[i]``, rows flattened over the micro-batches) that
    deals whole groups to the M micro-batches so their token counts are even: groups longest first, each
    to the micro-batch with the fewest tokens that has room (deterministic; a group keeps its rows' order
    and each micro-batch its groups' order)."""
    M, B = lengths_MB.shape
    per = B // group_size  # groups per micro-batch
    tokens_g = lengths_MB.reshape(M * per, group_size).sum(1)
    load, held = np.zeros(M, np.int64), [[] for _ in range(M)]
    for g in np.argsort(-tokens_g, kind="stable"):
        m = min((m for m in range(M) if len(held[m]) < per), key=lambda m: (load[m], m))
        held[m].append(int(g))
        load[m] += tokens_g[g]
    groups_MP = np.array([sorted(h) for h in held])
    return (groups_MP[..., None] * group_size + np.arange(group_size)).reshape(-1)


@dataclasses.dataclass(frozen=True)
class SequencePlan:
    """How an update's micro-batches are packed (host numbers): ``order`` [M * B] the row order (identity
    unless groups moved, see :func:`balanced_groups`), ``needed`` [M] the sequences first-fit decreasing
    opens in each micro-batch, ``sequences`` the count all of them run (a bucket), each of ``length``
    tokens (one of :func:`sequence_lengths`)."""

    order: np.ndarray
    needed: np.ndarray
    sequences: int
    length: int

    @property
    def capacity(self) -> int:
        """Slots a micro-batch runs (what every weight is applied to)."""
        return self.sequences * self.length


def plan_sequences(lengths_MB: np.ndarray, seq_len: int, *, tokens_per_micro_batch: int, multiple: int = 1,
                   group_size: int = 0, seq_lengths: tuple[int, ...] | None = None) -> SequencePlan:
    """The packing of micro-batches whose rows run ``lengths_MB`` [M, B] tokens (each at most ``seq_len``):
    per sequence length (``seq_lengths``, default :func:`sequence_lengths`), the smallest bucket
    (:func:`sequence_buckets`) that fits the fullest micro-batch, with ``group_size`` moving whole groups
    between micro-batches (:func:`balanced_groups`) when that lowers it; of those, the smallest capacity
    (the shortest length on a tie)."""
    lengths_MB = np.asarray(lengths_MB, np.int64)
    plans = [_plan_at(lengths_MB, L, tokens_per_micro_batch, multiple, group_size)
             for L in (seq_lengths or sequence_lengths(seq_len))]
    return min(plans, key=lambda p: by_capacity((p.sequences, p.length)))


def by_capacity(shape: tuple[int, int]) -> tuple[int, int]:
    """The order of packed shapes ``(Z, L)`` the plan chooses by: fewest slots, then the shorter length."""
    return shape[0] * shape[1], shape[1]


def _plan_at(lengths_MB: np.ndarray, L: int, tokens_per_micro_batch: int, multiple: int,
             group_size: int) -> SequencePlan:
    M, B = lengths_MB.shape
    buckets = sequence_buckets(B, L, tokens_per_micro_batch, multiple)

    def planned(order):
        rows_MB = lengths_MB.reshape(-1)[order].reshape(M, B)
        needed = np.array([len(first_fit_decreasing(rows_MB[m], L)) for m in range(M)])
        # the last bucket is one sequence per row: always fits
        return SequencePlan(order, needed, next(b for b in buckets if b >= needed.max()), L)

    plan = planned(np.arange(M * B))
    if group_size and M > 1 and B % group_size == 0:
        moved = planned(balanced_groups(lengths_MB, group_size))
        for target in reversed([b for b in buckets if b < moved.sequences]):
            order = _swap_groups_under(lengths_MB, moved.order, group_size, L, target)
            if order is None:
                break
            moved = planned(order)
        plan = moved if moved.sequences < plan.sequences else plan
    return plan


def _swap_groups_under(lengths_MB, order, group_size: int, capacity: int, target: int) -> np.ndarray | None:
    """``order`` with groups swapped between micro-batches until each needs at most ``target`` sequences,
    or None. Balanced token counts can still leave a micro-batch one sequence over (first-fit decreasing
    also depends on how its rows' lengths combine): each micro-batch over the target trades one group
    for another micro-batch's, the first trade that leaves both within it (deterministic)."""
    M, B = lengths_MB.shape
    per = B // group_size
    groups_MP = np.asarray(order).reshape(M, per, group_size)[..., 0] // group_size
    tokens_g = lengths_MB.reshape(M * per, group_size)

    def need(groups) -> int:
        return len(first_fit_decreasing(tokens_g[np.asarray(groups)].reshape(-1), capacity))

    needs = [need(g) for g in groups_MP]
    for m in range(M):
        if needs[m] <= target:
            continue
        traded = False
        for i in range(per):
            for other in range(M):
                if other == m:
                    continue
                for j in range(per):
                    a, b = groups_MP[m].copy(), groups_MP[other].copy()
                    a[i], b[j] = groups_MP[other][j], groups_MP[m][i]
                    na, nb = need(a), need(b)
                    if na <= target and nb <= target:
                        groups_MP[m], groups_MP[other], needs[m], needs[other] = a, b, na, nb
                        traded = True
                        break
                if traded:
                    break
            if traded:
                break
        if not traded:
            return None
    return (np.sort(groups_MP, axis=1)[..., None] * group_size + np.arange(group_size)).reshape(-1)


def pack_batch(batch, *, tokens_per_micro_batch: int, multiple: int = 1, group_size: int = 0):
    """``batch`` (an ``UpdateBatch`` of host arrays ``[M, rows, ...]``) with its ``packing`` set: every
    micro-batch packed into the same sequences ``(Z, L)``, the smallest capacity that fits the fullest one.

    ``group_size``: whole groups may move between micro-batches (:func:`plan_sequences`), so the rows come
    back in another order; only for a batch whose rows are not read back by position (an update's, not a
    scoring pass's)."""
    pm, rm = (np.asarray(x) for x in (batch.prompt_mask_BQ, batch.resp_mask_BA))
    M, rows = rm.shape[:2]
    C = pm.shape[-1] + rm.shape[-1] - 1
    lengths = np.stack([row_lengths(pm[m], rm[m]) for m in range(M)])
    plan = plan_sequences(lengths, C, tokens_per_micro_batch=tokens_per_micro_batch, multiple=multiple,
                          group_size=group_size)
    if not np.array_equal(plan.order, np.arange(M * rows)):
        batch = jax.tree.map(lambda x: np.asarray(x).reshape(M * rows, *np.shape(x)[2:])[plan.order]
                             .reshape(np.shape(x)), batch)
        pm, rm = (np.asarray(x) for x in (batch.prompt_mask_BQ, batch.resp_mask_BA))
    parts = [pack(pm[m], rm[m], sequences=plan.sequences, length=plan.length) for m in range(M)]
    return batch.replace(packing=jax.tree.map(lambda *xs: np.stack(xs), *parts))


def packed_tokens(packing: Packing) -> int:
    """Real tokens the packed sequences hold (the work the learner cannot avoid)."""
    return int((np.asarray(packing.segment_ids_ZC) > 0).sum())


def packed_logprobs(model, batch, *, temperature: float, chunk_tokens: int):
    """(logp [B, A], entropy [B, A]) of the response tokens of ``batch`` (one micro-batch whose ``packing``
    is set), computed on the packed sequences; 0 where nothing is scored (the losses mask those)."""
    p = batch.packing
    Z, C = p.src_ZC.shape
    ids_BT = jnp.concatenate([batch.prompt_ids_BQ, batch.tokens_BA[:, :-1]], axis=1)
    ids_ZC = ids_BT.reshape(-1)[p.src_ZC]
    h_ZCD, _ = model.hidden_states(ids_ZC, p.positions_ZC, segment_ids_BT=p.segment_ids_ZC)
    # Each scoring slot's target is its row's next response token; other slots score token 0, unread.
    at = jnp.where(p.dst_BA >= 0, p.dst_BA, Z * C).reshape(-1)
    targets_ZC = jnp.zeros((Z * C,), jnp.int32).at[at].set(batch.tokens_BA.reshape(-1), mode="drop").reshape(Z, C)
    logp_ZC, entropy_ZC = token_logprobs(model, h_ZCD, targets_ZC, temperature=temperature, chunk_tokens=chunk_tokens)
    scored_BA = p.dst_BA >= 0
    back = lambda x_ZC: jnp.where(scored_BA, x_ZC.reshape(-1)[jnp.maximum(p.dst_BA, 0)], 0.0)
    return back(logp_ZC), back(entropy_ZC)
