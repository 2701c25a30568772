"""RLVR objectives as small pure functions: REAL and its variants, and the baselines.

Every objective has the same signature and returns ``(loss, metrics)``::

    loss, metrics = fn(logp, old_logp, mask, rewards, *, group_size, **hparams)

Shapes (axis legend of the project, see ``realjax/__init__.py``): ``logp_BT``, ``old_logp_BT`` and
``mask_BT`` are float ``[B, T]`` per-token log-probs of the response tokens under the current policy and
the rollout (old) policy, and the response mask; ``rewards_B`` is ``[B]``. ``B = P * R``: P prompt groups
of R = ``group_size`` rollouts, rows of one group contiguous (``b // R`` is the group id). No sorting
and no boolean indexing: every selection is a mask, so shapes are static and every function jits once.

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

from typing import Callable

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Metrics]]

_ADV_EPS = 1e-6  # verl's epsilon in (r - mean) / (std + eps)


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------
def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def sequence_scores(logp_BT, old_logp_BT, mask_BT):
    """s_B: the mean over response tokens of ``logp - old_logp`` (0 for an empty response)."""
    length_B = jnp.sum(mask_BT, axis=-1)
    return jnp.sum(mask_BT * (logp_BT - old_logp_BT), axis=-1) / jnp.maximum(length_B, 1.0)


def _grouped(x_B, group_size):
    if x_B.shape[0] % group_size:
        raise ValueError(f"batch of {x_B.shape[0]} rows is not a whole number of groups of {group_size}")
    return x_B.reshape(-1, group_size)


def _labels(rewards_B, group_size):
    """Positive / negative masks [P, R] and the valid-group mask [P]."""
    r_PR = _grouped(rewards_B, group_size)
    pos_PR, neg_PR = r_PR == 1.0, r_PR == 0.0
    valid_P = jnp.any(pos_PR, axis=-1) & jnp.any(neg_PR, axis=-1)
    return pos_PR, neg_PR, valid_P


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


def kl_to_old(logp_BT, old_logp_BT, mask_BT):
    """Token-mean KL(old || new) estimates from samples of the old policy: k1 and k3 (Schulman 2020)."""
    log_ratio_BT = logp_BT - old_logp_BT  # log(new / old)
    n = jnp.maximum(jnp.sum(mask_BT), 1.0)
    k1 = jnp.sum(mask_BT * -log_ratio_BT) / n
    k3 = jnp.sum(mask_BT * (jnp.expm1(log_ratio_BT) - log_ratio_BT)) / n
    return k1, k3


def kl_penalty(logp_BT, ref_logp_BT, estimator):
    """Per-token KL(new || ref) estimate with samples from the current policy.

    ``k1``: ``logp - ref``; ``k3`` / ``low_var_kl``: ``e^{ref-logp} - (ref - logp) - 1``, clamped to
    [-10, 10] as verl does (it is always >= 0 and unbiased, with far lower variance than k1).
    """
    if estimator == "k1":
        return logp_BT - ref_logp_BT
    if estimator in ("k3", "low_var_kl"):
        d_BT = jnp.clip(ref_logp_BT - logp_BT, -20.0, 20.0)
        return jnp.clip(jnp.expm1(d_BT) - d_BT, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3' (alias 'low_var_kl')")


def _common_metrics(logp_BT, old_logp_BT, mask_BT, s_B, valid_P) -> Metrics:
    k1, k3 = kl_to_old(logp_BT, old_logp_BT, mask_BT)
    return {
        "valid_groups": jnp.sum(valid_P.astype(jnp.float32)),
        "score_mean": jnp.mean(s_B),
        "kl_old_k1": k1,
        "kl_old_k3": k3,
    }


# ----------------------------------------------------------------------------------------------------
# REAL family
# ----------------------------------------------------------------------------------------------------
def real_loss(logp, old_logp, mask, rewards, *, group_size, tau=0.5):
    """REAL (paper Eq. 8) with anchor logits; ``sum over valid groups / number of groups``."""
    logp, old_logp, mask, rewards = _f32(logp, old_logp, mask, rewards)
    s_B = sequence_scores(logp, old_logp, mask)
    pos_PR, neg_PR, valid_P = _labels(rewards, group_size)
    z_PR = _grouped(s_B, group_size) / tau
    loss_P = log1p_sum_exp(-z_PR, pos_PR) + log1p_sum_exp(z_PR, neg_PR)
    loss = jnp.sum(jnp.where(valid_P, loss_P, 0.0)) / valid_P.shape[0]
    return loss, _common_metrics(logp, old_logp, mask, s_B, valid_P)


def real_bce_loss(logp, old_logp, mask, rewards, *, group_size, tau=0.5):
    """REAL-BCE: each rollout classified against the 0 anchor alone, ``BCE(s / tau, r == 1)``.

    Averaged over the rollouts of valid groups (the released code's ``reduction='mean'``), 0 when there
    is none.
    """
    logp, old_logp, mask, rewards = _f32(logp, old_logp, mask, rewards)
    s_B = sequence_scores(logp, old_logp, mask)
    pos_PR, neg_PR, valid_P = _labels(rewards, group_size)
    z_PR = _grouped(s_B, group_size) / tau
    # BCE with logits: softplus(z) - y z; rows that are neither label (graded rewards) are left out.
    bce_PR = jax.nn.softplus(z_PR) - pos_PR * z_PR
    w_PR = valid_P[:, None] & (pos_PR | neg_PR)
    loss = jnp.sum(jnp.where(w_PR, bce_PR, 0.0)) / jnp.maximum(jnp.sum(w_PR), 1)
    return loss, _common_metrics(logp, old_logp, mask, s_B, valid_P)


def real_product_loss(logp, old_logp, mask, rewards, *, group_size, tau=0.5):
    """Product (circle-loss) form without anchors: ``log(1 + sum_pos sum_neg e^{(s_neg - s_pos)/tau})``."""
    logp, old_logp, mask, rewards = _f32(logp, old_logp, mask, rewards)
    s_B = sequence_scores(logp, old_logp, mask)
    pos_PR, neg_PR, valid_P = _labels(rewards, group_size)
    z_PR = _grouped(s_B, group_size) / tau
    pair_P = masked_logsumexp(z_PR, neg_PR) + masked_logsumexp(-z_PR, pos_PR)
    loss_P = jax.nn.softplus(jnp.where(valid_P, pair_P, 0.0))
    loss = jnp.sum(jnp.where(valid_P, loss_P, 0.0)) / valid_P.shape[0]
    return loss, _common_metrics(logp, old_logp, mask, s_B, valid_P)


def real_ordinal_loss(logp, old_logp, mask, rewards, *, group_size, tau=0.5):
    """Our extension for graded rewards: REAL summed over the thresholds between a group's levels.

    For each distinct reward level ``l`` of a group except its highest, rollouts with ``r > l`` are the
    positives and those with ``r <= l`` the negatives of one binary REAL loss; the group's loss is the sum
    over its thresholds. With rewards in {0, 1} there is one threshold and this equals ``real_loss``.
    Static shapes: each rollout proposes its own reward as a threshold, and only the first rollout of
    each level in the group counts it.
    """
    logp, old_logp, mask, rewards = _f32(logp, old_logp, mask, rewards)
    s_B = sequence_scores(logp, old_logp, mask)
    r_PR = _grouped(rewards, group_size)
    z_PR = _grouped(s_B, group_size) / tau
    R = group_size
    # pos_PLR[p, l, i]: rollout i is above threshold r[p, l].
    pos_PLR = r_PR[:, None, :] > r_PR[:, :, None]
    neg_PLR = ~pos_PLR
    earlier_LR = jnp.tril(jnp.ones((R, R), bool), k=-1)  # [l, j] = j < l
    first_PL = ~jnp.any((r_PR[:, :, None] == r_PR[:, None, :]) & earlier_LR[None], axis=-1)
    used_PL = first_PL & jnp.any(pos_PLR, axis=-1)  # the top level proposes no threshold
    P = r_PR.shape[0]
    z_QR = jnp.broadcast_to(z_PR[:, None, :], (P, R, R)).reshape(P * R, R)
    loss_PL = (log1p_sum_exp(-z_QR, pos_PLR.reshape(P * R, R))
               + log1p_sum_exp(z_QR, neg_PLR.reshape(P * R, R))).reshape(P, R)
    loss = jnp.sum(jnp.where(used_PL, loss_PL, 0.0)) / P
    metrics = _common_metrics(logp, old_logp, mask, s_B, jnp.any(used_PL, axis=-1))
    metrics["thresholds"] = jnp.sum(used_PL.astype(jnp.float32))
    return loss, metrics


# ----------------------------------------------------------------------------------------------------
# Baselines: GRPO, DAPO, GSPO, Dr.GRPO
# ----------------------------------------------------------------------------------------------------
def group_advantages(rewards_B, group_size, *, scale=True):
    """``(r - mean_g) / (std_g + 1e-6)`` with the unbiased std (torch's default); ``r - mean_g`` unscaled."""
    if scale and group_size < 2:
        raise ValueError("group-normalised advantages need group_size >= 2 (the unbiased std of one is NaN)")
    r_PR = _grouped(rewards_B, group_size)
    a_PR = r_PR - jnp.mean(r_PR, axis=-1, keepdims=True)
    if scale:
        a_PR = a_PR / (jnp.std(r_PR, axis=-1, keepdims=True, ddof=1) + _ADV_EPS)
    return a_PR.reshape(-1)


def _clipped_surrogate(ratio_BT, adv_B, clip_low, clip_high):
    """PPO's per-token loss ``-min(rho A, clip(rho) A)`` and the mask of tokens where the clip is active."""
    adv_BT = adv_B[:, None]
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * jnp.clip(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped_BT, clipped_BT), clipped_BT > unclipped_BT


def _seq_mean_then_batch_mean(x_BT, mask_BT):
    return jnp.mean(jnp.sum(mask_BT * x_BT, -1) / jnp.maximum(jnp.sum(mask_BT, -1), 1.0))


def _token_mean(x_BT, mask_BT):
    return jnp.sum(mask_BT * x_BT) / jnp.maximum(jnp.sum(mask_BT), 1.0)


def _policy_gradient(logp, old_logp, mask, adv_B, clip_low, clip_high):
    ratio_BT = jnp.exp(logp - old_logp)
    pg_BT, clipped_BT = _clipped_surrogate(ratio_BT, adv_B, clip_low, clip_high)
    return pg_BT, _token_mean(clipped_BT.astype(jnp.float32), mask)


def _valid_std_groups(rewards_B, group_size):
    r_PR = _grouped(rewards_B, group_size)
    return jnp.max(r_PR, -1) > jnp.min(r_PR, -1)


def grpo_loss(logp, old_logp, mask, rewards, *, group_size, clip_eps=0.2, ref_logp=None, kl_coef=0.0,
              kl_estimator="k3"):
    """GRPO: PPO-clip surrogate with group-normalised advantages; per-sequence token mean, then batch mean.

    With ``ref_logp`` ([B, T], frozen reference policy) and ``kl_coef > 0`` adds ``kl_coef * KL(new||ref)``
    aggregated the same way (the official GRPO script: k3 / "low_var_kl", coefficient 0.001).
    """
    logp, old_logp, mask, rewards = _f32(logp, old_logp, mask, rewards)
    adv_B = group_advantages(rewards, group_size)
    pg_BT, clip_frac = _policy_gradient(logp, old_logp, mask, adv_B, clip_eps, clip_eps)
    loss = _seq_mean_then_batch_mean(pg_BT, mask)
    s_B = sequence_scores(logp, old_logp, mask)
    metrics = _common_metrics(logp, old_logp, mask, s_B, _valid_std_groups(rewards, group_size))
    metrics["clip_frac"] = clip_frac
    if ref_logp is not None:
        kl = _seq_mean_then_batch_mean(kl_penalty(logp, jnp.asarray(ref_logp, jnp.float32), kl_estimator), mask)
        loss = loss + kl_coef * kl
        metrics["kl_ref"] = kl
    return loss, metrics


def dapo_loss(logp, old_logp, mask, rewards, *, group_size, clip_low=0.2, clip_high=0.28):
    """DAPO as the paper ran it: clip-higher (0.2 / 0.28) and a token mean over the whole batch.

    Dynamic sampling and overlong filtering are trainer options, not part of the loss.
    """
    logp, old_logp, mask, rewards = _f32(logp, old_logp, mask, rewards)
    adv_B = group_advantages(rewards, group_size)
    pg_BT, clip_frac = _policy_gradient(logp, old_logp, mask, adv_B, clip_low, clip_high)
    s_B = sequence_scores(logp, old_logp, mask)
    metrics = _common_metrics(logp, old_logp, mask, s_B, _valid_std_groups(rewards, group_size))
    metrics["clip_frac"] = clip_frac
    return _token_mean(pg_BT, mask), metrics


def gspo_loss(logp, old_logp, mask, rewards, *, group_size, clip_low=3e-4, clip_high=4e-4):
    """GSPO: the sequence-level ratio ``exp(mean_t log rho_t)`` clipped to [1 - 3e-4, 1 + 4e-4].

    Written in the GSPO-token form of the released code: each token's log-ratio is
    ``sg(seq mean log-ratio) + logp_t - sg(logp_t)`` (clamped at 10), so the value is the sequence ratio
    and the gradient reaches each token through its own log-prob. Per-sequence token mean, batch mean.
    """
    logp, old_logp, mask, rewards = _f32(logp, old_logp, mask, rewards)
    adv_B = group_advantages(rewards, group_size)
    s_B = sequence_scores(logp, old_logp, mask)
    sg = jax.lax.stop_gradient
    log_ratio_BT = jnp.minimum(sg(s_B)[:, None] + logp - sg(logp), 10.0)
    pg_BT, clipped_BT = _clipped_surrogate(jnp.exp(log_ratio_BT), adv_B, clip_low, clip_high)
    metrics = _common_metrics(logp, old_logp, mask, s_B, _valid_std_groups(rewards, group_size))
    metrics["clip_frac"] = _token_mean(clipped_BT.astype(jnp.float32), mask)
    return _seq_mean_then_batch_mean(pg_BT, mask), metrics


def dr_grpo_loss(logp, old_logp, mask, rewards, *, group_size, clip_eps=0.2, norm_length=None):
    """Dr.GRPO: advantages ``r - mean_g`` (no std), token sum divided by a constant ``B * norm_length``.

    ``norm_length`` defaults to T, the padded response length (the generation budget).
    """
    logp, old_logp, mask, rewards = _f32(logp, old_logp, mask, rewards)
    adv_B = group_advantages(rewards, group_size, scale=False)
    pg_BT, clip_frac = _policy_gradient(logp, old_logp, mask, adv_B, clip_eps, clip_eps)
    norm = logp.shape[0] * (logp.shape[1] if norm_length is None else norm_length)
    s_B = sequence_scores(logp, old_logp, mask)
    metrics = _common_metrics(logp, old_logp, mask, s_B, _valid_std_groups(rewards, group_size))
    metrics["clip_frac"] = clip_frac
    return jnp.sum(mask * pg_BT) / norm, metrics


LOSSES: dict[str, LossFn] = {
    "real": real_loss,
    "real_bce": real_bce_loss,
    "real_product": real_product_loss,
    "real_ordinal": real_ordinal_loss,
    "grpo": grpo_loss,
    "dapo": dapo_loss,
    "gspo": gspo_loss,
    "dr_grpo": dr_grpo_loss,
}


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
