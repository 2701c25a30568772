"""Top-p (nucleus) truncation without sorting the vocabulary.

The nucleus keeps a token when the mass of the tokens ranked above it is still below ``top_p``. Tokens
of equal logit share their fate (ties at the threshold are kept together), so a logit value v is kept
exactly when ``M(v) = P(z > v) < top_p``; M falls as v rises, so the kept set is ``z >= t`` where t is
the smallest logit of the row with ``M(t) < top_p``. ``nucleus_threshold`` finds t in two ways:

* **Candidates** (every row, every step): ``lax.top_k`` gives the row's ``v`` largest logits in order
  (``CANDIDATES``); their cumulative mass over the whole row's softmax finds t the way a full sort
  would, as soon as some candidate's mass above reaches ``top_p`` (the usual case: at T = 0.6 a few
  tokens carry 95% of the mass). One ``top_k`` and one pass over V, where the full sort cost
  ``V log V`` per row.
* **Bisection** (rows whose nucleus is wider than the candidates): t is found over the float32 bit
  patterns (monotone as uint32), 32 halvings of ``M(t) < top_p``, each one pass over V. It runs under a
  ``lax.cond`` only when some row of the batch needs it, and each row takes its own result by a select:
  which way a row's threshold is found depends on that row alone, never on the batch it runs in (the
  engine's compacted batches must draw what the static sampler draws).

Rounding: the float32 masses here are summed in other orders than the sort's (the softmax normaliser
over the unsorted row; the bisection's masked sums), so they agree with the sorted cumsum to float32
rounding, not bit for bit. A token whose mass above is within rounding (~1e-6) of ``top_p`` can be kept
by one and not the other; there the nucleus is not defined beyond rounding (the sort-based reference
itself moves with XLA's cumsum algorithm). Away from that edge the kept set is the sort's
(``tests/test_nucleus.py`` checks equality against ``nucleus_threshold_sorted`` and bounds the edge).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Candidates per row: one top_k over V; a row whose nucleus holds more tokens than this is bisected.
# 256: the TPU compiler keeps lax.top_k of 256 over V = 152k a TopK (1024 became a full sort there), and
# on CPU it costs 34 ms at 64 rows where the sort cost 2 s.
CANDIDATES = 256
_NEG = -jnp.inf


def nucleus_threshold(z_BV, top_p: float, *, candidates: int | None = None, top_Bv=None):
    """The per-row threshold t [B, 1]: keeping ``z_BV >= t`` keeps the nucleus of mass ``top_p``.

    Args:
      z_BV: logits (-inf entries stay -inf whatever the threshold).
      top_p: nucleus mass in (0, 1).
      candidates: how many of the largest logits to try before bisecting (None: ``CANDIDATES``).
      top_Bv: the row's largest logits in descending order when the caller has them, and every other
        entry of the row is -inf or equal to the last of them (``truncate`` after top-k): the nucleus is
        then found among them alone, with no bisection.
    """
    V = z_BV.shape[-1]
    candidates = CANDIDATES if candidates is None else candidates
    exhaustive = top_Bv is not None or candidates >= V
    if top_Bv is None:
        top_Bv = jax.lax.top_k(z_BV, min(candidates, V))[0]
    # Reductions, never slices, of top_Bv: XLA's CPU backend runs lax.top_k as its fast TopK call only
    # when the values are used whole; a slice of them (top_Bv[:, :1]) turns it back into a full sort.
    max_B1 = jnp.max(z_BV, axis=-1, keepdims=True)
    total_B1 = jnp.sum(jnp.exp(z_BV - max_B1), axis=-1, keepdims=True)
    # The reference's formulas term for term (``nucleus_threshold_sorted``), on the candidates only.
    p_Bv = jnp.exp(top_Bv - max_B1) / total_B1
    kept_Bv = jnp.cumsum(p_Bv, axis=-1) - p_Bv < top_p
    found_B1 = jnp.min(jnp.where(kept_Bv, top_Bv, jnp.inf), axis=-1, keepdims=True)
    if exhaustive:
        return found_B1
    # Every candidate is kept: the nucleus may go on past them (unless all that follows is -inf).
    wide_B1 = jnp.all(kept_Bv, axis=-1, keepdims=True) & (jnp.min(top_Bv, axis=-1, keepdims=True) > _NEG)
    return jax.lax.cond(jnp.any(wide_B1),
                        lambda: jnp.where(wide_B1, _bisect(z_BV, max_B1, total_B1, top_p), found_B1),
                        lambda: found_B1)


def _bisect(z_BV, max_B1, total_B1, top_p: float):
    """The smallest float t with ``P(z > t) < top_p``: a logit of the row, found by halving the range of
    uint32 keys between -inf (where the mass above is the whole row) and the row's max (where it is 0)."""
    p_BV = jnp.exp(z_BV - max_B1) / total_B1  # written once, read by each of the 32 passes

    def halve(_, bounds):
        lo_B1, hi_B1 = bounds  # invariant: M(lo) >= top_p > M(hi)
        mid_B1 = lo_B1 + (hi_B1 - lo_B1) // 2
        above_B1 = jnp.sum(jnp.where(z_BV > _from_key(mid_B1), p_BV, 0.0), axis=-1, keepdims=True)
        inside_B1 = above_B1 < top_p
        return jnp.where(inside_B1, lo_B1, mid_B1), jnp.where(inside_B1, mid_B1, hi_B1)

    lo_B1 = jnp.broadcast_to(_to_key(jnp.float32(_NEG)), max_B1.shape)
    # 32 halvings shrink any gap below 2^32 to one key: hi is then the smallest key inside the nucleus.
    _, hi_B1 = jax.lax.fori_loop(0, 32, halve, (lo_B1, _to_key(max_B1)))
    return _from_key(hi_B1)


def _to_key(x):
    """float32 -> uint32 in the same order (-inf lowest; -0.0 just below +0.0; NaNs outside the range)."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_key(key):
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def nucleus_threshold_sorted(z_BV, top_p: float):
    """The reference (the sampler's top-p until it stopped sorting): sort each row, cumsum its softmax,
    keep while the mass above is below ``top_p``; the smallest kept logit is the threshold [B, 1]."""
    sorted_BV = jnp.sort(z_BV, axis=-1)[:, ::-1]
    p_BV = jax.nn.softmax(sorted_BV, axis=-1)
    kept_BV = jnp.cumsum(p_BV, axis=-1) - p_BV < top_p
    return jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
