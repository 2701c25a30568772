"""What the objectives share: the batch's masks, group reshapes and labels, importance weights, sequence
scores, the anchored logsumexp, KL estimators, and the ``LossTerms`` every objective returns."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from realjax.sums import LossTerms, Mean

ADV_EPS = 1e-6  # verl's epsilon in (r - mean) / (std + eps)


def batch_inputs(logp, old_logp, mask, rewards, row_mask):
    """float32 inputs; the token mask of dropped rows zeroed; ``keep_B`` (1.0 = the row takes part)."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    logp, old_logp, mask, rewards = f32(logp), f32(old_logp), f32(mask), f32(rewards)
    keep_B = jnp.ones_like(rewards) if row_mask is None else f32(row_mask)
    return logp, old_logp, mask * keep_B[:, None], rewards, keep_B


def rollout_weights(is_weight, group_size, rewards_B):
    """REAL family: the rollouts' importance weights [P, R] (1 without correction) as the log-shift of each
    rollout's exp term and the selection of rollouts with a non-zero weight (``realjax.is_correction``)."""
    if is_weight is None:
        w_B = jnp.ones_like(rewards_B)
    else:
        w_B = jax.lax.stop_gradient(jnp.asarray(is_weight, jnp.float32))
        if w_B.shape != rewards_B.shape:
            raise ValueError(f"the REAL family weights whole rollouts: is_weight must be [B] = {rewards_B.shape}, "
                             f"got {w_B.shape} (use a sequence-level correction)")
    w_PR = grouped(w_B, group_size)
    return w_PR, jnp.log(jnp.where(w_PR > 0, w_PR, 1.0)), w_PR > 0


def token_weights(is_weight):
    """Token-level objectives: the weight that multiplies each token's surrogate, [B, A] or [B, 1]."""
    if is_weight is None:
        return 1.0
    w = jax.lax.stop_gradient(jnp.asarray(is_weight, jnp.float32))
    return w[:, None] if w.ndim == 1 else w


def sequence_scores(logp_BA, old_logp_BA, mask_BA):
    """s_B: the mean over response tokens of ``logp - old_logp`` (0 for an empty response)."""
    length_B = jnp.sum(mask_BA, axis=-1)
    return jnp.sum(mask_BA * (logp_BA - old_logp_BA), axis=-1) / jnp.maximum(length_B, 1.0)


def grouped(x_B, group_size):
    if x_B.shape[0] % group_size:
        raise ValueError(f"batch of {x_B.shape[0]} rows is not a whole number of groups of {group_size}")
    return x_B.reshape(-1, group_size)


def labels(rewards_B, keep_B, group_size):
    """Positive / negative masks [P, R] (kept rows only) and the valid-group mask [P]."""
    r_PR, keep_PR = grouped(rewards_B, group_size), grouped(keep_B, group_size) > 0
    pos_PR, neg_PR = (r_PR == 1.0) & keep_PR, (r_PR == 0.0) & keep_PR
    valid_P = jnp.any(pos_PR, axis=-1) & jnp.any(neg_PR, axis=-1)
    return pos_PR, neg_PR, valid_P


def group_count(keep_B, group_size):
    """How many groups take part: those with at least one kept row (all of them without a row mask)."""
    return jnp.sum(jnp.any(grouped(keep_B, group_size) > 0, axis=-1).astype(jnp.float32))


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


def make_terms(loss_total, loss_weight, logp_BA, old_logp_BA, mask_BA, keep_B, s_B, valid_P, **extra) -> LossTerms:
    """The loss sum and the metrics every objective reports."""
    k1, k3 = kl_to_old(logp_BA, old_logp_BA, mask_BA)
    means = {"score_mean": Mean(jnp.sum(keep_B * s_B), jnp.sum(keep_B)), "kl_old_k1": k1, "kl_old_k3": k3}
    means.update({k: v for k, v in extra.items() if isinstance(v, Mean)})
    counts = {"valid_groups": jnp.sum(valid_P.astype(jnp.float32))}
    counts.update({k: v for k, v in extra.items() if not isinstance(v, Mean)})
    return LossTerms(Mean(loss_total, jnp.asarray(loss_weight, jnp.float32)), means, counts)


