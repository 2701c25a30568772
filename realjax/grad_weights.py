"""The gradient-weight mechanism measured in runs: how hard the loss pushes each rollout's score.

For a rollout b with score ``s_b`` (the token mean of ``logp - old_logp``), its *gradient weight* is
``|d S / d s_b|``, where S is the objective's loss sum (``LossTerms.loss_sum.total``; the loss is S over a
normaliser that does not depend on the weights, the same for every row of an update). It is taken, as
``realjax.testing.score_grads`` does, with respect to a uniform shift of the rollout's token log-probs, so
for the REAL family it is exactly ``|dS/ds|`` (the paper's ``|W_REAL|``, bounded by ``1/tau``) and for the
token-level objectives the sequence-level weight (GRPO: ``|A| * mean_t rho_t`` over unclipped tokens, the
paper's ``|W_GRPO|``; DAPO and Dr.GRPO: the token sum, so it grows with the length).

It costs one backward pass of the loss terms over the already computed log-probs (elementwise [B, A]
work), never of the model: the learner's update reads it from the step's own batch.

Reported per update over the rollouts that carry a learning signal (kept rows of groups with at least one
positive ``r == 1`` and one negative ``r == 0``): positives and negatives apart, the mean and the max, and
the mean within terciles of the rollout's mean token log-prob (t1 the least confident third). Terciles
are cut over each update's whole mini-batch (exact whatever the micro-batch cut); a step with several
mini-batches adds the updates' sums and counts (:class:`realjax.losses.Mean`) and takes the max of maxes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from realjax.losses import Mean

PREFIX = "grad_weight/"
STATS = ("mean", "t1", "t2", "t3", "max")
METRIC_NAMES = tuple(f"{PREFIX}{label}_{stat}" for label in ("pos", "neg") for stat in STATS)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Max:
    """A maximum that combines like :class:`Mean` does (``+`` keeps the larger), so the learner can reduce
    a step's metrics with one ``+``."""

    total: jax.Array

    def __add__(self, other: "Max") -> "Max":
        return Max(jnp.maximum(self.total, other.total))

    @property
    def value(self) -> jax.Array:
        return self.total


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowGrads:
    """Per rollout: ``weight_B`` = |dS/ds|, ``conf_B`` the mean token log-prob, ``pos_B`` / ``neg_B`` 1.0
    for positives / negatives of groups with both (0.0 for every other row)."""

    weight_B: jax.Array
    conf_B: jax.Array
    pos_B: jax.Array
    neg_B: jax.Array


def row_grads(terms_fn, logp_BA, old_logp_BA, mask_BA, rewards_B, *, group_size: int, row_mask_B=None,
              **kwargs) -> RowGrads:
    """The gradient weight of each row of one (micro-)batch of whole groups; ``kwargs`` go to ``terms_fn``
    (hyper-parameters, ``ref_logp``, ``is_weight``). No gradient flows back into ``logp_BA``."""
    logp_BA = jax.lax.stop_gradient(jnp.asarray(logp_BA, jnp.float32))
    mask_BA = jnp.asarray(mask_BA, jnp.float32)
    rewards_B = jnp.asarray(rewards_B, jnp.float32)

    def loss_sum(shift_B):  # a shift of every token by d moves the length-normalised score by exactly d
        return terms_fn(logp_BA + shift_B[:, None] * mask_BA, old_logp_BA, mask_BA, rewards_B,
                        group_size=group_size, row_mask=row_mask_B, **kwargs).loss_sum.total

    weight_B = jnp.abs(jax.grad(loss_sum)(jnp.zeros_like(rewards_B)))
    keep_B = jnp.ones_like(rewards_B) if row_mask_B is None else jnp.asarray(row_mask_B, jnp.float32)
    pos_PR = ((rewards_B == 1.0) & (keep_B > 0)).reshape(-1, group_size)
    neg_PR = ((rewards_B == 0.0) & (keep_B > 0)).reshape(-1, group_size)
    mixed_P1 = (jnp.any(pos_PR, -1) & jnp.any(neg_PR, -1))[:, None]
    conf_B = jnp.sum(mask_BA * logp_BA, -1) / jnp.maximum(jnp.sum(mask_BA, -1), 1.0)
    f32 = lambda x: x.reshape(-1).astype(jnp.float32)
    return RowGrads(weight_B, conf_B, f32(pos_PR & mixed_P1), f32(neg_PR & mixed_P1))


def grad_weight_metrics(rows: RowGrads) -> dict[str, Mean | Max]:
    """``grad_weight/{pos,neg}_{mean,max,t1,t2,t3}`` over the rows given (any leading shape: an update's
    micro-batches are flattened together, so terciles are cut over the whole mini-batch)."""
    w, conf, pos, neg = (x.reshape(-1) for x in (rows.weight_B, rows.conf_B, rows.pos_B, rows.neg_B))
    signal = (pos + neg) > 0
    n = jnp.sum(signal.astype(jnp.float32))
    # Rank of each signal row by confidence among the signal rows (the others sort last); a stable sort
    # breaks ties by row order, so the cut is deterministic.
    order = jnp.argsort(jnp.where(signal, conf, jnp.inf), stable=True)
    rank = jnp.zeros(order.shape, jnp.float32).at[order].set(jnp.arange(order.shape[0], dtype=jnp.float32))
    tercile = jnp.floor(3.0 * rank / jnp.maximum(n, 1.0))
    out: dict[str, Mean | Max] = {}
    for name, label in (("pos", pos), ("neg", neg)):
        out[f"{PREFIX}{name}_mean"] = Mean(jnp.sum(label * w), jnp.sum(label))
        out[f"{PREFIX}{name}_max"] = Max(jnp.max(jnp.where(label > 0, w, 0.0)))
        for t in range(3):
            sel = label * (tercile == t)
            out[f"{PREFIX}{name}_t{t + 1}"] = Mean(jnp.sum(sel * w), jnp.sum(sel))
    return out
