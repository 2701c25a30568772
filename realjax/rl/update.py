"""The learner: policy log-probs of rollouts, the jitted update step, and the optimizer.

A rollout row is ``[prompt (left-padded, Q) | response (A)]``. The response token ``j`` is predicted from
the hidden state at ``Q - 1 + j``, so the model reads ``Q + A - 1`` tokens and log-probs come from the
tempered policy ``softmax(logits / T)`` that was sampled from (the released code's convention).

One update = one optimizer step over one mini-batch of whole groups (the paper's code does the same). A
mini-batch may be cut into M micro-batches of whole groups (``lax.scan``) to bound memory. The cut never
changes the result: every objective is a sum of terms over a parameter-free normaliser
(``realjax.losses.LossTerms``), so the step adds the gradients of the micro-batches' *sums* and their
normalisers, and divides once. The mini-batch's metrics are exact the same way. A non-finite loss or
gradient leaves parameters and optimizer state untouched and is reported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from realjax.grad_weights import RowGrads, grad_weight_metrics, row_grads
from realjax.is_correction import is_weights
from realjax.losses import LossTerms, Mean
from realjax.models import lora
from realjax.models.attention import Backend, use_backend
from realjax.models.logprobs import token_logprobs
from realjax.rl.batch import TrainState, UpdateBatch
from realjax.rl.packing import packed_logprobs


def policy_logprobs(model, batch: UpdateBatch, *, temperature: float, chunk_tokens: int):
    """(logp [B, A], entropy [B, A]) of the response tokens under the tempered policy (run on the packed
    sequences when the batch carries a packing)."""
    if batch.packing is not None:
        return packed_logprobs(model, batch, temperature=temperature, chunk_tokens=chunk_tokens)
    Q = batch.prompt_ids_BQ.shape[1]
    ids_BT = jnp.concatenate([batch.prompt_ids_BQ, batch.tokens_BA[:, :-1]], axis=1)
    mask_BT = jnp.concatenate([batch.prompt_mask_BQ, batch.resp_mask_BA[:, :-1]], axis=1).astype(bool)
    h_BTD, _ = model.hidden_states(ids_BT, mask_BT=mask_BT)
    return token_logprobs(model, h_BTD[:, Q - 1:], batch.tokens_BA, temperature=temperature,
                          chunk_tokens=chunk_tokens)


def make_optimizer(lr: float, *, weight_decay: float, grad_clip: float, b1: float, b2: float, eps: float,
                   schedule: str, warmup_updates: int, total_updates: int) -> optax.GradientTransformation:
    """AdamW behind global-norm clipping; the schedule counts optimizer updates."""
    if schedule == "constant":
        sched = optax.constant_schedule(lr)
    elif schedule == "cosine":
        sched = optax.cosine_decay_schedule(lr, max(total_updates - warmup_updates, 1))
    elif schedule == "linear":
        sched = optax.linear_schedule(lr, 0.0, max(total_updates - warmup_updates, 1))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    if warmup_updates:
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_updates), sched], [warmup_updates])
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


def batch_terms(model, batch: UpdateBatch, terms_fn, hparams: dict, *, group_size: int, temperature: float,
                chunk_tokens: int, is_correction: tuple[str, float] = ("none", 0.0)) -> tuple[LossTerms, RowGrads]:
    """The objective's terms on one (micro-)batch, with the policy's entropy over the kept tokens, and each
    rollout's gradient weight |dS/ds| (``realjax.grad_weights``: the loss terms' backward pass only).

    ``is_correction``: (mode, cap) of ``rollout.is_correction``; applied when the batch carries the sampler's
    log-probs (``sampler_logp_BA``) beside the recomputed old ones.
    """
    logp, entropy = policy_logprobs(model, batch, temperature=temperature, chunk_tokens=chunk_tokens)
    kw = dict(hparams) if batch.ref_logp_BA is None else dict(hparams, ref_logp=batch.ref_logp_BA)
    mode, cap = is_correction
    if mode != "none" and batch.sampler_logp_BA is not None:
        kw["is_weight"] = is_weights(batch.old_logp_BA, batch.sampler_logp_BA, batch.resp_mask_BA, mode=mode,
                                     cap=cap, row_mask_B=batch.row_mask_B).weight
    terms = terms_fn(logp, batch.old_logp_BA, batch.resp_mask_BA, batch.rewards_B, group_size=group_size,
                     row_mask=batch.row_mask_B, **kw)
    m_BA = batch.resp_mask_BA * batch.row_mask_B[:, None]
    entropy = Mean(jnp.sum(entropy * m_BA), jnp.sum(m_BA))
    rows = row_grads(terms_fn, logp, batch.old_logp_BA, batch.resp_mask_BA, batch.rewards_B, group_size=group_size,
                     row_mask_B=batch.row_mask_B, **kw)
    return LossTerms(terms.loss_sum, {**terms.means, "entropy": entropy}, terms.counts), rows


def make_update_step(graphdef, optimizer, terms_fn, hparams: dict, *, group_size: int, temperature: float,
                     chunk_tokens: int, shardings: TrainState | None = None,
                     is_correction: tuple[str, float] = ("none", 0.0), attention: Backend = Backend()):
    """The jitted ``(state: TrainState, batch: UpdateBatch, key=None) -> (state, metrics: dict[str, Mean])``.

    Gradients and the optimizer see ``state.params`` only; ``state.frozen`` (a LoRA policy's base weights)
    joins them in the forward pass. ``key`` turns on LoRA adapter dropout (micro-batch m draws from
    ``fold_in(key, m)``); None runs without.

    ``batch`` leaves are ``[M, rows, ...]``: M micro-batches of whole groups (``rows`` a multiple of
    ``group_size``). ``terms_fn`` is a ``realjax.losses.TERMS`` entry. The metrics are :class:`Mean`\\ s (and
    ``realjax.grad_weights.Max`` for maxima) so
    that the caller can add those of several updates and divide once; counters (valid groups, skipped
    updates) are per-update means. ``shardings``: the state's shardings, kept across steps. ``is_correction``:
    see :func:`batch_terms`. ``attention``: the back end the model's attention traces with.
    """

    @use_backend(attention)  # at trace time: the scan and grad below trace this body
    def micro(params, frozen, mb: UpdateBatch, key):
        with lora.dropout_rng(key):  # read while tracing: the adapters' masks come from this key
            terms, rows = batch_terms(lora.merge_policy(graphdef, params, frozen), mb, terms_fn, hparams,
                                      group_size=group_size, temperature=temperature, chunk_tokens=chunk_tokens,
                                      is_correction=is_correction)
        return terms.loss_sum.total, (terms, rows)

    grad_fn = jax.grad(micro, has_aux=True)

    def step(state: TrainState, batch: UpdateBatch, key=None):
        params, frozen = state.params, state.frozen
        n = jax.tree.leaves(batch)[0].shape[0]
        keys = None if key is None else jax.random.split(key, n)
        if n == 1:  # one micro-batch: no accumulator to fill and add to
            grads, (terms, rows) = grad_fn(params, frozen, jax.tree.map(lambda x: x[0], batch),
                                           None if keys is None else keys[0])
        else:
            def accumulate(carry, xs):
                mb, k = xs
                grads, (terms, rows) = grad_fn(params, frozen, mb, k)
                return jax.tree.map(jnp.add, carry, (grads, terms)), rows  # rows stack: [M, rows]

            # Zeros of the (gradients, terms) structure; one copy of the backward program, inside the scan.
            grads_shape, (terms_shape, _) = jax.eval_shape(grad_fn, params, frozen, jax.tree.map(lambda x: x[0], batch),
                                                           None if keys is None else keys[0])
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, terms_shape))
            (grads, terms), rows = jax.lax.scan(accumulate, zeros, (batch, keys))
        # Divide once by the whole mini-batch's normaliser (parameter-free, so this is its exact gradient).
        weight = terms.loss_sum.weight
        grads = jax.tree.map(lambda g: g / jnp.where(weight > 0, weight, 1.0).astype(g.dtype), grads)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(terms.loss_sum.value) & jnp.isfinite(grad_norm)

        def apply(params, opt_state, grads):
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state

        # A non-finite loss or gradient skips the update: a branch, not a select over every parameter and
        # moment (three extra passes over the whole state on a CPU).
        new_params, new_opt = jax.lax.cond(ok, apply, lambda p, o, g: (p, o), params, state.opt_state, grads)
        one = jnp.float32(1.0)
        metrics = {"loss": terms.loss_sum, **terms.means, **{k: Mean(v, one) for k, v in terms.counts.items()},
                   "grad_norm": Mean(grad_norm, one), "skipped": Mean((~ok).astype(jnp.float32), one),
                   **grad_weight_metrics(rows)}  # terciles over the whole mini-batch, whatever the cut
        return state.replace(params=new_params, opt_state=new_opt), metrics

    out_shardings = None if shardings is None else (shardings, None)
    # The state is replaced every step: donate it so XLA updates in place (the frozen base included: it
    # comes back as the same buffers rather than as a copy).
    return jax.jit(step, donate_argnums=0, out_shardings=out_shardings)


def make_scoring_fn(graphdef, *, temperature: float, chunk_tokens: int, attention: Backend = Backend()):
    """Jitted ``(params, batch: UpdateBatch [M, rows, ...], frozen=None) -> (logp, entropy)`` without
    gradient: the old-policy or reference log-probs, one chunk of rows at a time (``frozen``: a LoRA
    policy's base weights beside its adapters ``params``)."""

    @use_backend(attention)
    def score(params, batch: UpdateBatch, frozen=None):
        model = lora.merge_policy(graphdef, params, frozen)
        return jax.lax.map(lambda mb: policy_logprobs(model, mb, temperature=temperature,
                                                      chunk_tokens=chunk_tokens), batch)

    return jax.jit(score)
