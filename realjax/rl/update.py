"""The learner: policy log-probs of rollouts, the jitted update step, and the optimizer.

A rollout row is ``[prompt (left-padded, Tp) | response (N)]``. The response token ``j`` is predicted from
the hidden state at ``Tp - 1 + j``, so the model reads ``Tp + N - 1`` tokens and log-probs come from the
tempered policy ``softmax(logits / T)`` that was sampled from (the released code's convention).

One update = one mini-batch of whole groups, cut into micro-batches of whole groups whose gradients are
averaged (``lax.scan``), so every objective's per-group normalisation holds for any micro-batch size:
the mean over micro-batches of "sum over groups / groups" is the mean over the mini-batch's groups. A
non-finite loss or gradient leaves parameters and optimizer state untouched and is reported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from realjax.models.logprobs import token_logprobs

# Loss metrics that add up over micro-batches; every other one is averaged.
_SUMMED = ("valid_groups", "thresholds")


def policy_logprobs(model, batch, *, temperature: float, chunk_tokens: int):
    """(logp [b, N], entropy [b, N]) of the response tokens under the tempered policy."""
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    tokens, resp_mask = batch["tokens"], batch["resp_mask"]
    Tp = prompt_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, tokens[:, :-1]], axis=1)
    mask = jnp.concatenate([prompt_mask, resp_mask[:, :-1]], axis=1).astype(bool)
    h_BTD, _ = model.hidden_states(ids, mask_BT=mask)
    return token_logprobs(model, h_BTD[:, Tp - 1:], tokens, temperature=temperature, chunk_tokens=chunk_tokens)


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


def make_update_step(graphdef, optimizer, loss_fn, hparams: dict, *, group_size: int, temperature: float,
                     chunk_tokens: int, use_ref: bool = False, shardings=None):
    """The jitted ``(params, opt_state, batch) -> (params, opt_state, metrics)``.

    ``batch`` leaves are ``[micro_batches, rows, ...]`` (rows a multiple of ``group_size``) with keys
    ``prompt_ids, prompt_mask, tokens, resp_mask, loss_mask, old_logp, rewards`` (+ ``ref_logp``).
    ``shardings``: (param shardings, optimizer-state shardings) to keep the layout across steps.
    """

    def micro_loss(params, mb):
        model = nnx.merge(graphdef, params)
        logp, entropy = policy_logprobs(model, mb, temperature=temperature, chunk_tokens=chunk_tokens)
        kw = dict(hparams, ref_logp=mb["ref_logp"]) if use_ref else hparams
        loss, metrics = loss_fn(logp, mb["old_logp"], mb["loss_mask"], mb["rewards"], group_size=group_size, **kw)
        m = mb["loss_mask"]
        metrics = dict(metrics, loss=loss, entropy=jnp.sum(entropy * m) / jnp.maximum(jnp.sum(m), 1.0))
        return loss, metrics

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(params, opt_state, batch):
        def accumulate(grads, mb):
            (_, metrics), g = grad_fn(params, mb)
            return jax.tree.map(jnp.add, grads, g), metrics

        n = jax.tree.leaves(batch)[0].shape[0]
        if n == 1:  # one micro-batch: no accumulator to fill and add to
            (_, metrics), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, per_micro = jax.lax.scan(accumulate, zeros, batch)
            grads = jax.tree.map(lambda g: g / n, grads)
            metrics = {k: jnp.sum(v) if k in _SUMMED else jnp.mean(v) for k, v in per_micro.items()}
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

        def apply(params, opt_state, grads):
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state

        # A non-finite loss or gradient skips the update: a branch, not a select over every parameter and
        # moment (three extra passes over the whole state on a CPU).
        new_params, new_opt_state = jax.lax.cond(ok, apply, lambda p, o, g: (p, o), params, opt_state, grads)
        metrics.update(grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32))
        return new_params, new_opt_state, metrics

    out_shardings = None if shardings is None else (shardings[0], shardings[1], None)
    # Parameters and optimizer state are replaced every step: donate them so XLA updates in place.
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)


def make_scoring_fn(graphdef, *, temperature: float, chunk_tokens: int):
    """Jitted ``(params, batch) -> (logp, entropy)`` over ``[chunks, rows, ...]`` batches, no gradient:
    the old-policy or reference log-probs, one chunk of rows at a time."""

    def score(params, batch):
        model = nnx.merge(graphdef, params)
        return jax.lax.map(lambda mb: policy_logprobs(model, mb, temperature=temperature,
                                                      chunk_tokens=chunk_tokens), batch)

    return jax.jit(score)
