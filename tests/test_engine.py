"""The continuous-batching engine draws the static sampler's samples, row for row, whatever its schedule."""

import dataclasses

import jax
import numpy as np
import pytest
from _tiny import make_hf_model
from flax import nnx

from realjax import sharding as shd
from realjax.data import batch_prompts
from realjax.models import from_pretrained
from realjax.sampling import Engine, Sampler, SamplingConfig, nucleus
from realjax.sampling.schedule import bucket_sizes, compaction_order, schedule

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [20, 21, 22], [23], [30, 31, 32, 33, 34]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # One family: the engine drives the model's forward unchanged (tests/test_sampler.py covers families).
    d = tmp_path_factory.mktemp("qwen2")
    make_hf_model("qwen2", d, seed=3)
    return from_pretrained(d)


def _run(sampler, model, *, group_size=2, budgets=None, mesh=None, seed=0, prompts=PROMPTS):
    ids, mask = batch_prompts(prompts, 0, buckets=(8,))
    if mesh is not None:
        ids, mask = shd.put_batch((ids, mask), mesh, sampler.rules)
    graphdef, state = nnx.split(model)
    out = sampler(graphdef, state, ids, mask, jax.random.key(seed), group_size=group_size, budgets=budgets)
    return jax.tree.map(np.asarray, out)


def _assert_same(got, want):
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.finished, want.finished)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def _budgets(rows, new, seed=0):
    """Per-row budgets spread over [1, new]: rows end at different steps, as the bench's length oracle."""
    return np.random.default_rng(seed).integers(1, new + 1, rows)


def _stop_id(model, cfg, group_size, budgets):
    """A token that some row emits at step 1 of this very run: rows that emit it stop there, others not."""
    free = _run(Sampler(cfg, pad_id=0), model, group_size=group_size, budgets=budgets)
    return int(free.tokens[np.flatnonzero(free.lengths >= 3)[0], 1])


def _recording(engine):
    """The engine's compaction and insert programs as it runs them, in ``schedule``'s terms: (from bucket,
    to bucket) per compaction, (bucket, rows entering) per insert (its slot list is padded with the bucket)."""
    compactions, inserts = [], []
    compact, insert = engine._compact, engine._insert

    def compact_and_record(slots, order_J):
        compactions.append((slots.done_B.shape[0], order_J.shape[0]))
        return compact(slots, order_J)

    def insert_and_record(slots, res, prompts, key, group_size, slot_J, row_J, budget_J):
        inserts.append((slot_J.shape[0], int(np.sum(slot_J < slot_J.shape[0]))))
        return insert(slots, res, prompts, key, group_size, slot_J, row_J, budget_J)

    engine._compact, engine._insert = compact_and_record, insert_and_record
    return compactions, inserts


def _check(model, cfg, *, slots, compact_every, group_size=2, stop=False):
    budgets = _budgets(len(PROMPTS) * group_size, cfg.max_new_tokens)
    if stop:
        cfg = dataclasses.replace(cfg, stop_ids=(_stop_id(model, cfg, group_size, budgets),))
    want = _run(Sampler(cfg, pad_id=0), model, group_size=group_size, budgets=budgets)
    engine = Engine(cfg, pad_id=0, slots=slots, compact_every=compact_every)
    compactions, inserts = _recording(engine)
    _assert_same(_run(engine, model, group_size=group_size, budgets=budgets), want)
    sizes = [b for b, _, _ in engine.stats.chunks]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]  # the batch did shrink
    if slots:  # rows waited in the queue and refilled free slots
        assert sizes[0] <= slots and engine.trace_counts["insert"] >= 1
    # Compaction runs fewer row-steps than the static loop's rows x longest row.
    assert engine.stats.row_steps < budgets.size * (budgets.max() - 1)
    assert compactions and inserts and sum(n for _, n in inserts) == budgets.size  # every row entered once
    if not stop:  # rows end at their budgets: `realjax compile`'s schedule is the engine's, chunk for chunk
        plan = schedule(budgets, prompt=8, new=cfg.max_new_tokens, slots=slots, multiple=1,
                        compact_every=compact_every, window_tokens=cfg.window_tokens)
        assert (engine.stats.chunks, compactions, inserts) == (plan.chunks, plan.compactions, plan.inserts)
    return want


def test_engine_equals_static_sampler_sampled_with_refill_and_stops(model, monkeypatch):
    # Top-p with 72 candidates (the tiny vocabulary, 101, fits the default): this model's nuclei (71-72
    # tokens at the first step) are bisected for some rows, under a cond on the whole batch, and settled
    # by the candidates for others; each row must still draw what it draws in any other batch.
    monkeypatch.setattr(nucleus, "CANDIDATES", 72)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.5, top_p=0.8, window_tokens=8)
    want = _check(model, cfg, slots=5, compact_every=4, stop=True)
    assert want.finished.any() and not want.finished.all()


def test_engine_equals_static_sampler_greedy_with_windows(model):
    _check(model, SamplingConfig(max_new_tokens=12, temperature=0.0, window_tokens=4), slots=0, compact_every=3)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("slots,compact_every", [(0, 1), (0, 5), (3, 2), (7, 3), (12, 4)])
@pytest.mark.parametrize("stop", [False, True])
def test_engine_equals_static_sampler_every_schedule(model, temperature, slots, compact_every, stop):
    cfg = SamplingConfig(max_new_tokens=12, temperature=temperature, window_tokens=5)
    _check(model, cfg, slots=slots, compact_every=compact_every, group_size=3, stop=stop)


def test_engine_on_a_mesh_equals_one_device(tmp_path):
    make_hf_model("qwen2", tmp_path, seed=4)
    mesh = shd.make_mesh(shd.MeshConfig(2, 2, 2))
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.8, window_tokens=10)
    prompts = PROMPTS[:4]  # the prompt batch splits over the 4 data-parallel devices
    # 16 rows through 8 slots: queued rows refill, and the batch compacts from 8 slots to 4 (each chip's
    # rows gathered on the chip, ``compaction_order``) once no chip holds more than one live row.
    budgets = _budgets(16, 10, seed=1)
    want = _run(Sampler(cfg, pad_id=0), from_pretrained(tmp_path), group_size=4, budgets=budgets, prompts=prompts)
    engine = Engine(cfg, pad_id=0, slots=8, compact_every=4, mesh=mesh)
    compactions, inserts = _recording(engine)
    sharded = from_pretrained(tmp_path, mesh=mesh, rules=shd.ROLLOUT_RULES)
    got = _run(engine, sharded, group_size=4, budgets=budgets, mesh=mesh, prompts=prompts)
    _assert_same(got, want)
    assert all(b % 4 == 0 for b, _, _ in engine.stats.chunks)  # batch axis stays divisible by data x fsdp
    plan = schedule(budgets, prompt=8, new=10, slots=8, multiple=4, compact_every=4, window_tokens=10)
    assert (engine.stats.chunks, compactions, inserts) == (plan.chunks, plan.compactions, plan.inserts)
    assert compactions and len(inserts) > 1


def test_compaction_keeps_rows_on_their_chip():
    live = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], bool)  # 4 chips x 4 slots
    order = compaction_order(live, 0, 16, (4, 8, 12, 16), chips=4)
    # The busiest chip has 2 live rows, so the bucket is 8 (2 per chip), not 4 (the 4 live rows).
    np.testing.assert_array_equal(order, [0, 1, 4, 5, 8, 9, 12, 13])
    assert compaction_order(live, 0, 16, (4, 8, 12, 16), chips=1).tolist() == [0, 1, 4, 12]
    assert compaction_order(live, 12, 16, (4, 8, 12, 16), chips=4) is None  # the queue needs the slots


def test_compaction_copy_equals_the_gather():
    # The per-chip compaction copies rows one at a time (engine._copy_rows): the gather's values exactly.
    from realjax.models.kv_cache import KVCache
    from realjax.sampling.engine import _copy_rows

    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((3, 6, 2, 5, 4)).astype(np.float32) for _ in range(2))
    cache = KVCache(k=k, v=v, mask=rng.random((6, 5)) < 0.5, end=rng.integers(0, 5, 6).astype(np.int32))
    idx = np.array([4, 0, 5, 5], np.int32)
    got, want = jax.jit(_copy_rows)(cache, idx), cache.take_rows(idx)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_simulated_schedule_without_a_model():
    # 3 rows of 5, 2 and 9 tokens in 2 slots, 2 steps a chunk, windows of 3: rows 0 and 1 run first (their
    # first token comes at insert); row 1 ends in chunk 1 and row 2 takes its slot; row 0 ends in chunk 2
    # and row 2 goes on alone in a bucket of 1. Each window covers the longest row's tokens + 2, in 3s.
    # Moves: rows 0 and 1 enter both slots, row 2 one slot; then the batch of 2 compacts to 1.
    plan = schedule([5, 2, 9], prompt=4, new=9, slots=2, multiple=1, compact_every=2, window_tokens=3)
    assert plan.chunks == [(2, 4 + 3, 2), (2, 4 + 6, 2), (1, 4 + 6, 2), (1, 4 + 6, 2), (1, 4 + 9, 2)]
    assert plan.inserts == [(2, 2), (2, 1)] and plan.compactions == [(2, 1)]


def test_bucket_sizes_are_few_and_divisible():
    assert bucket_sizes(64) == (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64)
    assert bucket_sizes(64, 8) == (8, 16, 24, 32, 40, 48, 56, 64)
    assert bucket_sizes(12, 4) == (4, 8, 12)
    sizes = bucket_sizes(1024, 4)
    assert len(sizes) <= 40 and all(s % 4 == 0 for s in sizes) and sizes[-1] == 1024
