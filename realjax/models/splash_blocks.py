"""Segment-aware block tables for splash attention: compute only the tiles a packed sequence's rows need.

Splash attention walks a grid of (query block, key block) tiles. Its block tables (``MaskInfo``) say, per
tile, whether to compute it (``block_mask > 0``) and which block to load (``data_next``); inside a computed
tile the kernel applies causality and the segment ids element by element. A static causal table computes
the whole lower triangle of a sequence, so two rows packed into one sequence of ``C`` tokens cost
``C^2 / 2`` pairs rather than the sum of their ``n^2 / 2``. Here each sequence gets its own tables, built
from its segment ids on device (inside the jitted program, so every packing of every step is served by one
compiled kernel), and the kernel is the same one with these tables in place of the static ones.

The rule, exact for any segment layout (padding id 0 at both ends of a left-padded row included): query
``t`` sees the keys ``s <= t`` with ``seg(s) == seg(t)``, the earliest of which is ``first(t)``, the first
key of its segment. Query block ``i`` (forward and dq passes) needs key blocks ``lo_i <= j <= i`` with
``lo_i = min_{t in block i} first(t) // block``; key block ``j`` (dkv pass) is needed by query blocks
``j <= i <= hi_j`` with ``hi_j = max_{s in block j} last(s) // block``, ``last(s)`` the last query of its
segment. Every other tile is all-masked, so skipping it removes only ``exp(-inf)`` terms: the outputs and
gradients are those of the static kernel. For rows laid end to end (``realjax.rl.packing``) the tiles are
exactly those that hold a visible pair.

Skipped tiles point ``data_next`` at a block the kernel loads anyway (the next computed one in grid order
within a head), and the pipeline copies a block only when its index changes, so a skipped tile adds no
copy (the dkv pass at most one per kv block and kv head, where its walk crosses to the next kv head).

Axis letters (``realjax/__init__``): T positions of a sequence; Q query blocks and K key blocks of a tile
grid here (``[Q, K]`` tables).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SPLASH_BLOCK = 512  # splash's q / kv tile (MaxText's default); shorter sequences use one tile


def tile(T: int, block: int = SPLASH_BLOCK) -> tuple[int, int]:
    """(block, padded length) splash runs a sequence of ``T`` tokens at: tiles of ``block`` (one tile of a
    multiple of 128 when shorter), the sequence padded to whole tiles."""
    block = min(block, -(-T // 128) * 128)
    return block, -(-T // block) * block


def block_bounds(q_seg_T, kv_seg_T, block: int):
    """(lo_Q, hi_K) int32: the first key block each query block needs, the last query block each key block
    is needed by (module docstring). A query whose segment has no key at or before it (only possible when
    the query and key ids differ) counts as needing its own block, like a query that sees itself."""
    T = q_seg_T.shape[0]
    t_T = jnp.arange(T, dtype=jnp.int32)
    kv_order = jnp.argsort(kv_seg_T, stable=True)
    at = jnp.clip(jnp.searchsorted(kv_seg_T[kv_order], q_seg_T, side="left"), 0, T - 1)
    first_T = jnp.minimum(kv_order[at].astype(jnp.int32), t_T)  # stable sort: its first is its earliest
    q_order = jnp.argsort(q_seg_T, stable=True)
    at = jnp.clip(jnp.searchsorted(q_seg_T[q_order], kv_seg_T, side="right") - 1, 0, T - 1)
    last_T = jnp.maximum(q_order[at].astype(jnp.int32), t_T)
    lo_Q = (first_T // block).reshape(-1, block).min(axis=1)
    hi_K = (last_T // block).reshape(-1, block).max(axis=1)
    return lo_Q, hi_K


def tables(lo_Q, hi_K, dtype):
    """The three passes' (data_next, block_mask), each ``[1, Q, K]`` in ``dtype`` (the static tables' one
    head, shared by the query heads), laid out as the static kernel's: ``[q block, kv block]`` for all
    three; forward and dq name the kv block to load, dkv the q block.

    A computed tile's block_mask is 1 on the diagonal (partial) and 2 below it (full), as the static causal
    tables; with no ``mask_next`` the kernel masks every computed tile anyway. Skipped tiles load the next
    computed block in grid order: forward and dq walk kv blocks innermost within a query block (then the
    next query block, whose first is ``lo_{i+1}``); dkv walks query blocks innermost within a kv block and
    head (then the next head's same kv block, whose first is ``j``)."""
    Q = lo_Q.shape[0]
    i_QK = jnp.arange(Q, dtype=jnp.int32)[:, None]
    j_QK = jnp.arange(Q, dtype=jnp.int32)[None, :]
    kind_QK = jnp.where(i_QK == j_QK, 1, 2)
    lo_next_Q = jnp.roll(lo_Q, -1)  # after the last query block comes the next head's first: lo_0 = 0
    fwd_run = (j_QK >= lo_Q[:, None]) & (j_QK <= i_QK)
    fwd_next = jnp.where(j_QK < lo_Q[:, None], lo_Q[:, None], jnp.where(j_QK <= i_QK, j_QK, lo_next_Q[:, None]))
    dkv_run = (i_QK >= j_QK) & (i_QK <= hi_K[None, :])
    dkv_next = jnp.where(dkv_run, i_QK, j_QK)
    as_head = lambda x_QK: x_QK.astype(dtype)[None]
    fwd = (as_head(fwd_next), as_head(jnp.where(fwd_run, kind_QK, 0)))
    dkv = (as_head(dkv_next), as_head(jnp.where(dkv_run, kind_QK, 0)))
    return fwd, dkv


def segment_kernel(kernel, q_seg_T, kv_seg_T, block: int):
    """``kernel`` (a static causal ``SplashAttentionKernel`` over ``T`` tokens in tiles of ``block``) with
    block tables that skip the tiles the segments ``q_seg_T`` / ``kv_seg_T`` never see (traceable: built
    on device). The causal rule, block sizes and mode stay the kernel's."""
    fwd_info = kernel.fwd_mask_info
    lo_Q, hi_K = block_bounds(q_seg_T, kv_seg_T, block)
    (fwd_next, fwd_mask), (dkv_next, dkv_mask) = tables(lo_Q, hi_K, fwd_info.data_next.dtype)
    fwd = fwd_info._replace(data_next=fwd_next, block_mask=fwd_mask)
    dq = kernel.dq_mask_info._replace(data_next=fwd_next, block_mask=fwd_mask)
    dkv = kernel.dkv_mask_info._replace(data_next=dkv_next, block_mask=dkv_mask)
    return type(kernel)(fwd, dq, dkv, **kernel.kwargs)


def packed_blocks(lengths: np.ndarray, T: int, block: int = SPLASH_BLOCK) -> tuple[int, int]:
    """(tiles the rows need, tiles computed in all) per pass of one packed sequence of ``T`` tokens whose
    rows of ``lengths`` tokens lie end to end from slot 0 in this order (as ``realjax.rl.packing.pack``
    lays them), the rest padding (each slot its own segment: a query block of padding alone computes its
    diagonal tile only): the count of :func:`tables`' computed tiles, in numpy for the cost model
    (``realjax.tools.aot.packed_update``)."""
    block, Tp = tile(T, block)
    lengths = np.asarray(lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    if starts[-1] > T:
        raise ValueError(f"rows of {int(starts[-1])} tokens do not fit a sequence of {T}")
    Q = Tp // block
    rows = total = 0
    for i in range(Q):
        a, b = i * block, (i + 1) * block  # the query block's positions [a, b)
        # rows overlapping [a, b): the earliest of them starts the block's reach
        hit = np.flatnonzero((starts[:-1] < b) & (starts[1:] > a))
        lo = starts[hit[0]] // block if len(hit) else i
        rows += i - lo + 1 if len(hit) else 0
        total += i - lo + 1
    return rows, total
