"""The engine's host schedule: which bucket and window each decode chunk runs, and for how many steps.

``Engine`` takes these decisions between chunks from the slots' done flags; ``schedule`` takes the same
decisions from known per-row lengths (rows that end only at their budget, as the length oracle of
``realjax bench rollout`` makes them), so that ``realjax compile`` can price a rollout under a length
distribution with the engine's own buckets and windows, and the cache moves between its chunks
(compactions, inserts). Tests hold the two to the same chunks, compactions and inserts; ``simulate`` is
the chunks alone.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np


def bucket_sizes(slots: int, multiple: int = 1) -> tuple[int, ...]:
    """The batch sizes compaction may use: 4, 5, 6, 7 x 2^e (no bucket wastes more than a fifth of
    itself on one size too big), rounded up to ``multiple``, up to ``slots`` (always one)."""
    sizes = {slots}
    e = 0
    while 4 << e <= 2 * slots:
        sizes.update(-(-(m << e) // multiple) * multiple for m in (4, 5, 6, 7))
        e += 1
    sizes.update(range(multiple, 4 * multiple, multiple))
    return tuple(sorted(s for s in sizes if s <= slots))


def call_buckets(rows: int, slots: int, multiple: int) -> tuple[int, tuple[int, ...]]:
    """``(cap, sizes)`` for a call of ``rows`` rows: at most ``slots`` rows decode at once (0 = all of
    them), and the buckets, multiples of ``multiple`` (the data-parallel devices), up to the cap."""
    cap = min(slots or rows, rows)
    return cap, bucket_sizes(-(-cap // multiple) * multiple, multiple)


def fit_bucket(sizes: tuple[int, ...], n: int) -> int:
    """The smallest bucket that holds ``n`` rows."""
    return next(s for s in sizes if s >= n)


def compaction_order(live: np.ndarray, queued: int, cap: int, sizes: tuple[int, ...], chips: int):
    """The slots a compaction keeps, in their new order, or None when the batch keeps its size.

    The batch axis is split over ``chips`` (the data-parallel devices) in contiguous blocks of slots, and
    no row leaves its chip: XLA partitions a gather across the batch's shards, with indices known only at
    run time, as "every chip builds the whole result, then all-reduce", which for the paper's caches is
    several times a chip's memory. So the new bucket holds the live rows plus the queue (up to ``cap``),
    and at least ``chips`` times the live rows of the busiest chip; each chip keeps its live slots first,
    then free ones, in the new bucket's block that is its own.
    """
    per = live.size // chips
    blocks = live.reshape(chips, per)
    busiest = int(blocks.sum(axis=1).max())
    want = fit_bucket(sizes, max(min(int(live.sum()) + queued, cap), chips * busiest))
    if want >= live.size:
        return None
    keep = want // chips
    return np.concatenate([c * per + np.concatenate([np.flatnonzero(b), np.flatnonzero(~b)])[:keep]
                           for c, b in enumerate(blocks)])


def chunk_window(longest: int, prompt: int, new: int, compact_every: int, window_tokens: int) -> int:
    """The cache window of a chunk whose longest live row has generated ``longest`` tokens: room for
    ``compact_every`` more, rounded up to ``window_tokens`` (the static sampler's windows), at most the
    whole cache."""
    grown = -(-(longest + compact_every) // window_tokens) * window_tokens
    return prompt + min(new, grown)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One call on the engine: its decode chunks and the cache moves between them, in order."""

    chunks: list[tuple[int, int, int]]  # (bucket, window, steps): one decode program run each
    # (from bucket, to bucket): the live slots gathered into a smaller batch (``Engine._compact``)
    compactions: list[tuple[int, int]]
    # (bucket, rows): queued rows entering free slots (``Engine._insert``, one run over the bucket's padded
    # slot list), each copying its prompt's prefilled cache; the call's first rows enter this way too
    inserts: list[tuple[int, int]]


def schedule(lengths, *, prompt: int, new: int, slots: int, multiple: int, compact_every: int,
             window_tokens: int) -> Schedule:
    """What ``Engine`` runs for one call whose rows (in queue order) end after ``lengths`` tokens each (at
    most ``new``), with no stop id met earlier: its chunks, compactions and inserts."""
    budget = np.minimum(np.asarray(lengths, np.int64), new)
    cap, sizes = call_buckets(budget.size, slots, multiple)
    queue = collections.deque(budget.tolist())
    # Per slot: tokens its row has generated, and has still to generate (0 = a free slot).
    made, left = np.zeros(fit_bucket(sizes, cap), np.int64), np.zeros(fit_bucket(sizes, cap), np.int64)
    out = Schedule([], [], [])
    while left.any() or queue:
        order = compaction_order(left > 0, len(queue), cap, sizes, multiple)
        if order is not None:
            out.compactions.append((left.size, order.size))
            made, left = made[order], left[order]
        free = np.flatnonzero(left == 0)[:len(queue)]
        if free.size:
            out.inserts.append((left.size, int(free.size)))
        for slot in free:
            n = queue.popleft()  # the row's first token comes from its prompt's logits, at insert
            made[slot], left[slot] = 1, n - 1
        live = left > 0
        if not live.any():
            continue
        # The chunk runs until every row is done or for compact_every steps.
        steps = min(compact_every, int(left.max()))
        window = chunk_window(int(made[live].max()) - 1, prompt, new, compact_every, window_tokens)
        out.chunks.append((left.size, window, steps))
        ran = np.minimum(left, steps)
        made, left = made + ran, left - ran
    return out


def simulate(lengths, *, prompt: int, new: int, slots: int, multiple: int, compact_every: int,
             window_tokens: int) -> list[tuple[int, int, int]]:
    """The ``(bucket, window, steps)`` chunks ``Engine`` runs for one call whose rows (in queue order)
    end after ``lengths`` tokens each (at most ``new``), with no stop id met earlier."""
    return schedule(lengths, prompt=prompt, new=new, slots=slots, multiple=multiple, compact_every=compact_every,
                    window_tokens=window_tokens).chunks
