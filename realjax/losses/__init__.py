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

import difflib
import functools
import inspect
import typing
from typing import Any, Callable

import jax

from realjax.losses.baselines import (dapo_terms, dr_grpo_terms, group_advantages, grpo_terms, gspo_terms,  # noqa: F401
                                      mixed_groups)
from realjax.losses.parts import (kl_penalty, kl_to_old, log1p_sum_exp, masked_logsumexp,  # noqa: F401 (API)
                                  sequence_scores)
from realjax.losses.real import real_bce_terms, real_ordinal_terms, real_product_terms, real_terms
from realjax.sums import LossTerms, Mean, Metrics  # noqa: F401 (part of the losses API)

LossFn = Callable[..., tuple[jax.Array, Metrics]]
# Keyword arguments of an objective that are inputs, not hyper-parameters a config may set.
INPUT_KWARGS = ("group_size", "row_mask", "ref_logp", "is_weight")


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


@functools.cache  # TERMS is fixed at import; config reads (``cfg.loss.tau``) ask often
def hparam_types() -> dict[str, type]:
    """Every objective's hyper-parameters and their types (from the default, else the annotation): the
    keys a config's ``loss`` section may set. A new objective declares its own here, in its signature."""
    out: dict[str, type] = {}
    for name, fn in TERMS.items():
        hints = typing.get_type_hints(fn)
        for key, default in hparams_of(name).items():
            tp = type(default) if default is not None else hints[key]
            out.setdefault(key, tp)
    return out


def get_terms(name: str) -> Callable[..., LossTerms]:
    """The objective's terms function; the one place that says an objective name is unknown."""
    try:
        return TERMS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), TERMS, n=1)
        raise ValueError(f"unknown objective {name!r}" + (f"; did you mean {close[0]}?" if close else
                                                                 f"; choose one of {sorted(TERMS)}")) from None


def get_loss(name: str) -> LossFn:
    get_terms(name)
    return LOSSES[name]
