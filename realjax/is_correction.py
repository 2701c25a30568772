"""Rollout/learner mismatch correction: importance weights of the learner's old policy against the sampler's.

When the learner recomputes old log-probs (bf16 rollouts), the rollouts were drawn from the *behaviour*
policy mu (the sampler's numbers), while the loss treats them as samples of pi_old (the learner's
numbers). The importance weight ``w = pi_old / mu`` corrects for it (``rollout.is_correction``):

* ``token_*``: one weight per response token, ``w_t = exp(old_logp_t - sampler_logp_t)``.
* ``seq_*``: one weight per rollout, the geometric mean of its token ratios
  ``w = exp(mean_t (old_logp_t - sampler_logp_t))`` (REAL's score is a token mean, so this is the ratio at
  the scale the score lives on; the plain product would explode with the length).
* ``*_tis`` truncates, ``min(w, C)``; ``*_mis`` masks, ``w`` where ``1/C <= w <= C`` and 0 elsewhere.

The weights are constants of the batch (no parameter enters them), which is what keeps micro-batching exact:
they multiply terms of the loss sums and leave the normalisers alone. How each objective uses them is in
``realjax.losses`` (``is_weight``) and the README.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MODES = ("none", "token_tis", "token_mis", "seq_tis", "seq_mis")
# Objectives whose unit is the rollout (they see a rollout only through its score s): sequence weights only.
ROLLOUT_OBJECTIVES = ("real", "real_bce", "real_product", "real_ordinal")
_MAX_LOG_W = 80.0  # exp(80) is finite in float32; a raw weight past it is reported as that


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ISWeights:
    """``weight``: the corrected weights ([B, A] for token modes, [B] for sequence modes); ``raw``: the
    uncorrected ratios, same shape; ``cut``: 1.0 where the cap changed the weight (truncated or masked);
    ``unit_mask``: the units the weights are over (response tokens of kept rows, or kept rows)."""

    weight: jax.Array
    raw: jax.Array
    cut: jax.Array
    unit_mask: jax.Array


def is_weights(old_logp_BA, sampler_logp_BA, mask_BA, *, mode: str, cap: float, row_mask_B=None) -> ISWeights:
    """The importance weights of ``mode`` (not ``none``) with cap ``C = cap``; see the module docstring."""
    if mode not in MODES[1:]:
        raise ValueError(f"unknown importance-correction mode {mode!r}; choose one of {MODES[1:]}")
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    mask_BA = f32(mask_BA) * (1.0 if row_mask_B is None else f32(row_mask_B)[:, None])
    # `where`, not a product: a padded position may hold -inf, and 0 * inf is NaN.
    log_w = jnp.where(mask_BA > 0, f32(old_logp_BA) - f32(sampler_logp_BA), 0.0)
    unit = mask_BA
    if mode.startswith("seq"):
        length_B = jnp.sum(mask_BA, -1)
        log_w = jnp.sum(log_w, -1) / jnp.maximum(length_B, 1.0)
        unit = (length_B > 0).astype(jnp.float32)
    log_cap = jnp.log(jnp.float32(cap))
    if mode.endswith("tis"):
        weight, cut = jnp.exp(jnp.minimum(log_w, log_cap)), log_w > log_cap
    else:
        cut = jnp.abs(log_w) > log_cap
        weight = jnp.where(cut, 0.0, jnp.exp(jnp.where(cut, 0.0, log_w)))
    weight = jax.lax.stop_gradient(weight)
    return ISWeights(weight, jnp.exp(jnp.minimum(log_w, _MAX_LOG_W)), cut.astype(jnp.float32) * unit, unit)


def is_metrics(w: ISWeights) -> dict[str, float]:
    """Per-step metrics over the units the weights are over: the mean and max of the raw ratio, the mean
    of the weight the loss uses, and the fraction the cap truncated or masked."""
    n = jnp.maximum(jnp.sum(w.unit_mask), 1.0)
    return {"is/ratio_mean": float(jnp.sum(w.raw * w.unit_mask) / n),
            "is/ratio_max": float(jnp.max(jnp.where(w.unit_mask > 0, w.raw, 0.0))),
            "is/weight_mean": float(jnp.sum(w.weight * w.unit_mask) / n),
            "is/cut_frac": float(jnp.sum(w.cut) / n)}
