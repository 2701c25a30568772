"""REAL and its variants (BCE, product, ordinal): rewards as labels, anchored logsumexps per group
(formulas: the package docstring and ``shared/PAPER.md``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from realjax.losses.parts import (batch_inputs, group_count, grouped, labels, log1p_sum_exp, make_terms,
                                  masked_logsumexp, rollout_weights, sequence_scores)



# ----------------------------------------------------------------------------------------------------
# REAL family
# ----------------------------------------------------------------------------------------------------
def real_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, tau=0.5):
    """REAL (paper Eq. 8) with anchor logits; ``sum over valid groups / number of groups``."""
    logp, old_logp, mask, rewards, keep_B = batch_inputs(logp, old_logp, mask, rewards, row_mask)
    s_B = sequence_scores(logp, old_logp, mask)
    pos_PR, neg_PR, valid_P = labels(rewards, keep_B, group_size)
    z_PR = grouped(s_B, group_size) / tau
    # An importance weight multiplies the rollout's exp term: e^{-s/tau} -> w e^{-s/tau} (a logit shift of log w).
    _, lw_PR, live_PR = rollout_weights(is_weight, group_size, rewards)
    loss_P = log1p_sum_exp(lw_PR - z_PR, pos_PR & live_PR) + log1p_sum_exp(lw_PR + z_PR, neg_PR & live_PR)
    return make_terms(jnp.sum(jnp.where(valid_P, loss_P, 0.0)), group_count(keep_B, group_size),
                  logp, old_logp, mask, keep_B, s_B, valid_P)


def real_bce_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, tau=0.5):
    """REAL-BCE: each rollout classified against the 0 anchor alone, ``BCE(s / tau, r == 1)``.

    Averaged over the labelled rollouts of valid groups (the released code's ``reduction='mean'``), 0
    when there is none.
    """
    logp, old_logp, mask, rewards, keep_B = batch_inputs(logp, old_logp, mask, rewards, row_mask)
    s_B = sequence_scores(logp, old_logp, mask)
    pos_PR, neg_PR, valid_P = labels(rewards, keep_B, group_size)
    z_PR = grouped(s_B, group_size) / tau
    # BCE with logits: softplus(z) - y z; rows that are neither label (graded rewards) are left out.
    bce_PR = jax.nn.softplus(z_PR) - pos_PR * z_PR
    bce_PR = bce_PR * rollout_weights(is_weight, group_size, rewards)[0]  # each rollout's term, weighted
    w_PR = valid_P[:, None] & (pos_PR | neg_PR)
    return make_terms(jnp.sum(jnp.where(w_PR, bce_PR, 0.0)), jnp.sum(w_PR), logp, old_logp, mask, keep_B, s_B, valid_P)


def real_product_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, tau=0.5):
    """Product (circle-loss) form without anchors: ``log(1 + sum_pos sum_neg e^{(s_neg - s_pos)/tau})``."""
    logp, old_logp, mask, rewards, keep_B = batch_inputs(logp, old_logp, mask, rewards, row_mask)
    s_B = sequence_scores(logp, old_logp, mask)
    pos_PR, neg_PR, valid_P = labels(rewards, keep_B, group_size)
    z_PR = grouped(s_B, group_size) / tau
    _, lw_PR, live_PR = rollout_weights(is_weight, group_size, rewards)  # a pair's term: w_pos w_neg e^{..}
    pair_P = masked_logsumexp(lw_PR + z_PR, neg_PR & live_PR) + masked_logsumexp(lw_PR - z_PR, pos_PR & live_PR)
    loss_P = jax.nn.softplus(jnp.where(valid_P, pair_P, 0.0))
    return make_terms(jnp.sum(jnp.where(valid_P, loss_P, 0.0)), group_count(keep_B, group_size),
                  logp, old_logp, mask, keep_B, s_B, valid_P)


def real_ordinal_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, tau=0.5):
    """Our extension for graded rewards: REAL summed over the thresholds between a group's levels.

    For each distinct reward level ``l`` of a group except its highest, rollouts with ``r > l`` are the
    positives and those with ``r <= l`` the negatives of one binary REAL loss; the group's loss is the sum
    over its thresholds. With rewards in {0, 1} there is one threshold and this equals ``real``.
    Static shapes: each rollout proposes its own reward as a threshold, and only the first kept rollout
    of each level in the group counts it.
    """
    logp, old_logp, mask, rewards, keep_B = batch_inputs(logp, old_logp, mask, rewards, row_mask)
    s_B = sequence_scores(logp, old_logp, mask)
    r_PR, keep_PR = grouped(rewards, group_size), grouped(keep_B, group_size) > 0
    z_PR = grouped(s_B, group_size) / tau
    R = group_size
    # pos_POR[p, l, i]: kept rollout i is above threshold r[p, l]; neg: kept and at or below it.
    above_POR = r_PR[:, None, :] > r_PR[:, :, None]
    pos_POR, neg_POR = above_POR & keep_PR[:, None, :], ~above_POR & keep_PR[:, None, :]
    earlier_OR = jnp.tril(jnp.ones((R, R), bool), k=-1)  # [l, j] = j < l
    same_POR = (r_PR[:, :, None] == r_PR[:, None, :]) & keep_PR[:, None, :]
    first_PO = keep_PR & ~jnp.any(same_POR & earlier_OR[None], axis=-1)
    used_PO = first_PO & jnp.any(pos_POR, axis=-1)  # the top level proposes no threshold
    P = r_PR.shape[0]
    z_YR = jnp.broadcast_to(z_PR[:, None, :], (P, R, R)).reshape(P * R, R)
    _, lw_PR, live_PR = rollout_weights(is_weight, group_size, rewards)
    lw_YR = jnp.broadcast_to(lw_PR[:, None, :], (P, R, R)).reshape(P * R, R)
    live_POR = live_PR[:, None, :]
    loss_PO = (log1p_sum_exp(lw_YR - z_YR, (pos_POR & live_POR).reshape(P * R, R))
               + log1p_sum_exp(lw_YR + z_YR, (neg_POR & live_POR).reshape(P * R, R))).reshape(P, R)
    return make_terms(jnp.sum(jnp.where(used_PO, loss_PO, 0.0)), group_count(keep_B, group_size), logp, old_logp, mask,
                  keep_B, s_B, jnp.any(used_PO, axis=-1), thresholds=jnp.sum(used_PO.astype(jnp.float32)))


