"""Top-p without a full sort: the kept set equals the sort-based reference's, whichever way it is found."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampler import _chi_square, chi2_quantile_999

from realjax.sampling import SamplingConfig, choose, truncate
from realjax.sampling.nucleus import _from_key, _to_key, nucleus_threshold, nucleus_threshold_sorted

V = 3000
# top_p traced: one compile per candidate count, not per top_p.
_find = jax.jit(nucleus_threshold, static_argnames="candidates")
_sort = jax.jit(nucleus_threshold_sorted)
TOP_PS = (1e-6, 0.05, 0.5, 0.9, 0.95, 0.99, 0.999)


def _rows(seed=0):
    """[B, V] float32 logits: peaked (a few tokens hold the mass), LM-like (a heavy head on a flat
    floor), flat (the nucleus spans most of the row: past the candidates), with -inf entries, and with
    many ties (logits on a coarse grid)."""
    rng = np.random.default_rng(seed)
    rows = [rng.normal(0, 8, (4, V)), rng.normal(0, 0.05, (4, V)), rng.gumbel(0, 1.5, (4, V)),
            rng.normal(0, 1, (4, V)) + 12 * (rng.random((4, V)) < 0.002)]
    inf = rng.normal(0, 1, (4, V))
    inf[rng.random((4, V)) < 0.7] = -np.inf
    ties = np.round(rng.normal(0, 2, (4, V)) * 2) / 2
    flat_ties = np.round(rng.normal(0, 0.3, (4, V)) * 4) / 4
    return np.concatenate(rows + [inf, ties, flat_ties]).astype(np.float32)


def _mass_above(z, values):
    """float64 P(z > v) for each v in ``values`` (one row)."""
    p = np.exp(z.astype(np.float64) - z.max())
    p /= p.sum()
    order = np.argsort(-z, kind="stable")
    above = np.concatenate([[0.0], np.cumsum(p[order])])  # above[i]: the mass of the i largest
    return above[np.searchsorted(-z[order], -np.asarray(values), side="left")]


def _assert_kept_as_the_sort(z, got_B1, want_B1, top_p, edge=1e-6):
    """Same kept set on every row; a token may differ only where its float64 mass above is within
    ``edge`` of ``top_p`` (float32 sums of the row's probabilities carry errors of a few 1e-8 at 1, and
    the nucleus is undefined beyond rounding there). Returns the rows that differ."""
    # A -inf entry stays -inf whether or not it is "kept": compare what survives the truncation.
    got, want = (z >= np.asarray(got_B1)) & np.isfinite(z), (z >= np.asarray(want_B1)) & np.isfinite(z)
    differ = np.flatnonzero((got != want).any(-1))
    for b in differ:
        margin = np.abs(_mass_above(z[b], z[b][got[b] != want[b]]) - top_p)
        assert margin.max() < edge, (b, top_p, margin.max())
    return differ


@pytest.mark.parametrize("candidates", [8, 256])
def test_threshold_keeps_what_the_sort_keeps(candidates):
    z = _rows()
    bisected = 0
    for top_p in TOP_PS:
        got, want = _find(z, top_p, candidates=candidates), _sort(z, top_p)
        _assert_kept_as_the_sort(z, got, want, top_p)
        bisected += int(((z >= np.asarray(want)).sum(-1) > candidates).sum())
    assert bisected > 0  # some rows' nuclei were wider than the candidates


def test_the_edge_differs_only_within_rounding():
    """Tokens whose mass above is top_p up to float32 rounding (top_p at a tie group's edge, or so near 1
    that a whole tail is within rounding of it): the two ways may disagree on those tokens only."""
    p = np.array([0.5, 0.25, 0.125, 0.0625] + [0.0625 / 96] * 96)
    z = np.concatenate([np.log(p)[None], _rows(3)[:, :100]]).astype(np.float32)
    for top_p in (0.5, 0.75, 0.875, 0.9375, 0.9999999, np.nextafter(np.float32(0.75), 1),
                  np.nextafter(np.float32(0.75), 0)):
        for candidates in (2, 256):
            got = _find(z, np.float32(top_p), candidates=candidates)
            _assert_kept_as_the_sort(z, got, _sort(z, np.float32(top_p)), top_p)


def test_a_rows_threshold_does_not_depend_on_the_batch():
    """Bisected rows beside rows the candidates settle: each row's threshold is what it gets alone."""
    z = jnp.asarray(_rows(1))
    batch = np.asarray(_find(z, 0.95, candidates=16))
    perm = np.random.default_rng(0).permutation(len(z))
    np.testing.assert_array_equal(np.asarray(_find(z[perm], 0.95, candidates=16)), batch[perm])
    for b in (0, 8):  # a row the candidates settle and a bisected one, alone
        np.testing.assert_array_equal(np.asarray(_find(z[b:b + 1], 0.95, candidates=16)), batch[b:b + 1])


def test_top_k_then_top_p_equals_the_sort_after_top_k():
    z = jnp.asarray(_rows(2))
    for top_k, top_p in ((1, 0.3), (5, 0.95), (300, 0.95)):
        kth = jax.lax.top_k(z, top_k)[0][:, -1:]
        masked = np.asarray(jnp.where(z < kth, -jnp.inf, z))
        got = np.asarray(jax.jit(truncate, static_argnames=("top_k", "top_p"))(z, top_k=top_k, top_p=top_p))
        smallest_B1 = np.where(np.isfinite(got), got, np.inf).min(-1, keepdims=True)  # keeps what got keeps
        _assert_kept_as_the_sort(masked, smallest_B1, _sort(masked, top_p), top_p)


def test_float_keys_keep_the_order():
    x = np.array([-np.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3e38, np.inf], np.float32)
    keys = np.asarray(_to_key(jnp.asarray(x)))
    assert (np.diff(keys.astype(np.int64)) > 0).all()
    np.testing.assert_array_equal(np.asarray(_from_key(keys)).view(np.uint32), x.view(np.uint32))


def test_sampled_frequencies_with_a_bisected_nucleus():
    """``choose`` at top-p 0.9 on a near-flat row whose nucleus (about 340 tokens) is wider than the
    candidates: each kept token is drawn with its renormalised probability, the rest never."""
    vocab, n = 400, 12000
    logits = np.random.default_rng(3).normal(0, 0.3, vocab).astype(np.float32)
    cfg = SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=0.9)
    keys = jax.random.split(jax.random.key(4), n)
    tokens, _ = jax.jit(lambda k: choose(jnp.broadcast_to(jnp.asarray(logits), (n, vocab)), k, cfg))(keys)
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    kept = _mass_above(logits, logits) < 0.9
    assert 256 < kept.sum() < vocab
    probs = np.where(kept, probs, 0.0) / probs[kept].sum()
    stat, dof = _chi_square(np.bincount(np.asarray(tokens), minlength=vocab), probs)
    assert stat < chi2_quantile_999(dof), (stat, dof)
