"""Helpers for unit-testing RLVR objectives with chex: the ones realjax's own tests use.

Any function with the ``realjax.losses.LOSSES`` signature works here, including your own::

    import chex, jax.numpy as jnp
    from realjax import testing

    def my_loss(logp, old_logp, mask, rewards, *, group_size, tau=0.5):
        ...                                             # returns (loss, metrics)

    batch = testing.random_grouped_batch(0, num_groups=6, group_size=8)
    g = testing.score_grads(my_loss, batch, group_size=8)          # dL/ds per rollout, [B]
    testing.assert_signed_by_label(g, batch["rewards"], group_size=8)
    testing.assert_bounded(g, 1 / 0.5)
    testing.assert_zero_on_degenerate(g, batch["rewards"], group_size=8)
    testing.assert_monotone_in_score(my_loss, batch, group_size=8, row=0)

``score_grads`` differentiates with respect to a uniform shift of one rollout's token log-probs, which is
exactly ``dL/ds`` for objectives that depend on the rollout only through ``s`` (REAL and its variants)
and the sequence-level gradient weight for token-level objectives such as GRPO.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

Batch = dict[str, jax.Array]


def random_grouped_batch(seed: int, *, num_groups: int = 6, group_size: int = 8, length: int = 12,
                         reward_levels: int = 2, degenerate: bool = True, score_scale: float = 0.3) -> Batch:
    """Random ``logp``, ``old_logp``, ``mask`` [B, T] and ``rewards`` [B] with B = num_groups * group_size.

    Masks are ragged (every row has 1..T response tokens, left-aligned). Rewards take ``reward_levels``
    values evenly spaced in [0, 1]. With ``degenerate`` the first group is all-correct and the second
    all-wrong (when there are at least three groups), so edge cases are always exercised.
    """
    rng = np.random.default_rng(seed)
    B = num_groups * group_size
    old = -rng.gamma(2.0, 0.7, size=(B, length))
    logp = old + score_scale * rng.standard_normal((B, length))
    lengths = rng.integers(1, length + 1, size=B)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float32)
    levels = np.linspace(0.0, 1.0, reward_levels)
    rewards = levels[rng.integers(0, reward_levels, size=B)]
    r = rewards.reshape(num_groups, group_size)
    for g in range(num_groups):  # keep the non-degenerate groups mixed so they carry a signal
        if degenerate and num_groups >= 3 and g < 2:
            r[g] = 1.0 if g == 0 else 0.0
        elif r[g].min() == r[g].max():
            r[g, 0], r[g, -1] = 0.0, 1.0
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return {"logp": f32(logp), "old_logp": f32(old), "mask": f32(mask), "rewards": f32(r.reshape(-1))}


def score_grads(loss_fn: Callable, batch: Batch, *, group_size: int, **hparams) -> jax.Array:
    """dL/ds per rollout [B]: the gradient with respect to a uniform shift of that row's log-probs."""
    def shifted(delta_B):
        logp = batch["logp"] + delta_B[:, None] * batch["mask"]
        return loss_fn(logp, batch["old_logp"], batch["mask"], batch["rewards"],
                       group_size=group_size, **hparams)[0]

    # A shift of every token by d moves the length-normalised s by exactly d.
    return jax.grad(shifted)(jnp.zeros(batch["rewards"].shape, jnp.float32))


def token_grads(loss_fn: Callable, batch: Batch, *, group_size: int, **hparams) -> jax.Array:
    """dL/dlogp per token [B, T] (zero on padding)."""
    def loss(logp):
        return loss_fn(logp, batch["old_logp"], batch["mask"], batch["rewards"],
                       group_size=group_size, **hparams)[0]

    return jax.grad(loss)(batch["logp"])


def with_scores(batch: Batch, scores_B) -> Batch:
    """A copy of ``batch`` whose rollouts have exactly the given sequence scores s (uniform per token)."""
    logp = batch["old_logp"] + jnp.asarray(scores_B, jnp.float32)[:, None] * batch["mask"]
    return {**batch, "logp": logp}


def _groups(x, group_size):
    return np.asarray(x).reshape(-1, group_size)


def degenerate_rows(rewards, group_size) -> np.ndarray:
    """Boolean [B]: rows of groups that are all-correct or all-wrong."""
    r = _groups(rewards, group_size)
    return np.repeat(r.min(-1) == r.max(-1), group_size)


def assert_bounded(grads, bound: float, *, atol: float = 1e-6) -> None:
    """Every |dL/ds| is at most ``bound`` (REAL: 1/tau)."""
    g = np.asarray(grads)
    chex.assert_tree_all_finite(g)
    worst = np.abs(g).max()
    if worst > bound + atol:
        raise AssertionError(f"|dL/ds| reaches {worst:.6g}, above the bound {bound:.6g}")


def assert_signed_by_label(grads, rewards, *, group_size: int) -> None:
    """Gradient descent raises positives and lowers negatives: dL/ds < 0 for r == 1 and > 0 for r == 0,
    in every group that has both labels."""
    g, r = np.asarray(grads), np.asarray(rewards)
    live = ~degenerate_rows(r, group_size)
    bad_pos = live & (r == 1.0) & ~(g < 0)
    bad_neg = live & (r == 0.0) & ~(g > 0)
    if bad_pos.any() or bad_neg.any():
        raise AssertionError(f"wrong sign: positives at rows {np.flatnonzero(bad_pos).tolist()}, "
                             f"negatives at rows {np.flatnonzero(bad_neg).tolist()}")


def assert_zero_on_degenerate(grads, rewards, *, group_size: int) -> None:
    """All-correct and all-wrong groups get exactly zero gradient (and no NaN)."""
    g = np.asarray(grads)
    chex.assert_tree_all_finite(g)
    dead = degenerate_rows(rewards, group_size)
    if np.any(g[dead] != 0.0):
        raise AssertionError(f"non-zero gradient on degenerate rows {np.flatnonzero(dead & (g != 0)).tolist()}")


def assert_monotone_in_score(loss_fn: Callable, batch: Batch, *, group_size: int, row: int,
                             scores=None, **hparams) -> None:
    """Sweeping rollout ``row``'s score s (the others fixed), |dL/ds| falls for a positive and rises for
    a negative: the hard positives get the most push, and the confident negatives the most pull."""
    scores = np.linspace(-2.0, 2.0, 41) if scores is None else np.asarray(scores)
    base = np.asarray(batch["logp"] - batch["old_logp"])
    s0 = (base * np.asarray(batch["mask"])).sum(-1) / np.maximum(np.asarray(batch["mask"]).sum(-1), 1)
    label = float(batch["rewards"][row])
    mags = []
    for s in scores:
        s_B = s0.copy()
        s_B[row] = s
        mags.append(abs(float(score_grads(loss_fn, with_scores(batch, s_B), group_size=group_size,
                                          **hparams)[row])))
    d = np.diff(mags)
    ok = np.all(d <= 1e-7) if label == 1.0 else np.all(d >= -1e-7)
    if not ok:
        kind = "positive" if label == 1.0 else "negative"
        raise AssertionError(f"|dL/ds| of {kind} row {row} is not monotone in s: {np.round(mags, 5).tolist()}")
