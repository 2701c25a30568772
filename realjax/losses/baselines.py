"""The baselines: GRPO, DAPO, GSPO and Dr.GRPO, as the paper ran them (clipped surrogates over
group-normalised advantages)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from realjax.losses.parts import (ADV_EPS, Mean, batch_inputs, grouped, kl_penalty, make_terms, sequence_scores,
                                  token_weights)



# ----------------------------------------------------------------------------------------------------
# Baselines: GRPO, DAPO, GSPO, Dr.GRPO
# ----------------------------------------------------------------------------------------------------
def group_advantages(rewards_B, group_size, *, scale=True, row_mask=None):
    """``(r - mean_g) / (std_g + 1e-6)`` over a group's kept rows, with the unbiased std (torch's
    default); ``r - mean_g`` unscaled. Dropped rows get 0; so does a row left alone in its group."""
    if scale and group_size < 2:
        raise ValueError("group-normalised advantages need group_size >= 2 (the unbiased std of one is NaN)")
    r_PR = grouped(jnp.asarray(rewards_B, jnp.float32), group_size)
    keep_PR = jnp.ones_like(r_PR) if row_mask is None else grouped(jnp.asarray(row_mask, jnp.float32), group_size)
    n_P1 = jnp.sum(keep_PR, axis=-1, keepdims=True)
    a_PR = keep_PR * (r_PR - jnp.sum(keep_PR * r_PR, axis=-1, keepdims=True) / jnp.maximum(n_P1, 1.0))
    if scale:
        a_PR = a_PR / (jnp.sqrt(jnp.sum(a_PR**2, axis=-1, keepdims=True) / jnp.maximum(n_P1 - 1.0, 1.0)) + ADV_EPS)
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
    return pg_BA * token_weights(is_weight), _token_sum(clipped_BA.astype(jnp.float32), mask)


def mixed_groups(rewards_B, group_size, keep_B=None):
    """Boolean [P]: groups whose kept rows (all rows without ``keep_B``) do not all have the same reward;
    they carry a learning signal. The losses use it on device, dynamic sampling on host."""
    keep_B = jnp.ones_like(rewards_B) if keep_B is None else keep_B
    r_PR, keep_PR = grouped(rewards_B, group_size), grouped(keep_B, group_size) > 0
    return jnp.max(jnp.where(keep_PR, r_PR, -jnp.inf), -1) > jnp.min(jnp.where(keep_PR, r_PR, jnp.inf), -1)


def _baseline_terms(loss_total, loss_weight, logp, old_logp, mask, rewards, keep_B, group_size, **extra):
    s_B = sequence_scores(logp, old_logp, mask)
    return make_terms(loss_total, loss_weight, logp, old_logp, mask, keep_B, s_B,
                  mixed_groups(rewards, group_size, keep_B), **extra)


def grpo_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, clip_eps=0.2,
               ref_logp=None,
               kl_coef=0.0, kl_estimator="k3"):
    """GRPO: PPO-clip surrogate with group-normalised advantages; per-sequence token mean, then row mean.

    With ``ref_logp`` ([B, A], frozen reference policy) and ``kl_coef > 0`` adds ``kl_coef * KL(new||ref)``
    aggregated the same way (the official GRPO script: k3 / "low_var_kl", coefficient 0.001).
    """
    logp, old_logp, mask, rewards, keep_B = batch_inputs(logp, old_logp, mask, rewards, row_mask)
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
    logp, old_logp, mask, rewards, keep_B = batch_inputs(logp, old_logp, mask, rewards, row_mask)
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
    logp, old_logp, mask, rewards, keep_B = batch_inputs(logp, old_logp, mask, rewards, row_mask)
    adv_B = group_advantages(rewards, group_size, row_mask=keep_B)
    s_B = sequence_scores(logp, old_logp, mask)
    sg = jax.lax.stop_gradient
    log_ratio_BA = jnp.minimum(sg(s_B)[:, None] + logp - sg(logp), 10.0)
    pg_BA, clipped_BA = _clipped_surrogate(jnp.exp(log_ratio_BA), adv_B, clip_low, clip_high)
    pg_BA = pg_BA * token_weights(is_weight)
    return _baseline_terms(_sequence_means_sum(pg_BA, mask), jnp.sum(keep_B), logp, old_logp, mask, rewards,
                           keep_B, group_size, clip_frac=_token_sum(clipped_BA.astype(jnp.float32), mask))


def dr_grpo_terms(logp, old_logp, mask, rewards, *, group_size, row_mask=None, is_weight=None, clip_eps=0.2,
                  norm_length: int | None = None):
    """Dr.GRPO: advantages ``r - mean_g`` (no std), token sum divided by the constant ``rows * norm_length``.

    ``norm_length`` defaults to A, the padded response length (the generation budget).
    """
    logp, old_logp, mask, rewards, keep_B = batch_inputs(logp, old_logp, mask, rewards, row_mask)
    adv_B = group_advantages(rewards, group_size, scale=False, row_mask=keep_B)
    pg_BA, clip_frac = _policy_gradient(logp, old_logp, mask, adv_B, clip_eps, clip_eps, is_weight)
    norm = jnp.sum(keep_B) * (logp.shape[1] if norm_length is None else norm_length)
    return _baseline_terms(jnp.sum(mask * pg_BA), norm, logp, old_logp, mask, rewards, keep_B, group_size,
                           clip_frac=clip_frac)


