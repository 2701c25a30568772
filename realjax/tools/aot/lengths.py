"""The rollout bound under a length distribution, beside ``realjax compile``'s all-max bound.

The all-max bound prices every row at the full budget N, as the static sampler runs. Training's rollouts
run on the continuous-batching engine, which decodes only live rows: here a call's rows get lengths from
the same named distributions as ``realjax bench rollout`` (``oracle_lengths``), the engine's own host
schedule turns them into chunks of (bucket, window, steps) and the cache moves between them
(``realjax.sampling.schedule.schedule``, held equal to the engine by its tests; with ``rollout.slots``
below a call's rows, queued rows refill free slots), and each step is priced like a step of the compiled
decode program for that window, scaled to the bucket's rows: the weights read once, the KV cache of
``bucket`` rows up to the window, FLOPs in proportion to the rows; a step takes max(FLOP time, HBM time).
The prefill is the all-max bound's.

The cache moves are the engine's two other programs, priced as HBM traffic (bytes read + written at the
chip's HBM bandwidth; they compute nothing; ``realjax compile`` compiles the largest of each to check that
it fits, ``realjax.tools.aot.engine_moves``):

* a compaction (``Engine._compact``, at most once per ``rollout.compact_every`` steps) gathers the ``b'``
  slots the smaller bucket keeps: their whole cache [L, b', K, S, H] read and written once, after the
  new buffer is zeroed (it copies row by row into it, ``engine._copy_rows``);
* an insert (``Engine._insert``; the call's first rows enter this way too) copies the prompts' prefilled
  cache into free slots: it gathers one prompt cache per entry of its slot list, which is padded to the
  bucket (one compile per size), and writes the entering rows' prompt slots.

Both are priced per chip as if each chip moved only its own rows. The batch axis is split over the
data-parallel chips, and XLA partitions the engine's gathers over it by building the whole result on
every chip and all-reducing it over the interconnect: that traffic is not priced (nor are the host
decisions between chunks), and the compiled programs say whether that layout fits at all.

Memory: the engine's largest bucket is the static decode's batch (``rollout.slots`` = 0) or smaller;
beside it the engine keeps the prompts' prefilled cache (``prompts_per_call`` x prompt slots), added to
the decode's peak here.
"""

from __future__ import annotations

import numpy as np

from realjax.sampling.schedule import schedule
from realjax.tools.bench.rollout import oracle_lengths


def call_schedules(name: str, *, rows: int, calls: int, prompt: int, new: int, slots: int, multiple: int,
                   compact_every: int, window_tokens: int, seed: int = 0):
    """``(lengths, schedules)``: the step's ``rows * calls`` lengths drawn from the named distribution and the
    engine's schedule of each call. They depend on the config alone, not on a compiled program, so
    ``realjax compile`` knows the largest cache moves (``largest_moves``) before anything has compiled."""
    lengths = oracle_lengths(name, rows * calls, new, seed)
    return lengths, [schedule(lengths[call * rows:(call + 1) * rows], prompt=prompt, new=new, slots=slots,
                              multiple=multiple, compact_every=compact_every, window_tokens=window_tokens)
                     for call in range(calls)]


def largest_moves(plans) -> tuple[tuple[int, int], tuple[int, int]]:
    """The compaction (from bucket, to bucket) and the insert (bucket, rows) of ``plans`` that need the most
    memory; (0, 0) where there is none."""
    compaction, insert = (0, 0), (0, 0)
    for plan in plans:
        compaction = max([compaction, *plan.compactions], key=lambda m: (m[1], m[0]))
        insert = max([insert, *plan.inserts])
    return compaction, insert


def rollout_under_lengths(name: str, *, prefill, decode, chip, rows: int, calls: int, prompts: int, prompt: int,
                          new: int, slots: int, multiple: int, compact_every: int, window_tokens: int,
                          compiled_rows: int = 0, seed: int = 0, schedules=None) -> dict:
    """Price one RL step's rollout (``calls`` sampler calls of ``rows`` rows, ``prompts`` prompts each) on
    the engine under the named length distribution. ``prefill``, ``decode``: the compiled
    ``realjax.tools.aot.compile.Program``s of a call of ``compiled_rows`` rows (0 = ``rows``), the decode
    carrying its per-window parts and its KV-cache bytes per chip. ``schedules``: :func:`call_schedules`'
    result for these arguments when the caller already has it."""
    S, compiled_rows = prompt + new, compiled_rows or rows
    by_window = {p.window: p for p in decode.parts}
    weights = decode.parts[-1].memory["argument"] - decode.cache_bytes  # all but the cache, per chip
    row_bytes = decode.cache_bytes / compiled_rows  # one row's whole cache, per chip: buckets split like the batch

    def step_s(bucket: int, window: int) -> float:
        part = by_window[window]
        share = bucket / compiled_rows
        read = weights + decode.cache_bytes * share * window / S
        return max(part.flops * share / chip.peak_flops, read / chip.hbm_bandwidth)

    lengths, plans = schedules or call_schedules(name, rows=rows, calls=calls, prompt=prompt, new=new, slots=slots,
                                                 multiple=multiple, compact_every=compact_every,
                                                 window_tokens=window_tokens, seed=seed)
    decode_s, row_steps, programs = 0.0, 0, set()
    compactions, compact_bytes, inserts, inserted, insert_bytes = 0, 0.0, 0, 0, 0.0
    for plan in plans:
        decode_s += sum(steps * step_s(b, w) for b, w, steps in plan.chunks)
        row_steps += rows + sum(b * steps for b, _, steps in plan.chunks)  # + each row's first token, at insert
        programs.update((b, w) for b, w, _ in plan.chunks)
        compactions += len(plan.compactions)
        compact_bytes += sum(3 * kept * row_bytes for _, kept in plan.compactions)  # zero, read, write the kept rows
        inserts += len(plan.inserts)
        inserted += sum(n for _, n in plan.inserts)
        # Read a prompt cache per entry of the padded slot list, write the entering rows' prompt slots.
        insert_bytes += sum((bucket + n) * row_bytes * prompt / S for bucket, n in plan.inserts)
    largest_compaction, largest_insert = largest_moves(plans)  # the moves that need the most memory
    prefill_s = prefill.runs * max(prefill.flops / chip.peak_flops, prefill.read_bytes / chip.hbm_bandwidth)
    compact_s, insert_s = compact_bytes / chip.hbm_bandwidth, insert_bytes / chip.hbm_bandwidth
    prompts_cache = decode.cache_bytes * prompts * prompt / (compiled_rows * S)
    return {"lengths": name, "mean_tokens": float(lengths.mean()), "cut_at_max": float(np.mean(lengths == new)),
            "calls": calls, "rows_per_call": rows, "slots": slots or rows, "compact_every": compact_every,
            "useful_tokens": int(lengths.sum()), "row_steps": row_steps,
            "utilisation": float(lengths.sum() / row_steps),
            "decode_programs": len(programs), "decode_s": decode_s, "prefill_s": prefill_s,
            "compactions": compactions, "compaction_bytes_per_chip": int(compact_bytes), "compaction_s": compact_s,
            "inserts": inserts, "inserted_rows": inserted, "insert_bytes_per_chip": int(insert_bytes),
            "insert_s": insert_s, "largest_compaction": list(largest_compaction),
            "largest_insert": list(largest_insert),
            "rollout_roofline_s": prefill_s + decode_s + compact_s + insert_s,
            "engine_prompts_cache_bytes_per_chip": int(prompts_cache),
            "engine_decode_peak_bytes_per_chip": int(decode.total + prompts_cache)}
