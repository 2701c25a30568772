"""The rollout sampler: prefill once per prompt, share it across the group, decode in ``lax.while_loop``.

Two jitted programs over ``(graphdef, state, ...)``:

* ``prefill``: the left-padded prompts [P, Tp] go through the model once, writing a KV cache of
  ``S = Tp + N`` slots; the cache and last logits are repeated to the R rollouts of each prompt (the
  paper's R = 8 pays for one prompt pass instead of eight), and the first token is drawn.
* ``decode``: one token per step for all B = P * R rows inside ``lax.while_loop`` until every row has
  hit a stop id or N tokens. The decode state (cache included) is donated, so XLA updates it in place.
  Attention reads the cache through a static window (``KVCache.window``) that grows with the rows:
  ``decode`` runs once per window (``decode_windows``), each run a compiled program that stops when the
  next write would leave its window. Prefill attends over the prompt slots only.

Rows share a slot clock (see ``KVCache``); RoPE positions continue from each prompt's real length, so
left padding is exact. Each row draws from its own key ``fold_in(fold_in(key, row), step)``: a row's
sample does not depend on the batch it is in, which is what makes shared and per-row prefill agree.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from realjax import sharding as shd
from realjax.models.kv_cache import KVCache
from realjax.sampling.strategies import SamplingConfig, choose


@flax.struct.dataclass
class DecodeState:
    step: jax.Array  # int32 []: tokens generated so far (the index of the next one)
    tokens_BA: jax.Array  # int32, pad after a row's end
    logprobs_BA: jax.Array  # fp32, 0 after a row's end
    length_B: jax.Array  # int32: tokens generated per row, the stop token included
    done_B: jax.Array  # bool: the row has emitted a stop id
    last_B: jax.Array  # int32: the token to feed next
    prompt_len_B: jax.Array  # int32: real (unpadded) prompt tokens
    row_keys: jax.Array  # [B] PRNG keys
    budget_B: jax.Array  # int32: a row ends after this many tokens (N, or less where the caller says)
    cache: KVCache


@flax.struct.dataclass
class SampleOutput:
    """Rollouts: ``tokens`` [B, N] (pad after the end), ``mask`` [B, N] (1.0 on response tokens, the stop
    token included), ``logprobs`` [B, N], ``lengths`` [B], ``finished`` [B] (ended on a stop id rather
    than by running out of budget). Rows are ordered prompt-major: rollout r of prompt p is row p*R + r."""

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    finished: jax.Array


def draw_next(model, last_B, position_B, cache, keys_B, cfg: SamplingConfig, mesh, rules):
    """One decode step of every row, shared by the static sampler and the engine: the forward pass of
    each row's last token at ``position_B`` (writing its KV into ``cache``) and a draw from the logits
    with the row's key. Returns ``(token_B, logp_B, cache)``."""
    B = last_B.shape[0]
    with shd.use_rules(mesh, rules):
        h_B1D, cache = model.hidden_states(last_B[:, None], position_B[:, None], jnp.ones((B, 1), bool), cache=cache)
        logits_BV = model.logits(h_B1D)[:, 0]
    token_B, logp_B = choose(logits_BV, keys_B, cfg)
    return token_B, logp_B, cache


class Sampler:
    """Immutable sampling settings plus the two compiled programs.

    Args:
      cfg: the sampling settings (static: a new cfg is a new compile).
      pad_id: token written after a row ends.
      mesh, rules: run sharded (batch over data/fsdp, heads over tensor); None runs on one device.
    """

    def __init__(self, cfg: SamplingConfig, *, pad_id: int, mesh=None, rules=shd.ROLLOUT_RULES):
        self.cfg, self.pad_id, self.mesh, self.rules = cfg, int(pad_id), mesh, rules
        self.trace_counts = {"prefill": 0, "decode": 0}  # tests prove bucketing keeps compiles few
        # The jitted programs are public: `realjax compile` lowers them for a TPU topology, benches time them.
        self.prefill_program = jax.jit(self._prefill_fn, static_argnums=(0, 5))
        # The decode state, KV cache included, is replaced by the loop's result: donate it.
        self.decode_program = jax.jit(self._decode_fn, static_argnums=0, donate_argnums=2)

    def __call__(self, graphdef, state, prompt_ids, prompt_mask, key, *, group_size: int = 1,
                 budgets=None) -> SampleOutput:
        """Sample ``group_size`` rollouts for each left-padded prompt row ([P, Tp] ids and 0/1 mask).

        ``budgets`` (int [B], optional): per-row token budgets below N; ``realjax bench rollout`` draws them
        from a length distribution (a row that runs out of budget is not ``finished``)."""
        ds = self.prefill_program(graphdef, state, prompt_ids, prompt_mask, key, group_size)
        if budgets is not None:
            budget_B = jnp.minimum(jnp.asarray(budgets, jnp.int32), ds.budget_B)
            ds = ds.replace(budget_B=budget_B, done_B=ds.done_B | (ds.length_B >= budget_B))
        return self.finish(self.decode(graphdef, state, ds))

    def decode(self, graphdef, state, ds: DecodeState) -> DecodeState:
        """Run the decode loop from ``prefill``'s state to the end, window by window. ``ds`` is donated.

        No host sync between windows: a window whose rows are all done exits its loop at once."""
        for window in self.windows(ds):
            ds = self.decode_program(graphdef, state, self.with_window(ds, window))
        return ds

    def windows(self, ds: DecodeState) -> tuple[int, ...]:
        """The cache windows ``decode`` runs through for this state's shapes."""
        return decode_windows(ds.cache.length - ds.tokens_BA.shape[1], ds.tokens_BA.shape[1], self.cfg.window_tokens)

    @staticmethod
    def with_window(ds: DecodeState, window: int) -> DecodeState:
        return ds.replace(cache=ds.cache.replace(window=int(window)))

    # -- the two programs ------------------------------------------------------------------------------
    def _prefill_fn(self, graphdef, state, ids_PT, mask_PT, key, group_size):
        self.trace_counts["prefill"] += 1
        cfg = self.cfg
        model = nnx.merge(graphdef, state)
        P, Tp = ids_PT.shape
        B, N = P * group_size, cfg.max_new_tokens
        with shd.use_rules(self.mesh, self.rules):
            # Prefill writes and reads the prompt slots only; decode widens the window.
            cache = self._constrain(KVCache.zeros(model.cfg, P, Tp + N).replace(window=Tp))
            h_PTD, cache = model.hidden_states(ids_PT, mask_BT=mask_PT, cache=cache)
            logits_PV = model.logits(h_PTD[:, -1:])[:, 0]
            if group_size > 1:  # one prefill per prompt, shared by its rollouts
                cache = self._constrain(cache.repeat_rows(group_size))
                logits_PV = jnp.repeat(logits_PV, group_size, axis=0)
        prompt_len_B = jnp.repeat(jnp.sum(mask_PT.astype(jnp.int32), axis=-1), group_size)
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(B))
        token_B, logp_B = choose(logits_PV, step_keys(row_keys, 0), cfg)
        return DecodeState(
            step=jnp.ones((), jnp.int32),
            tokens_BA=jnp.full((B, N), self.pad_id, jnp.int32).at[:, 0].set(token_B),
            logprobs_BA=jnp.zeros((B, N), jnp.float32).at[:, 0].set(logp_B),
            length_B=jnp.ones((B,), jnp.int32), done_B=stop_mask(token_B, cfg.stop_ids), last_B=token_B,
            prompt_len_B=prompt_len_B, row_keys=row_keys, budget_B=jnp.full((B,), N, jnp.int32), cache=cache)

    def _decode_fn(self, graphdef, state, ds: DecodeState) -> DecodeState:
        self.trace_counts["decode"] += 1
        cfg, N = self.cfg, self.cfg.max_new_tokens
        model = nnx.merge(graphdef, state)
        window = ds.cache.span

        def cond(ds):  # step s writes cache slot ``end``: it must fall inside the window
            return (ds.step < N) & ~jnp.all(ds.done_B) & (ds.cache.end < window)

        def body(ds):
            token_B, logp_B, cache = draw_next(model, ds.last_B, ds.prompt_len_B + ds.step - 1, ds.cache,
                                               step_keys(ds.row_keys, ds.step), cfg, self.mesh, self.rules)
            token_B = jnp.where(ds.done_B, self.pad_id, token_B)
            logp_B = jnp.where(ds.done_B, 0.0, logp_B)
            at = (0, ds.step)
            length_B = ds.length_B + (~ds.done_B).astype(jnp.int32)
            return ds.replace(
                step=ds.step + 1,
                tokens_BA=jax.lax.dynamic_update_slice(ds.tokens_BA, token_B[:, None], at),
                logprobs_BA=jax.lax.dynamic_update_slice(ds.logprobs_BA, logp_B[:, None], at),
                length_B=length_B, done_B=ds.done_B | stop_mask(token_B, cfg.stop_ids) | (length_B >= ds.budget_B),
                last_B=token_B, cache=cache)

        return jax.lax.while_loop(cond, body, ds)

    # -- helpers ---------------------------------------------------------------------------------------
    def finish(self, ds: DecodeState) -> SampleOutput:
        N = ds.tokens_BA.shape[1]
        mask_BA = (jnp.arange(N)[None, :] < ds.length_B[:, None]).astype(jnp.float32)
        # A row is finished when it ended on a stop id: its last token is one.
        last_B = jnp.take_along_axis(ds.tokens_BA, jnp.maximum(ds.length_B - 1, 0)[:, None], axis=1)[:, 0]
        return SampleOutput(tokens=ds.tokens_BA, mask=mask_BA, logprobs=ds.logprobs_BA * mask_BA,
                            lengths=ds.length_B, finished=ds.done_B & stop_mask(last_B, self.cfg.stop_ids))

    def _constrain(self, cache: KVCache) -> KVCache:
        if self.mesh is None:
            return cache
        return jax.tree.map(jax.lax.with_sharding_constraint, cache, cache.shardings(self.mesh, self.rules))


def stop_mask(token_B, stop_ids: tuple[int, ...]):
    """Bool [B]: the token is one of ``stop_ids``."""
    if not stop_ids:
        return jnp.zeros(token_B.shape, bool)
    return jnp.isin(token_B, jnp.asarray(stop_ids, jnp.int32))


def step_keys(row_keys, step):
    """The keys of one step: ``fold_in(row_key, step)`` per row (``step`` [] or one per row [B]): a row's
    draw at token t depends on its own key and t only, whatever batch or slot it runs in."""
    return jax.vmap(jax.random.fold_in, (0, 0 if jnp.ndim(step) else None))(row_keys, step)


def decode_windows(prompt_slots: int, max_new_tokens: int, window_tokens: int) -> tuple[int, ...]:
    """Cache windows for a decode of ``max_new_tokens`` after ``prompt_slots``: the prompt plus
    ``window_tokens``, ``2 * window_tokens``, ... up to the whole cache (the last one)."""
    count = -(-max_new_tokens // window_tokens)
    return tuple(prompt_slots + min(max_new_tokens, i * window_tokens) for i in range(1, count + 1))


def replace_config(sampler: Sampler, **changes) -> Sampler:
    """A sampler with changed settings (e.g. evaluation's temperature) on the same mesh."""
    return Sampler(dataclasses.replace(sampler.cfg, **changes), pad_id=sampler.pad_id, mesh=sampler.mesh,
                   rules=sampler.rules)


def stack_outputs(outputs: list[SampleOutput]) -> SampleOutput:
    """Concatenate rollouts of several sampler calls along the rows (on the host)."""
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]), *outputs)
