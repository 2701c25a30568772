"""The KV-cache sampler: cache == full forward, parity with HF generate, distributions, stops, sharing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import make_hf_model
from flax import nnx

from realjax import sharding as shd
from realjax.data import batch_prompts
from realjax.models import KVCache, from_pretrained
from realjax.sampling import Sampler, SamplingConfig, choose, decode_windows, truncate
from realjax.sampling.strategies import block_width, categorical

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    tm = make_hf_model(request.param, d, seed=3)
    return from_pretrained(d), tm


def _sample(model, cfg, prompts=PROMPTS, group_size=1, seed=0, mesh=None, buckets=(8, 16)):
    ids, mask = batch_prompts(prompts, 0, buckets=buckets)
    sampler = Sampler(cfg, pad_id=0, mesh=mesh)
    if mesh is not None:
        ids, mask = shd.put_batch((ids, mask), mesh, sampler.rules)
    graphdef, state = nnx.split(model)
    out = sampler(graphdef, state, ids, mask, jax.random.key(seed), group_size=group_size)
    return jax.tree.map(np.asarray, out), (ids, mask)


def test_cached_decode_equals_full_forward(tiny):
    model, _ = tiny
    ids, mask = batch_prompts(PROMPTS, 0, buckets=(8,))
    rest = np.random.default_rng(0).integers(3, 100, (3, 6))
    full_ids = np.concatenate([ids, rest], 1)
    full_mask = np.concatenate([mask, np.ones_like(rest)], 1)
    want = np.asarray(model(jnp.asarray(full_ids), attention_mask_BT=jnp.asarray(full_mask)))
    h, cache = model.hidden_states(jnp.asarray(ids), mask_BT=jnp.asarray(mask), cache=KVCache.zeros(model.cfg, 3, 14))
    got = [np.asarray(model.logits(h))]
    plen = mask.sum(1)
    for t in range(rest.shape[1]):
        h, cache = model.hidden_states(jnp.asarray(rest[:, t:t + 1]), jnp.asarray(plen + t)[:, None],
                                       jnp.ones((3, 1), bool), cache=cache)
        got.append(np.asarray(model.logits(h)))
    got = np.concatenate(got, 1)
    np.testing.assert_allclose(got[full_mask == 1], want[full_mask == 1], atol=1e-5)


def test_greedy_equals_transformers_generate(tiny):
    import torch

    model, tm = tiny
    out, _ = _sample(model, SamplingConfig(max_new_tokens=10, temperature=0.0))
    for i, p in enumerate(PROMPTS):
        ref = tm.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert out.tokens[i].tolist() == ref


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_logprobs_are_the_tempered_log_softmax_at_the_chosen_tokens(tiny, temperature):
    model, _ = tiny
    out, (ids, mask) = _sample(model, SamplingConfig(max_new_tokens=8, temperature=temperature, top_k=20, top_p=0.9))
    seq = np.concatenate([ids, out.tokens], 1)
    seq_mask = np.concatenate([mask, out.mask.astype(int)], 1)
    z = np.asarray(model(jnp.asarray(seq), attention_mask_BT=jnp.asarray(seq_mask)), np.float64)
    z = z[:, ids.shape[1] - 1:-1] / (temperature or 1.0)  # the untruncated tempered policy
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    want = np.take_along_axis(logp, out.tokens[..., None], -1)[..., 0] * out.mask
    np.testing.assert_allclose(out.logprobs, want, atol=2e-5)


def test_top_k_one_is_greedy(tiny):
    model, _ = tiny
    greedy, _ = _sample(model, SamplingConfig(max_new_tokens=8, temperature=0.0))
    top1, _ = _sample(model, SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=1), seed=7)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)


def test_top_p_keeps_exactly_the_nucleus():
    p = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    perm = np.array([3, 0, 5, 1, 4, 2])
    z = jnp.log(jnp.asarray(p[perm]))[None]  # shuffled
    for top_p, size in [(0.3, 1), (0.39, 1), (0.41, 2), (0.64, 2), (0.66, 3), (0.79, 3), (0.81, 4), (0.95, 5), (1.0, 6)]:
        kept = np.isfinite(np.asarray(truncate(z, top_p=top_p)))[0]
        assert kept.sum() == size, (top_p, kept)
        assert set(perm[kept].tolist()) == set(range(size))  # the `size` most likely tokens


def _chi_square(counts, probs):
    expected = probs * counts.sum()
    nz = expected > 0
    assert counts[~nz].sum() == 0, "sampled a token outside the support"
    return (((counts - expected) ** 2)[nz] / expected[nz]).sum(), nz.sum() - 1


@pytest.mark.parametrize("cfg,support", [
    (SamplingConfig(max_new_tokens=1, temperature=1.0), 6),
    (SamplingConfig(max_new_tokens=1, temperature=0.5), 6),
    (SamplingConfig(max_new_tokens=1, temperature=1.0, top_k=3), 3),
    (SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=0.7), 3),
])
def test_sampled_frequencies_match_the_distribution(cfg, support):
    logits = jnp.log(jnp.array([0.35, 0.25, 0.2, 0.1, 0.06, 0.04]))
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    tokens, _ = jax.jit(lambda k: choose(jnp.broadcast_to(logits, (n, 6)), k, cfg))(keys)
    z = np.asarray(logits, np.float64) / cfg.temperature
    probs = np.exp(z) / np.exp(z).sum()
    probs[support:] = 0
    probs /= probs.sum()
    stat, dof = _chi_square(np.bincount(np.asarray(tokens), minlength=6), probs)
    critical = {2: 13.82, 5: 20.52}[dof]  # chi-square quantile at p = 0.999
    assert stat < critical


@pytest.mark.parametrize("vocab", [97, 120])  # 9 blocks of 10 and a short last one of 7; 10 blocks of 12
def test_blocked_categorical_matches_the_float64_softmax(vocab):
    """``categorical`` (a block, then a token in it) draws each token with its softmax probability,
    -inf entries and a whole -inf block never, on logits spread over several orders of magnitude."""
    rng = np.random.default_rng(vocab)
    z = rng.normal(0.0, 1.5, vocab)
    z[rng.choice(vocab, vocab // 5, replace=False)] = -np.inf
    w = block_width(vocab)
    z[w:2 * w] = -np.inf  # the second block is empty
    n = 40000
    keys = jax.random.split(jax.random.key(1), n)
    tokens = jax.jit(categorical)(keys, jnp.broadcast_to(jnp.asarray(z, jnp.float32), (n, vocab)))
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    stat, dof = _chi_square(np.bincount(np.asarray(tokens), minlength=vocab), probs)
    assert stat < chi2_quantile_999(dof), (stat, dof)


def test_blocked_categorical_draws_do_not_depend_on_the_batch():
    """A row's draw depends on its key and logits only: alone, or inside a batch in another order."""
    z = jax.random.normal(jax.random.key(2), (16, 2374)) * 3  # 2 x 1187: blocks of 49, a short last one
    keys = jax.random.split(jax.random.key(3), 16)
    draw = jax.jit(categorical)
    batch = np.asarray(draw(keys, z))
    perm = np.random.default_rng(0).permutation(16)
    np.testing.assert_array_equal(np.asarray(draw(keys[perm], z[perm])), batch[perm])
    assert [int(draw(keys[i:i + 1], z[i:i + 1])[0]) for i in range(3)] == batch[:3].tolist()


def chi2_quantile_999(dof: int) -> float:
    """The chi-square quantile at p = 0.999 (Wilson-Hilferty: within 0.5% for dof >= 20)."""
    return dof * (1 - 2 / (9 * dof) + 3.0902 * np.sqrt(2 / (9 * dof))) ** 3


def test_stop_ids_end_rows_independently(tiny):
    model, _ = tiny
    free, _ = _sample(model, SamplingConfig(max_new_tokens=10, temperature=0.0))
    stop = int(free.tokens[0, 3])  # row 0 emits this at step 3 (or earlier)
    out, _ = _sample(model, SamplingConfig(max_new_tokens=10, temperature=0.0, stop_ids=(stop, 9999)))
    for r in range(len(PROMPTS)):
        hits = np.flatnonzero(free.tokens[r] == stop)
        length = hits[0] + 1 if len(hits) else 10
        assert out.lengths[r] == length and out.finished[r] == bool(len(hits))
        np.testing.assert_array_equal(out.tokens[r, :length], free.tokens[r, :length])
        assert np.all(out.tokens[r, length:] == 0) and np.all(out.logprobs[r, length:] == 0)
        np.testing.assert_array_equal(out.mask[r], np.arange(10) < length)


def test_shared_group_prefill_equals_per_row_prefill(tiny):
    model, _ = tiny
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.95)
    shared, _ = _sample(model, cfg, group_size=3, seed=5)
    rows = [p for p in PROMPTS for _ in range(3)]
    separate, _ = _sample(model, cfg, prompts=rows, group_size=1, seed=5)
    np.testing.assert_array_equal(shared.tokens, separate.tokens)
    np.testing.assert_allclose(shared.logprobs, separate.logprobs, atol=1e-5)
    assert len({tuple(t) for t in shared.tokens[:3]}) > 1  # the group's rollouts do differ


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 2, 4)])
def test_sharded_equals_unsharded(tmp_path, mesh_shape):
    make_hf_model("qwen2", tmp_path, seed=4)
    mesh = shd.make_mesh(shd.MeshConfig(*mesh_shape))
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.8)
    prompts = PROMPTS + [[20, 21, 22], [23]] + PROMPTS[:3]
    plain, _ = _sample(from_pretrained(tmp_path), cfg, prompts=prompts, group_size=2)
    sharded, _ = _sample(from_pretrained(tmp_path, mesh=mesh, rules=shd.ROLLOUT_RULES), cfg, prompts=prompts,
                         group_size=2, mesh=mesh)
    np.testing.assert_array_equal(sharded.tokens, plain.tokens)
    np.testing.assert_allclose(sharded.logprobs, plain.logprobs, atol=1e-5)


def test_bucketed_prompt_lengths_compile_once(tiny):
    model, _ = tiny
    sampler = Sampler(SamplingConfig(max_new_tokens=4, temperature=1.0), pad_id=0)
    graphdef, state = nnx.split(model)
    for i, length in enumerate([3, 9, 16, 12, 1]):  # all in the 16 bucket
        ids, mask = batch_prompts([[5] * length, [6] * max(1, length - 1)], 0, buckets=(16, 32))
        sampler(graphdef, state, ids, mask, jax.random.key(i), group_size=2)
    assert sampler.trace_counts == {"prefill": 1, "decode": 1}


def test_decode_windows_grow_to_the_whole_cache():
    assert decode_windows(16, 10, 4) == (20, 24, 26)
    assert decode_windows(1024, 8192, 1024) == tuple(1024 + 1024 * i for i in range(1, 9))
    assert decode_windows(8, 5, 1024) == (13,)  # a budget within one window: one program, as before
    with pytest.raises(ValueError, match="window_tokens"):
        SamplingConfig(max_new_tokens=4, window_tokens=0)


@pytest.mark.parametrize("temperature,stop", [pytest.param(0.0, False, marks=pytest.mark.slow), (1.0, False),
                                              (0.0, True)])
def test_windowed_decode_equals_one_window(tiny, temperature, stop):
    """Attending over a growing window of the cache changes nothing: the slots past it are unwritten."""
    model, _ = tiny
    stop_ids = ()
    if stop:  # a stop token that ends some rows inside the second window
        free, _ = _sample(model, SamplingConfig(max_new_tokens=11, temperature=0.0))
        stop_ids = (int(free.tokens[0, 5]),)
    whole, _ = _sample(model, SamplingConfig(max_new_tokens=11, temperature=temperature, stop_ids=stop_ids),
                       group_size=2)
    cfg = SamplingConfig(max_new_tokens=11, temperature=temperature, stop_ids=stop_ids, window_tokens=3)
    windowed, _ = _sample(model, cfg, group_size=2)
    np.testing.assert_array_equal(windowed.tokens, whole.tokens)
    np.testing.assert_array_equal(windowed.lengths, whole.lengths)
    np.testing.assert_allclose(windowed.logprobs, whole.logprobs, atol=1e-5)
    if stop:
        assert windowed.finished.any() and not windowed.finished.all()


def test_each_window_is_one_compile(tiny):
    model, _ = tiny
    sampler = Sampler(SamplingConfig(max_new_tokens=10, temperature=1.0, window_tokens=4), pad_id=0)
    graphdef, state = nnx.split(model)
    for i in range(3):
        ids, mask = batch_prompts(PROMPTS, 0, buckets=(8,))
        sampler(graphdef, state, ids, mask, jax.random.key(i))
    assert sampler.trace_counts == {"prefill": 1, "decode": 3}  # windows 12, 16, 18
