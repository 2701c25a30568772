"""Packed rollouts: the plan places every real token once, and packed log-probs and updates equal the padded
ones, on one device and on the 8-device CPU mesh, whatever the rows' lengths."""

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _toy import toy_batch, toy_model
from realjax import sharding as shd
from realjax.losses import TERMS
from realjax.models.attention import Backend
from realjax.rl.batch import TrainState
from realjax.rl.packing import (PackingError, pack, pack_batch, packed_tokens, plan_sequences, row_lengths,
                                sequence_buckets, sequence_lengths)
from realjax.rl.update import make_update_step, policy_logprobs

R, Q, A = 4, 5, 7
DEMO = Path(__file__).resolve().parents[1] / "realjax" / "configs" / "demo.yaml"
C = Q + A - 1  # a packed sequence holds one full row


def _ragged(rows=16):
    """Rows of very different lengths: a full row (fills a whole packed sequence), a one-token prompt
    with a one-token response, an empty response (from toy_batch), two rows dropped whole."""
    b = toy_batch(rows=rows, group_size=R, prompt=Q, response=A, dropped=(5, 14))
    pm, rm = b.prompt_mask_BQ.copy(), b.resp_mask_BA.copy()
    pm[0], rm[0] = 1, 1.0
    pm[3], rm[3] = (np.arange(Q) == Q - 1), (np.arange(A) == 0)
    pm[9], rm[9] = 1, 1.0
    return b.replace(prompt_mask_BQ=pm.astype(np.int32), resp_mask_BA=rm.astype(np.float32),
                     prompt_ids_BQ=(b.prompt_ids_BQ * pm).astype(np.int32),
                     old_logp_BA=(b.old_logp_BA * rm).astype(np.float32))


@functools.lru_cache(maxsize=1)
def _split():
    return nnx.split(toy_model(0))


def test_plan_places_every_real_token_once():
    b = _ragged()
    p = pack(b.prompt_mask_BQ, b.resp_mask_BA, sequences=16)
    real_BT = np.concatenate([b.prompt_mask_BQ, b.resp_mask_BA[:, :-1]], axis=1) > 0
    used = p.segment_ids_ZC > 0
    src = p.src_ZC[used]
    assert len(np.unique(src)) == len(src), "a token packed twice"
    rows_of = src // C
    for r in range(16):
        span = np.sort(src[rows_of == r] % C)
        if b.resp_mask_BA[r].sum() == 0:
            assert span.size == 0, "an empty response runs nothing"
            continue
        last = Q - 1 + int(b.resp_mask_BA[r].sum()) - 1  # the input predicting the last response token
        np.testing.assert_array_equal(span, np.flatnonzero(real_BT[r])[np.flatnonzero(real_BT[r]) <= last])
    full = np.flatnonzero((p.segment_ids_ZC > 0).sum(1) == C)
    assert len(full) >= 2, "the two full rows each fill a sequence"
    # Within a segment: positions count up from 0, tokens keep their row order.
    for z in range(p.src_ZC.shape[0]):
        for s in set(p.segment_ids_ZC[z][p.segment_ids_ZC[z] > 0]):
            at = p.segment_ids_ZC[z] == s
            np.testing.assert_array_equal(p.positions_ZC[z][at], np.arange(at.sum()))
            assert np.all(np.diff(p.src_ZC[z][at]) > 0)
    # Each scored token points at the slot holding its predecessor's input token.
    scored = p.dst_BA >= 0
    np.testing.assert_array_equal(scored, b.resp_mask_BA > 0)
    bb, aa = np.nonzero(scored)
    np.testing.assert_array_equal(p.src_ZC.reshape(-1)[p.dst_BA[scored]], bb * C + Q - 1 + aa)
    # A row runs its prompt and its response but the last token (which predicts nothing).
    n_q, n_a = b.prompt_mask_BQ.sum(1), b.resp_mask_BA.sum(1)
    assert packed_tokens(p) == int(((n_q + n_a - 1) * (n_a > 0)).sum())
    # Every padding slot is a segment of its own, never a row's.
    pad_ids = [p.segment_ids_ZC[z][~used[z]] for z in range(len(used))]
    assert all((ids < 0).all() and len(np.unique(ids)) == len(ids) for ids in pad_ids)
    with pytest.raises(PackingError, match="need"):
        pack(b.prompt_mask_BQ, b.resp_mask_BA, sequences=2)
    with pytest.raises(PackingError, match="shorter than a row"):
        pack(b.prompt_mask_BQ, b.resp_mask_BA, sequences=16, length=C - 1)
    # Longer sequences hold the same rows in fewer of them, the same tokens in the same order.
    long = pack(b.prompt_mask_BQ, b.resp_mask_BA, sequences=16, length=2 * C)
    assert packed_tokens(long) == packed_tokens(p) and long.src_ZC.shape == (16, 2 * C)
    assert ((long.segment_ids_ZC > 0).sum(1) > 0).sum() < ((p.segment_ids_ZC > 0).sum(1) > 0).sum()
    np.testing.assert_array_equal(long.src_ZC.reshape(-1)[long.dst_BA[scored]], bb * C + Q - 1 + aa)


def test_sequence_shapes_come_from_a_bounded_set():
    # up a quarter at a time from the budget's count, and every multiple of the devices up to a quarter above it
    assert sequence_buckets(64, 100, 1000, 1) == (10, 11, 12, 13, 17, 22, 28, 35, 44, 55, 64)
    assert sequence_buckets(64, 100, 1000, 8) == (16, 24, 32, 40, 56, 64)
    assert sequence_buckets(64, 9215, 32 * 9215, 4) == (32, 36, 40, 52, 64)
    assert len(sequence_buckets(4096, 100, 1000, 1)) < 40
    assert sequence_buckets(8, 100, 10, 8) == (8,)
    # lengths: a padded row's, then whole splash tiles past its own up to an eighth longer
    assert sequence_lengths(9215) == (9215, 9728, 10240)
    assert sequence_lengths(100) == (100,) and sequence_lengths(8191) == (8191, 8704)
    b = _ragged().cut(2)
    packed = pack_batch(b, tokens_per_micro_batch=3 * C, multiple=1)
    assert packed.packing.src_ZC.shape[:1] == (2,) and packed.packing.src_ZC.shape[1] in (3, 4, 5, 7, 8)


def _logprobs(batch, mesh=None, backend=Backend()):
    graphdef, params = _split()
    fn = jax.jit(lambda p, mb: policy_logprobs(nnx.merge(graphdef, p), mb, temperature=0.9, chunk_tokens=32))
    if mesh is not None:
        batch = shd.put_batch(batch, mesh, axis=0)
    with_backend = jax.jit(lambda p, mb: _with(backend, lambda: policy_logprobs(
        nnx.merge(graphdef, p), mb, temperature=0.9, chunk_tokens=32)))
    return jax.tree.map(np.asarray, (with_backend if backend.name != "xla" else fn)(params, batch))


def _with(backend, f):
    from realjax.models.attention import use_backend

    with use_backend(backend):
        return f()


@pytest.mark.parametrize("devices", [8, pytest.param(1, marks=pytest.mark.slow)])
def test_packed_logprobs_equal_padded(devices):
    mesh = shd.make_mesh(None, jax.devices()[:devices]) if devices > 1 else None
    b = _ragged()
    padded_logp, padded_ent = _logprobs(b, mesh)
    packed = pack_batch(b.cut(1), tokens_per_micro_batch=5 * C, multiple=devices)
    # On 8 devices the 16 rows keep 16 sequences (a multiple of 8), but rows still share sequences and land
    # on other devices than their own.
    assert packed.packing.src_ZC.shape[1] < 16 or devices == 8
    assert packed.packing.segment_ids_ZC.max() >= 2, "sequences must hold several rows"
    logp, ent = _logprobs(jax.tree.map(lambda x: x[0], packed), mesh)
    m = b.resp_mask_BA > 0
    np.testing.assert_allclose(logp[m], padded_logp[m], atol=1e-5)
    np.testing.assert_allclose(ent[m], padded_ent[m], atol=1e-5)
    assert (logp[~m] == 0).all()


def test_the_plan_takes_the_smallest_capacity_over_lengths_and_longer_sequences_are_exact():
    """Rows of 7 tokens: one per sequence of C = 11 (three sequences, 33 slots), two per sequence of 14
    (two sequences, 28 slots; of 16, 32): the plan takes the smallest capacity, and the log-probs stay the
    padded ones in sequences longer than a row."""
    lengths = np.full((2, 3), 7)
    at_c = plan_sequences(lengths, C, tokens_per_micro_batch=2 * C, seq_lengths=(C,))
    plan = plan_sequences(lengths, C, tokens_per_micro_batch=2 * C, seq_lengths=(C, 14, 16))
    assert (at_c.sequences, at_c.length) == (3, C) and (plan.sequences, plan.length) == (2, 14)
    assert plan.capacity <= at_c.capacity
    b = _ragged()
    padded_logp, _ = _logprobs(b)
    logp, _ = _logprobs(b.replace(packing=pack(b.prompt_mask_BQ, b.resp_mask_BA, sequences=6, length=3 * C)))
    m = b.resp_mask_BA > 0
    np.testing.assert_allclose(logp[m], padded_logp[m], atol=1e-5)


@pytest.mark.slow
def test_packed_logprobs_equal_padded_on_splash():
    """The splash back end (Pallas interpret mode on a CPU) on the packed sequences."""
    b = _ragged()
    padded_logp, _ = _logprobs(b)
    packed = jax.tree.map(lambda x: x[0], pack_batch(b.cut(1), tokens_per_micro_batch=5 * C, multiple=1))
    logp, _ = _logprobs(packed, backend=Backend(name="splash"))
    m = b.resp_mask_BA > 0
    np.testing.assert_allclose(logp[m], padded_logp[m], atol=1e-5)


def _update(batch, *, micro, packed_budget=0, mesh=None, name="real", group_size=0):
    graphdef, params = _split()
    step = make_update_step(graphdef, optax.sgd(0.5), TERMS[name], {}, group_size=R, temperature=0.9,
                            chunk_tokens=32)
    cut = batch.cut(micro)
    if packed_budget:
        cut = pack_batch(cut, tokens_per_micro_batch=packed_budget, multiple=1 if mesh is None else 8,
                         group_size=group_size)
    if mesh is not None:
        cut = shd.put_batch(cut, mesh, axis=1)
    params = jax.tree.map(jnp.copy, params)  # the step donates its state
    state, metrics = step(TrainState(params, optax.sgd(0.5).init(params)), cut)
    return jax.tree.map(np.asarray, state.params), {k: float(m.value) for k, m in metrics.items()}


@pytest.mark.parametrize("devices,micro,name", [(8, 1, "real"), pytest.param(1, 2, "real", marks=pytest.mark.slow),
                                                 pytest.param(1, 1, "grpo", marks=pytest.mark.slow)])
def test_packed_update_equals_padded(devices, micro, name):
    """One update's parameters and metrics, padded vs packed (micro-batches share one packed shape)."""
    mesh = shd.make_mesh(None, jax.devices()[:devices]) if devices > 1 else None
    b = _ragged()
    start = jax.tree.map(np.asarray, _split()[1])
    want, m_want = _update(b, micro=micro, mesh=mesh, name=name)
    got, m_got = _update(b, micro=micro, packed_budget=3 * C, mesh=mesh, name=name)
    moved = max(float(np.abs(a - s).max()) for a, s in zip(jax.tree.leaves(want), jax.tree.leaves(start)))
    assert moved > 1e-4, "the update must move the parameters for this test to mean anything"
    for a, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, a, rtol=1e-4, atol=2e-6)
    for key in ("loss", "entropy", "grad_norm", "valid_groups"):
        np.testing.assert_allclose(m_got[key], m_want[key], rtol=1e-4, atol=1e-6, err_msg=key)


def _lopsided():
    """Groups 0 and 1 of full rows (one sequence each), groups 2 and 3 of one-token rows: cut in two as they
    come, one micro-batch needs 8 sequences; with a full and a short group each, 5."""
    b = toy_batch(rows=16, group_size=R, prompt=Q, response=A)
    pm, rm = np.zeros((16, Q), np.int32), np.zeros((16, A), np.float32)
    pm[:8], rm[:8] = 1, 1.0
    pm[8:, -1], rm[8:, 0] = 1, 1.0
    return b.replace(prompt_mask_BQ=pm, resp_mask_BA=rm, prompt_ids_BQ=(b.prompt_ids_BQ * pm).astype(np.int32),
                     old_logp_BA=(b.old_logp_BA * rm).astype(np.float32))


def test_groups_move_between_micro_batches_only_to_lower_the_sequence_count():
    b = _lopsided()
    lengths = np.stack([row_lengths(m.prompt_mask_BQ, m.resp_mask_BA) for m in (b.rows_slice(0, 8), b.rows_slice(8, 16))])
    kept = plan_sequences(lengths, C, tokens_per_micro_batch=3 * C)
    moved = plan_sequences(lengths, C, tokens_per_micro_batch=3 * C, group_size=R)
    buckets = sequence_buckets(8, C, 3 * C, 1)
    assert (kept.sequences, moved.sequences) == (8, 5) and {8, 5} <= set(buckets)
    assert (moved.needed <= moved.sequences).all()
    np.testing.assert_array_equal(kept.order, np.arange(16))
    groups = moved.order.reshape(-1, R)  # whole groups, each keeping its rows' order
    np.testing.assert_array_equal(groups - groups[:, :1], np.tile(np.arange(R), (4, 1)))
    assert sorted(groups[:, 0] // R) == [0, 1, 2, 3] and {groups[0, 0] // R, groups[1, 0] // R} != {0, 1}
    # nothing to gain: the rows stay where they are
    even = plan_sequences(np.full((2, 8), C), C, tokens_per_micro_batch=3 * C, group_size=R)
    np.testing.assert_array_equal(even.order, np.arange(16))
    packed = pack_batch(b.cut(2), tokens_per_micro_batch=3 * C, group_size=R)
    assert packed.packing.src_ZC.shape[:2] == (2, 5)
    np.testing.assert_array_equal(packed.rewards_B.reshape(-1), b.rewards_B[moved.order])


def test_an_update_with_groups_moved_equals_the_padded_one():
    """The gradient does not depend on which micro-batch holds a group: moved and packed == padded."""
    b = _lopsided()
    want, m_want = _update(b, micro=2)
    got, m_got = _update(b, micro=2, packed_budget=3 * C, group_size=R)
    for a, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, a, rtol=1e-4, atol=2e-6)
    for key in ("loss", "entropy", "grad_norm", "valid_groups"):
        np.testing.assert_allclose(m_got[key], m_want[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install 'realjax[tpu]')")
def test_packed_update_with_splash_lowers_for_tpu(tmp_path):
    """`realjax compile` of a one-layer model with packing and splash attention for v5p-8: the scoring-free
    update (packed sequences of at least 31 tokens, a multiple of the 4 fsdp devices) compiles and fits."""
    import contextlib
    import io
    import json

    from realjax.cli import main as cli_main
    from realjax.rl.setup import DEMO_ASSET

    arch = json.loads((DEMO_ASSET / "config.json").read_text())
    arch.update(num_hidden_layers=1, hidden_size=64, intermediate_size=128, head_dim=128)
    (tmp_path / "config.json").write_text(json.dumps(arch))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(["compile", "--topology", "v5p-8", "--json", f"model.path={tmp_path}", "model.attention=splash",
                       "optim.tokens_per_micro_batch=248", "rollout.max_new_tokens=16", "rollout.prompts_per_step=8",
                       "rollout.prompts_per_call=4", "data.max_prompt_tokens=16", "data.eval="])
    rep = json.loads(out.getvalue())
    update = rep["programs"]["update"]
    assert rc == 0 and update["fits"] and not update["error"], update
    # compiled at the largest shape the updates run under the priced lengths (the budget's is 8 x 31)
    z, length = max(rep["update_under_lengths"]["shapes_run"], key=lambda zl: zl[0] * zl[1])
    assert f"packed into {z} x {length}" in update["shape"] and z * length >= 8 * 31


@pytest.mark.parametrize("override,message", [
    ("optim.tokens_per_micro_batch=-1", "optim.tokens_per_micro_batch must be >= 0"),
    ("optim.tokens_per_micro_batch=100", "is less than one packed sequence"),
    ("model.attention=flash", "model.attention: unknown attention back end 'flash'"),
])
def test_bad_packing_and_attention_settings_fail_at_load(override, message):
    from realjax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, override.split())


@pytest.mark.parametrize("override,message", [
    ("optim.tokens_per_micro_batch=10000000", "holds the 64 rows of a micro-batch padded"),
    ("model.attention=splash", "model.attention: attention back end splash needs a TPU"),
])
def test_the_plan_checks_packing_and_attention_against_the_run(override, message):
    from realjax.config import ConfigError, load_config
    from realjax.rl.plan import make_plan

    cfg = load_config(DEMO, override.split())
    graphdef, params = _split()
    with pytest.raises(ConfigError, match=message):
        make_plan(cfg, shd.make_mesh(None), compute_dtype="float32", abstract_params=params, stop_ids=(0,))


@pytest.mark.slow
def test_packed_update_bench(capsys):
    """`realjax bench update --lengths`: runs end to end at a tiny size, both programs give the same loss."""
    import json
    import math

    from realjax import cli

    rc = cli.main(["bench", "update", "--preset", "tiny", "--layers", "1", "--repeats", "1", "--rows", "8",
                   "--prompt", "6", "--response", "24", "--group-size", "2", "--lengths", "r1-distill", "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0
    for k in ("padded_real_tok_s", "packed_real_tok_s", "ratio", "real_flops", "bound_step_s", "packed_flops"):
        assert math.isfinite(res[k]) and res[k] > 0, k
    assert res["packed_sequences"] < 8 and res["real_tokens"] < res["padded_tokens"]
    assert res["loss_packed"] == pytest.approx(res["loss_padded"], rel=1e-4)


def test_the_update_cost_report_counts_what_the_packing_runs():
    """``realjax compile``'s ``update_under_lengths``: the packed FLOPs are those of the sequences the
    trainer's own packing (groups moved) runs, their attention the tiles splash's segment tables compute
    on them (``realjax.models.splash_blocks``, on device), the parts add up, and the real tokens' FLOPs are
    the bench's."""
    from realjax.models import ModelConfig
    from realjax.models import splash_blocks as sb
    from realjax.tools.aot.packed_update import step_lengths, update_under_lengths
    from realjax.tools.bench.packing import real_token_flops
    from realjax.tools.bench.common import matmul_params

    cfg = ModelConfig(family="qwen2", vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=48)
    # sequences of 1087 tokens: 3 splash tiles of 512, rows crossing their edges
    rows, prompt, response, updates, micro, budget = 64, 64, 1024, 2, 4, 3 * 1087
    p_len, r_len = step_lengths("r1-distill", rows=rows, prompt=prompt, response=response, seed=3)
    u = update_under_lengths(cfg, "r1-distill", rows=rows, group_size=4, mini_batches=updates, micro_batches=micro,
                             prompt=prompt, response=response, tokens_per_micro_batch=budget, multiple=2, seed=3)
    Cs = prompt + response - 1
    pm = (np.arange(prompt)[None] >= prompt - p_len[:, None]).astype(np.int32)
    rm = (np.arange(response)[None] < r_len[:, None]).astype(np.float32)
    b = toy_batch(rows=rows, group_size=4, prompt=prompt, response=response).replace(prompt_mask_BQ=pm, resp_mask_BA=rm)
    per = rows // updates
    segs = [pack_batch(b.rows_slice(k * per, (k + 1) * per).cut(micro), tokens_per_micro_batch=budget, multiple=2,
                       group_size=4).packing.segment_ids_ZC for k in range(updates)]
    block, Tp = sb.tile(Cs)
    seg_SC = np.concatenate([s_.reshape(-1, Cs) for s_ in segs])
    seg_SC = jnp.asarray(np.pad(seg_SC, ((0, 0), (0, Tp - Cs))))  # splash pads to whole tiles, in segment 0
    (_, fwd_mask), (_, dkv_mask) = jax.vmap(lambda s_: sb.tables(*sb.block_bounds(s_, s_, block), jnp.int32))(seg_SC)
    assert int((fwd_mask > 0).sum()) == int((dkv_mask > 0).sum()) < len(seg_SC) * 6  # 6: a whole causal triangle
    pair = 12 * cfg.num_heads * cfg.head_dim * cfg.num_layers
    want = len(seg_SC) * 6 * matmul_params(cfg) * Cs + pair * block * block * int((fwd_mask > 0).sum())
    assert u["sequences_run"] == len(seg_SC) == micro * sum(s_.shape[1] for s_ in segs)
    np.testing.assert_allclose(u["packed_flops"], want, rtol=1e-12)
    np.testing.assert_allclose(u["real_flops"], real_token_flops(cfg, p_len, r_len), rtol=1e-12)
    np.testing.assert_allclose(u["real_flops"] + sum(u["parts_flops"].values()), u["packed_flops"], rtol=1e-12)
    assert all(v >= 0 for v in u["parts_flops"].values()) and u["packed_over_real"] > 1
    slots = u["slots"]
    assert slots["fewest"] <= slots["ffd"] <= slots["own_buckets"] <= slots["run"] == len(seg_SC) * Cs
    # XLA's attention: the whole square of every sequence run
    sq = update_under_lengths(cfg, "r1-distill", rows=rows, group_size=4, mini_batches=updates, micro_batches=micro,
                              prompt=prompt, response=response, tokens_per_micro_batch=budget, multiple=2, seed=3,
                              full_square=True)
    np.testing.assert_allclose(sq["packed_flops"], len(seg_SC) * (6 * matmul_params(cfg) * Cs + pair * Cs * Cs),
                               rtol=1e-12)
    # ``realjax compile``'s entry: a run config's step (None unpacked), and its line of the table
    from realjax.config import load_config
    from realjax.tools.aot.packed_update import format_update_line, price_config

    run = load_config(DEMO, ["optim.tokens_per_micro_batch=600"])
    assert price_config(load_config(DEMO), cfg, "r1-distill", prompt=16, multiple=1, attention="xla") is None
    line = format_update_line(price_config(run, cfg, "r1-distill", prompt=16, multiple=1, attention="splash"))
    assert line.startswith("updates under r1-distill lengths, packed: ") and "ffd fill +" in line
