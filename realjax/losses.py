"""RLVR objectives as small pure functions: REAL and its variants, and the baselines.

Every objective has the same signature and returns ``(loss, metrics)``::

    loss, metrics = fn(logp, old_logp, mask, rewards, *, group_size, row_mask=None, **hparams)

Shapes (axis legend of the project, see ``realjax/__init__.py``): ``logp_BA``, ``old_logp_BA`` and
``mask_BA`` are float ``[B, A]`` per-token log-probs of the response tokens under the current policy and
the rollout (old) policy, and the response mask; ``rewards_B`` is ``[B]``. ``B = P * R``: P prompt groups
of R = ``group_size`` rollouts, rows of one group contiguous (``b // R`` is the group id). No sorting
and no boolean indexing: every selection is a mask, so shapes are static and every function jits once.
``row_mask`` ([B], 1 = the row takes part) drops whole rows, e.g. truncated responses under DAPO's
overlong filter: a dropped row is neither a label nor a token nor a row of any count, exactly as if it
had been removed from the batch. ``is_weight`` (a constant of the batch, ``realjax.is_correction``) corrects for
rollouts sampled by a behaviour policy other than the old one: for the REAL family a [B] weight multiplies
each rollout's exp term inside the group logsumexp (BCE: the rollout's term; product: each pair's term by
both rollouts' weights), a weight of 0 removes the rollout from its sums; for the token-level objectives a
[B, A] (or [B]) weight multiplies each token's clipped surrogate (not GRPO's reference-KL term). Normalisers
are unchanged.

Exact sums. Each objective is a *sum of terms divided by a normaliser that does not depend on the
parameters*: groups (REAL, product, ordinal), labelled rows of valid groups (BCE), rows (GRPO, GSPO),
tokens (DAPO) or rows x ``norm_length`` (Dr.GRPO). ``TERMS[name]`` returns both as :class:`LossTerms`;
``LOSSES[name]`` divides. A learner that cuts a mini-batch into micro-batches of whole groups adds the
sums and the normalisers and divides once, which gives the mini-batch's gradient exactly whatever the cut
(``realjax.rl.update``). Metrics are kept the same way, as :class:`Mean` (total, weight) pairs.

Semantics follow the paper and its released code (see ``shared/PAPER.md`` sections 2-3):

* ``s = sum_t mask * (logp - old_logp) / sum_t mask`` per rollout (length-normalised relative log-prob).
* Positives are rollouts with ``r == 1``, negatives ``r == 0``. A group is *valid* when it has at least
  one of each. Degenerate (all-right / all-wrong) groups add 0 but still count in the denominator:
  the REAL losses are ``sum over valid groups / number of groups``.
* REAL (Eq. 8): ``log(1 + sum_pos e^{-s/tau}) + log(1 + sum_neg e^{s/tau})``. The two ``1``\\ s are the
  anchor logits (a logit fixed at 0) and are written as an explicit 0 entry of each logsumexp, which also
  makes the empty set safe (no ``-inf`` in the forward pass, no NaN in the backward pass).

Departures from the released code, all deliberate:

* ``real_product`` works (the released function has a NameError whenever a valid group exists).
* ``real_ordinal`` is our extension for graded rewards; it reduces to ``real`` on binary rewards.
* Everything is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from realjax.sums import LossTerms, Mean, Metrics  # noqa: F401 (part of the losses API)
LossFn = Callable[..., tuple[jax.Array, Metrics]]

_ADV_EPS = 1e-6  # verl's epsilon in (r - mean) / (std + eps)
# Keyword arguments of an objective that are inputs, not hyper-parameters a config may set.
INPUT_KWARGS = ("group_size", "row_mask", "ref_logp", "is_weight")


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------
def _inputs(logp, old_logp, mask, rewards, row_mask):
    """float32 inputs; the token mask of dropped rows zeroed; ``keep_B`` (1.0 = the row takes part)."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    logp, old_logp, mask, rewards = f32(logp), f32(old_logp), f32(mask), f32(rewards)
    keep_B = jnp.ones_like(rewards) if row_mask is None else f32(row_mask)
    return logp, old_logp, mask * keep_B[:, None], rewards, keep_B


def _rollout_weights(is_weight, group_size, rewards_B):
    """REAL family: the rollouts' importance weights [P, R] (1 without correction) as the log-shift of each
    rollout's exp term and the selection of rollouts with a non-zero weight (``realjax.is_correction``)."""
    if is_weight is None:
        w_B = jnp.ones_like(rewards_B)
    else:
        w_B = jax.lax.stop_gradient(jnp.asarray(is_weight, jnp.float32))
        if w_B.shape != rewards_B.shape:
            raise ValueError(f"the REAL family weights whole rollouts: is_weight must be [B] = {rewards_B.shape}, "
                             f"got {w_B.shape} (use a sequence-level correction)")
    w_PR = _grouped(w_B, group_size)
    return w_PR, jnp.log(jnp.where(w_PR > 0, w_PR, 1.0)), w_PR > 0


def _token_weights(is_weight):
    """Token-level objectives: the weight that multiplies each token's surrogate, [B, A] or [B, 1]."""
    if is_weight is None:
        return 1.0
    w = jax.lax.stop_gradient(jnp.asarray(is_weight, jnp.float32))
    return w[:, None] if w.ndim == 1 else w


def sequence_scores(logp_BA, old_logp_BA, mask_BA):
    """s_B: the mean over response tokens of ``logp - old_logp`` (0 for an empty response)."""
    length_B = jnp.sum(mask_BA, axis=-1)
    return jnp.sum(mask_BA * (logp_BA - old_logp_BA), axis=-1) / jnp.maximum(length_B, 1.0)


def _grouped(x_B, group_size):
    if x_B.shape[0] % group_size:
        raise ValueError(f"batch of {x_B.shape[0]} rows is not a whole number of groups of {group_size}")
    return x_B.reshape(-1, group_size)


def _labels(rewards_B, keep_B, group_size):
    """Positive / negative masks [P, R] (kept rows only) and the valid-group mask [P]."""
    r_PR, keep_PR = _grouped(rewards_B, group_size), _grouped(keep_B, group_size) > 0
    pos_PR, neg_PR = (r_PR == 1.0) & keep_PR, (r_PR == 0.0) & keep_PR
    valid_P = jnp.any(pos_PR, axis=-1) & jnp.any(neg_PR, axis=-1)
    return pos_PR, neg_PR, valid_P


def _groups(keep_B, group_size):
    """How many groups take part: those with at least one kept row (all of them without a row mask)."""
    return jnp.sum(jnp.any(_grouped(keep_B, group_size) > 0, axis=-1).astype(jnp.float32))


def log1p_sum_exp(x_PR, m_PR):
    """``log(1 + sum_{m} e^x)`` per row: a logsumexp that includes the anchor logit 0.

    The anchor keeps the max finite, so an empty selection gives exactly 0 with a zero gradient.
    """
    x_PR = jnp.where(m_PR, x_PR, -jnp.inf)
    return jax.nn.logsumexp(jnp.concatenate([jnp.zeros_like(x_PR[:, :1]), x_PR], axis=-1), axis=-1)


def masked_logsumexp(x_PR, m_PR):
    """``log sum_{m} e^x`` per row; ``-inf`` for an empty selection, with a zero (never NaN) gradient."""
    any_P = jnp.any(m_PR, axis=-1)
    # The double `where` keeps empty rows finite inside the logsumexp so its backward pass has no NaN.
    safe_PR = jnp.where(any_P[:, None], jnp.where(m_PR, x_PR, -jnp.inf), 0.0)
    return jnp.where(any_P, jax.nn.logsumexp(safe_PR, axis=-1), -jnp.inf)


def kl_to_old(logp_BA, old_logp_BA, mask_BA) -> tuple[Mean, Mean]:
    """Token-mean KL(old || new) estimates from samples of the old policy: k1 and k3 (Schulman 2020)."""
    log_ratio_BA = logp_BA - old_logp_BA  # log(new / old)
    n = jnp.sum(mask_BA)
    return (Mean(jnp.sum(mask_BA * -log_ratio_BA), n),
            Mean(jnp.sum(mask_BA * (jnp.expm1(log_ratio_BA) - log_ratio_BA)), n))


def kl_penalty(logp_BA, ref_logp_BA, estimator):
    """Per-token KL(new || ref) estimate with samples from the current policy.

    ``k1``: ``logp - ref``; ``k3`` / ``low_var_kl``: ``e^{ref-logp} - (ref - logp) - 1``, clamped to
    [-10, 10] as verl does (it is always >= 0 and unbiased, with far lower variance than k1).
    """
    if estimator == "k1":
        return logp_BA - ref_logp_BA
    if estimator in ("k3", "low_var_kl"):
        d_BA = jnp.clip(ref_logp_BA - logp_BA, -20.0, 20.0)
        return jnp.clip(jnp.expm1(d_BA) - d_BA, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3' (alias 'low_var_kl')")


def _terms(loss_total, loss_weight, logp_BA, old_logp_BA, mask_BA, keep_B, s_B, valid_P, **extra) -> LossTerms:
    """The loss sum and the metrics every objective reports."""
    k1, k3 = kl_to_old(logp_BA, old_logp_BA, mask_BA)
    means = {"score_mean": Mean(jnp.sum(keep_B * s_B), jnp.sum(keep_B)), "kl_old_k1": k1, "kl_old_k3": k3}
    means.update({k: v for k, v in extra.items() if isinstance(v, Mean)})
    counts = {"valid_groups": jnp.sum(valid_P.astype(jnp.float32))}
    counts.update({k: v for k, v in extra.items() if not isinstance(v, Mean)})
    return LossTerms(Mean(loss_total, jnp.asarray(loss_weight, jnp.float32)), means, counts)


# ----------------------------------------------------------------------------------------------------
# REAL family
# ----------------------------------------------------------------------------------------------------
def real_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, tau=0.5):
    """REAL (paper Eq. 8) with anchor logits; ``sum over valid groups / number of groups``."""
    logp, old_logp, mask, rewards, keep_B = _inputs(logp, old_logp, mask, rewards, row_mask)
    s_B = sequence_scores(logp, old_logp, mask)
    pos_PR, neg_PR, valid_P = _labels(rewards, keep_B, group_size)
    z_PR = _grouped(s_B, group_size) / tau
    # An importance weight multiplies the rollout's exp term: e^{-s/tau} -> w e^{-s/tau} (a logit shift of log w).
    _, lw_PR, live_PR = _rollout_weights(is_weight, group_size, rewards)
    loss_P = log1p_sum_exp(lw_PR - z_PR, pos_PR & live_PR) + log1p_sum_exp(lw_PR + z_PR, neg_PR & live_PR)
    return _terms(jnp.sum(jnp.where(valid_P, loss_P, 0.0)), _groups(keep_B, group_size),
                  logp, old_logp, mask, keep_B, s_B, valid_P)


def real_bce_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, tau=0.5):
    """REAL-BCE: each rollout classified against the 0 anchor alone, ``BCE(s / tau, r == 1)``.

    Averaged over the labelled rollouts of valid groups (the released code's ``reduction='mean'``), 0
    when there is none.
    """
    logp, old_logp, mask, rewards, keep_B = _inputs(logp, old_logp, mask, rewards, row_mask)
    s_B = sequence_scores(logp, old_logp, mask)
    pos_PR, neg_PR, valid_P = _labels(rewards, keep_B, group_size)
    z_PR = _grouped(s_B, group_size) / tau
    # BCE with logits: softplus(z) - y z; rows that are neither label (graded rewards) are left out.
    bce_PR = jax.nn.softplus(z_PR) - pos_PR * z_PR
    bce_PR = bce_PR * _rollout_weights(is_weight, group_size, rewards)[0]  # each rollout's term, weighted
    w_PR = valid_P[:, None] & (pos_PR | neg_PR)
    return _terms(jnp.sum(jnp.where(w_PR, bce_PR, 0.0)), jnp.sum(w_PR), logp, old_logp, mask, keep_B, s_B, valid_P)


def real_product_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, tau=0.5):
    """Product (circle-loss) form without anchors: ``log(1 + sum_pos sum_neg e^{(s_neg - s_pos)/tau})``."""
    logp, old_logp, mask, rewards, keep_B = _inputs(logp, old_logp, mask, rewards, row_mask)
    s_B = sequence_scores(logp, old_logp, mask)
    pos_PR, neg_PR, valid_P = _labels(rewards, keep_B, group_size)
    z_PR = _grouped(s_B, group_size) / tau
    _, lw_PR, live_PR = _rollout_weights(is_weight, group_size, rewards)  # a pair's term: w_pos w_neg e^{..}
    pair_P = masked_logsumexp(lw_PR + z_PR, neg_PR & live_PR) + masked_logsumexp(lw_PR - z_PR, pos_PR & live_PR)
    loss_P = jax.nn.softplus(jnp.where(valid_P, pair_P, 0.0))
    return _terms(jnp.sum(jnp.where(valid_P, loss_P, 0.0)), _groups(keep_B, group_size),
                  logp, old_logp, mask, keep_B, s_B, valid_P)


def real_ordinal_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, tau=0.5):
    """Our extension for graded rewards: REAL summed over the thresholds between a group's levels.

    For each distinct reward level ``l`` of a group except its highest, rollouts with ``r > l`` are the
    positives and those with ``r <= l`` the negatives of one binary REAL loss; the group's loss is the sum
    over its thresholds. With rewards in {0, 1} there is one threshold and this equals ``real``.
    Static shapes: each rollout proposes its own reward as a threshold, and only the first kept rollout
    of each level in the group counts it.
    """
    logp, old_logp, mask, rewards, keep_B = _inputs(logp, old_logp, mask, rewards, row_mask)
    s_B = sequence_scores(logp, old_logp, mask)
    r_PR, keep_PR = _grouped(rewards, group_size), _grouped(keep_B, group_size) > 0
    z_PR = _grouped(s_B, group_size) / tau
    R = group_size
    # pos_PLR[p, l, i]: kept rollout i is above threshold r[p, l]; neg: kept and at or below it.
    above_PLR = r_PR[:, None, :] > r_PR[:, :, None]
    pos_PLR, neg_PLR = above_PLR & keep_PR[:, None, :], ~above_PLR & keep_PR[:, None, :]
    earlier_LR = jnp.tril(jnp.ones((R, R), bool), k=-1)  # [l, j] = j < l
    same_PLR = (r_PR[:, :, None] == r_PR[:, None, :]) & keep_PR[:, None, :]
    first_PL = keep_PR & ~jnp.any(same_PLR & earlier_LR[None], axis=-1)
    used_PL = first_PL & jnp.any(pos_PLR, axis=-1)  # the top level proposes no threshold
    P = r_PR.shape[0]
    z_QR = jnp.broadcast_to(z_PR[:, None, :], (P, R, R)).reshape(P * R, R)
    _, lw_PR, live_PR = _rollout_weights(is_weight, group_size, rewards)
    lw_QR = jnp.broadcast_to(lw_PR[:, None, :], (P, R, R)).reshape(P * R, R)
    live_PLR = live_PR[:, None, :]
    loss_PL = (log1p_sum_exp(lw_QR - z_QR, (pos_PLR & live_PLR).reshape(P * R, R))
               + log1p_sum_exp(lw_QR + z_QR, (neg_PLR & live_PLR).reshape(P * R, R))).reshape(P, R)
    return _terms(jnp.sum(jnp.where(used_PL, loss_PL, 0.0)), _groups(keep_B, group_size), logp, old_logp, mask,
                  keep_B, s_B, jnp.any(used_PL, axis=-1), thresholds=jnp.sum(used_PL.astype(jnp.float32)))


# ----------------------------------------------------------------------------------------------------
# Baselines: GRPO, DAPO, GSPO, Dr.GRPO
# ----------------------------------------------------------------------------------------------------
def group_advantages(rewards_B, group_size, *, scale=True, row_mask=None):
    """``(r - mean_g) / (std_g + 1e-6)`` over a group's kept rows, with the unbiased std (torch's
    default); ``r - mean_g`` unscaled. Dropped rows get 0; so does a row left alone in its group."""
    if scale and group_size < 2:
        raise ValueError("group-normalised advantages need group_size >= 2 (the unbiased std of one is NaN)")
    r_PR = _grouped(jnp.asarray(rewards_B, jnp.float32), group_size)
    keep_PR = jnp.ones_like(r_PR) if row_mask is None else _grouped(jnp.asarray(row_mask, jnp.float32), group_size)
    n_P1 = jnp.sum(keep_PR, axis=-1, keepdims=True)
    a_PR = keep_PR * (r_PR - jnp.sum(keep_PR * r_PR, axis=-1, keepdims=True) / jnp.maximum(n_P1, 1.0))
    if scale:
        a_PR = a_PR / (jnp.sqrt(jnp.sum(a_PR**2, axis=-1, keepdims=True) / jnp.maximum(n_P1 - 1.0, 1.0)) + _ADV_EPS)
    return a_PR.reshape(-1)


def _clipped_surrogate(ratio_BA, adv_B, clip_low, clip_high):
    """PPO's per-token loss ``-min(rho A, clip(rho) A)`` and the mask of tokens where the clip is active."""
    adv_BA = adv_B[:, None]
    unclipped_BA = -adv_BA * ratio_BA
    clipped_BA = -adv_BA * jnp.clip(ratio_BA, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped_BA, clipped_BA), clipped_BA > unclipped_BA


def _sequence_means_sum(x_BA, mask_BA):
    """Sum over rows of each row's token mean (a row without tokens adds 0)."""
    return jnp.sum(jnp.sum(mask_BA * x_BA, -1) / jnp.maximum(jnp.sum(mask_BA, -1), 1.0))


def _token_sum(x_BA, mask_BA) -> Mean:
    return Mean(jnp.sum(mask_BA * x_BA), jnp.sum(mask_BA))


def _policy_gradient(logp, old_logp, mask, adv_B, clip_low, clip_high, is_weight=None):
    """Each token's clipped surrogate times its importance weight (1 without correction)."""
    pg_BA, clipped_BA = _clipped_surrogate(jnp.exp(logp - old_logp), adv_B, clip_low, clip_high)
    return pg_BA * _token_weights(is_weight), _token_sum(clipped_BA.astype(jnp.float32), mask)


def _mixed_groups(rewards_B, keep_B, group_size):
    """Groups whose kept rows do not all have the same reward (they carry a learning signal)."""
    r_PR, keep_PR = _grouped(rewards_B, group_size), _grouped(keep_B, group_size) > 0
    return jnp.max(jnp.where(keep_PR, r_PR, -jnp.inf), -1) > jnp.min(jnp.where(keep_PR, r_PR, jnp.inf), -1)


def _baseline_terms(loss_total, loss_weight, logp, old_logp, mask, rewards, keep_B, group_size, **extra):
    s_B = sequence_scores(logp, old_logp, mask)
    return _terms(loss_total, loss_weight, logp, old_logp, mask, keep_B, s_B,
                  _mixed_groups(rewards, keep_B, group_size), **extra)


def grpo_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, clip_eps=0.2,
               ref_logp=None,
               kl_coef=0.0, kl_estimator="k3"):
    """GRPO: PPO-clip surrogate with group-normalised advantages; per-sequence token mean, then row mean.

    With ``ref_logp`` ([B, A], frozen reference policy) and ``kl_coef > 0`` adds ``kl_coef * KL(new||ref)``
    aggregated the same way (the official GRPO script: k3 / "low_var_kl", coefficient 0.001).
    """
    logp, old_logp, mask, rewards, keep_B = _inputs(logp, old_logp, mask, rewards, row_mask)
    adv_B = group_advantages(rewards, group_size, row_mask=keep_B)
    pg_BA, clip_frac = _policy_gradient(logp, old_logp, mask, adv_B, clip_eps, clip_eps, is_weight)
    total, extra = _sequence_means_sum(pg_BA, mask), {"clip_frac": clip_frac}
    if ref_logp is not None:
        kl = _sequence_means_sum(kl_penalty(logp, jnp.asarray(ref_logp, jnp.float32), kl_estimator), mask)
        total = total + kl_coef * kl
        extra["kl_ref"] = Mean(kl, jnp.sum(keep_B))
    return _baseline_terms(total, jnp.sum(keep_B), logp, old_logp, mask, rewards, keep_B, group_size, **extra)


def dapo_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, clip_low=0.2,
               clip_high=0.28):
    """DAPO as the paper ran it: clip-higher (0.2 / 0.28) and a token mean over the whole mini-batch.

    Dynamic sampling and the overlong filter are trainer options (the filter arrives as ``row_mask``).
    """
    logp, old_logp, mask, rewards, keep_B = _inputs(logp, old_logp, mask, rewards, row_mask)
    adv_B = group_advantages(rewards, group_size, row_mask=keep_B)
    pg_BA, clip_frac = _policy_gradient(logp, old_logp, mask, adv_B, clip_low, clip_high, is_weight)
    tokens = _token_sum(pg_BA, mask)
    return _baseline_terms(tokens.total, tokens.weight, logp, old_logp, mask, rewards, keep_B, group_size,
                           clip_frac=clip_frac)


def gspo_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, clip_low=3e-4,
               clip_high=4e-4):
    """GSPO: the sequence-level ratio ``exp(mean_t log rho_t)`` clipped to [1 - 3e-4, 1 + 4e-4].

    Written in the GSPO-token form of the released code: each token's log-ratio is
    ``sg(seq mean log-ratio) + logp_t - sg(logp_t)`` (clamped at 10), so the value is the sequence ratio
    and the gradient reaches each token through its own log-prob. Per-sequence token mean, row mean.
    """
    logp, old_logp, mask, rewards, keep_B = _inputs(logp, old_logp, mask, rewards, row_mask)
    adv_B = group_advantages(rewards, group_size, row_mask=keep_B)
    s_B = sequence_scores(logp, old_logp, mask)
    sg = jax.lax.stop_gradient
    log_ratio_BA = jnp.minimum(sg(s_B)[:, None] + logp - sg(logp), 10.0)
    pg_BA, clipped_BA = _clipped_surrogate(jnp.exp(log_ratio_BA), adv_B, clip_low, clip_high)
    pg_BA = pg_BA * _token_weights(is_weight)
    return _baseline_terms(_sequence_means_sum(pg_BA, mask), jnp.sum(keep_B), logp, old_logp, mask, rewards,
                           keep_B, group_size, clip_frac=_token_sum(clipped_BA.astype(jnp.float32), mask))


def dr_grpo_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, clip_eps=0.2,
                  norm_length=None):
    """Dr.GRPO: advantages ``r - mean_g`` (no std), token sum divided by the constant ``rows * norm_length``.

    ``norm_length`` defaults to A, the padded response length (the generation budget).
    """
    logp, old_logp, mask, rewards, keep_B = _inputs(logp, old_logp, mask, rewards, row_mask)
    adv_B = group_advantages(rewards, group_size, scale=False, row_mask=keep_B)
    pg_BA, clip_frac = _policy_gradient(logp, old_logp, mask, adv_B, clip_eps, clip_eps, is_weight)
    norm = jnp.sum(keep_B) * (logp.shape[1] if norm_length is None else norm_length)
    return _baseline_terms(jnp.sum(mask * pg_BA), norm, logp, old_logp, mask, rewards, keep_B, group_size,
                           clip_frac=clip_frac)


# ----------------------------------------------------------------------------------------------------
# Registries
# ----------------------------------------------------------------------------------------------------
TERMS: dict[str, Callable[..., LossTerms]] = {
    "real": real_terms,
    "real_bce": real_bce_terms,
    "real_product": real_product_terms,
    "real_ordinal": real_ordinal_terms,
    "grpo": grpo_terms,
    "dapo": dapo_terms,
    "gspo": gspo_terms,
    "dr_grpo": dr_grpo_terms,
}

# What each objective divides its sum by (README "Objectives"); also the unit micro-batches add up.
NORMALISERS = {"real": "groups", "real_bce": "labelled rows of valid groups", "real_product": "groups",
               "real_ordinal": "groups", "grpo": "rows", "dapo": "tokens", "gspo": "rows",
               "dr_grpo": "rows x norm_length"}


def _as_loss(name: str, terms_fn: Callable[..., LossTerms]) -> LossFn:
    @functools.wraps(terms_fn)
    def loss_fn(*args, **kwargs):
        return terms_fn(*args, **kwargs).finish()

    loss_fn.__name__ = loss_fn.__qualname__ = f"{name}_loss"
    return loss_fn


LOSSES: dict[str, LossFn] = {name: _as_loss(name, fn) for name, fn in TERMS.items()}
real_loss, real_bce_loss, real_product_loss, real_ordinal_loss = (LOSSES[n] for n in
                                                                  ("real", "real_bce", "real_product", "real_ordinal"))
grpo_loss, dapo_loss, gspo_loss, dr_grpo_loss = (LOSSES[n] for n in ("grpo", "dapo", "gspo", "dr_grpo"))


def hparams_of(name: str) -> dict[str, Any]:
    """An objective's hyper-parameters and their defaults, read from its signature."""
    params = inspect.signature(get_terms(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in INPUT_KWARGS}


def get_terms(name: str) -> Callable[..., LossTerms]:
    try:
        return TERMS[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(TERMS)}") from None


def get_loss(name: str) -> LossFn:
    get_terms(name)
    return LOSSES[name]
