"""The continuous-batching rollout engine: decode only live rows, refill free slots, same samples.

The static ``Sampler`` decodes all B rows until the longest ends, so a finished row keeps its slot and
its KV cache is read at every step. On reasoning lengths (R1-Distill: median ~0.43 N, a few rows cut at
N) about half of all row-steps go to finished rows. The engine decodes the rows of a call in a batch of
*slots* instead, in chunks of ``compact_every`` steps; between chunks the host reads the (globally
replicated) done flags and

* **compacts**: when the live rows plus the queue fit a smaller bucket, the live slots are gathered into
  a batch of that size (buckets are a bounded set, multiples of the data-parallel devices, so compiles
  stay few and the batch axis stays evenly sharded);
* **refills**: rows waiting in the queue (when rows exceed ``slots``) take the free slots. Every prompt is
  prefilled once, before decoding; a row entering a slot copies its prompt's cache and draws its first
  token from its prompt's last logits, so R rollouts still share one prompt pass.

Each slot has its own cache clock (``KVCache.end`` of shape [B]) and its own step counter, so a refilled
row writes at its own slots and attends exactly to its own prompt and tokens. A chunk's attention reads
a static window that covers the longest live row for the chunk (rounded up to ``window_tokens``; one
compiled decode per bucket and window). Where this departs from "each row reads only its own cache":
with refill, a young row in a slot beside old ones reads (masked) up to the old rows' window, since the
attention is one dense program over the batch; without refill all rows share their age and the window
tracks them.

Same samples as the static sampler: the row in a slot draws token t with ``fold_in(fold_in(key, row), t)``
(``sampler.step_keys``) whatever slot or bucket it runs in, and a row's numbers never mix with other
rows', so tokens equal the static sampler's row for row (``tests/test_engine.py``) up to fp32 rounding:
XLA's products can round differently at another batch size or window, which flips a sampled token only
when two Gumbel-perturbed scores tie to ~1e-6. Every process takes the same decisions: they depend only
on the all-gathered done flags and slot clocks.

Here B counts decode slots; a call's rows (``P * R``, prompt-major) are indexed by ``row``.
"""

from __future__ import annotations

import collections
import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from realjax import sharding as shd
from realjax.models.kv_cache import CACHE_AXES, KVCache
from realjax.sampling.sampler import SampleOutput, draw_next, step_keys, stop_mask
from realjax.sampling.schedule import call_buckets, chunk_window, compaction_order, fit_bucket
from realjax.sampling.strategies import SamplingConfig, choose


@flax.struct.dataclass
class Prompts:
    """Every prompt of a call, prefilled once: its cache slots [0, Tp) and its last logits."""

    k: jax.Array  # [L, P, K, Tp, H]
    v: jax.Array  # [L, P, K, Tp, H]
    mask_PT: jax.Array  # bool: real prompt tokens
    logits_PV: jax.Array  # fp32: the next-token logits after the prompt
    length_P: jax.Array  # int32: real prompt tokens (RoPE positions continue from here)


@flax.struct.dataclass
class Slots:
    """The decode batch: which row each slot holds and where it is."""

    row_B: jax.Array  # int32: the row in the slot (``rows`` = none)
    step_B: jax.Array  # int32: tokens the row has generated (the index of the next one)
    last_B: jax.Array  # int32: the token to feed next
    prompt_len_B: jax.Array  # int32
    budget_B: jax.Array  # int32: the row ends after this many tokens
    done_B: bool  # the slot holds no live row
    keys_B: jax.Array  # [B] PRNG keys: the row's own key
    cache: KVCache  # end [B]: each slot's own clock


@flax.struct.dataclass
class Results:
    """What the rows produced, by row: written by the slot holding the row."""

    tokens_BA: jax.Array  # int32, pad after a row's end
    logprobs_BA: jax.Array  # fp32, 0 after a row's end
    length_B: jax.Array  # int32
    finished_B: jax.Array  # bool: ended on a stop id


@dataclasses.dataclass
class EngineStats:
    """One call's schedule: (slots, window, steps) per decode chunk; what the bench counts."""

    chunks: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)

    @property
    def row_steps(self) -> int:
        return sum(b * s for b, _, s in self.chunks)

    @property
    def cache_slots_read(self) -> int:
        """KV-cache slots attention read, summed over rows and steps (times bytes per slot = bytes)."""
        return sum(b * w * s for b, w, s in self.chunks)


class Engine:
    """Continuous-batching sampler with the static ``Sampler``'s interface and samples.

    Args:
      cfg: the sampling settings.
      pad_id: token written after a row ends.
      slots: decode slots (0 = every row of a call gets one: compaction only).
      compact_every: decode steps per chunk (K): the host decides compaction and refill every K steps.
      mesh, rules: run sharded (slots over data/fsdp); None runs on one device.
    """

    def __init__(self, cfg: SamplingConfig, *, pad_id: int, slots: int = 0, compact_every: int = 32, mesh=None,
                 rules=shd.ROLLOUT_RULES):
        if compact_every < 1:
            raise ValueError(f"compact_every must be >= 1, got {compact_every}")
        self.cfg, self.pad_id, self.slots, self.compact_every = cfg, int(pad_id), int(slots), int(compact_every)
        self.mesh, self.rules = mesh, rules
        self.multiple = 1 if mesh is None else shd.batch_rows_multiple(mesh, rules)
        self.stats = EngineStats()
        self.trace_counts = collections.Counter()
        self._prefill = jax.jit(self._prefill_fn)
        self._empty = jax.jit(self._empty_fn, static_argnums=(0, 1, 2))
        # Slots and results are replaced by each program's result: donate them, XLA updates in place.
        self._insert = jax.jit(self._insert_fn, static_argnums=4, donate_argnums=(0, 1))
        self._decode = jax.jit(self._decode_fn, static_argnums=0, donate_argnums=(2, 3))
        self._compact = jax.jit(self._compact_fn)  # a smaller batch: nothing to update in place

    # -- the host schedule -----------------------------------------------------------------------------
    def __call__(self, graphdef, state, prompt_ids, prompt_mask, key, *, group_size: int = 1,
                 budgets=None) -> SampleOutput:
        """Sample ``group_size`` rollouts per left-padded prompt ([P, Tp]); rows come out prompt-major, as
        the static sampler's. ``budgets`` (int [rows], optional): per-row budgets below N (the bench)."""
        P, Tp = prompt_ids.shape
        rows, N = P * group_size, self.cfg.max_new_tokens
        budget = np.full(rows, N, np.int32) if budgets is None else np.minimum(np.asarray(budgets, np.int32), N)
        cap, sizes = call_buckets(rows, self.slots, self.multiple)
        fit = lambda n: fit_bucket(sizes, n)
        self.stats = EngineStats()
        prompts = self._prefill(graphdef, state, prompt_ids, prompt_mask)
        slots, res = self._empty(fit(cap), Tp + N, rows, prompts, key)
        queue = collections.deque(range(rows))
        # The host's copy of the slots' done flags and clocks, all-gathered after every chunk: every process
        # holds the same copy and takes the same decisions. Host arrays go into the programs as numpy
        # (replicated on every process), never as one device's array.
        live, ends = np.zeros(fit(cap), bool), np.full(fit(cap), Tp, np.int64)
        while live.any() or queue:
            order = compaction_order(live, len(queue), cap, sizes, self.multiple)
            if order is not None:  # each chip's live rows first, then its free slots
                slots, live, ends = self._compact(slots, order.astype(np.int32)), live[order], ends[order]
            free = np.flatnonzero(~live)[:len(queue)]
            if free.size:
                slot_J = np.full(live.size, live.size, np.int32)  # padded to the bucket: one compile per size
                row_J = np.full(live.size, rows, np.int32)  # padding rows write nowhere
                slot_J[:free.size] = free
                row_J[:free.size] = [queue.popleft() for _ in free]
                slots, res = self._insert(slots, res, prompts, key, group_size, slot_J, row_J,
                                          budget[np.minimum(row_J, rows - 1)])
                live, ends[free] = ~shd.to_host(slots.done_B), Tp
                if not live.any():
                    continue
            window = chunk_window(int(ends[live].max()) - Tp, Tp, N, self.compact_every, self.cfg.window_tokens)
            slots, res = self._decode(graphdef, state, self._with_window(slots, window), res)
            # The longest-running live slot advanced on every step the chunk ran.
            started, ends = ends, shd.to_host(slots.cache.end).astype(np.int64)
            self.stats.chunks.append((live.size, window, int((ends - started)[live].max())))
            live = ~shd.to_host(slots.done_B)
        mask_BA = (jnp.arange(N)[None, :] < res.length_B[:, None]).astype(jnp.float32)
        return SampleOutput(tokens=res.tokens_BA, mask=mask_BA, logprobs=res.logprobs_BA * mask_BA,
                            lengths=res.length_B, finished=res.finished_B)

    @staticmethod
    def _with_window(slots: Slots, window: int) -> Slots:
        return slots.replace(cache=slots.cache.replace(window=int(window)))

    # -- the programs ----------------------------------------------------------------------------------
    def _prefill_fn(self, graphdef, state, ids_PT, mask_PT) -> Prompts:
        self.trace_counts["prefill"] += 1
        model = nnx.merge(graphdef, state)
        P, Tp = ids_PT.shape
        with shd.use_rules(self.mesh, self.rules):
            cache = KVCache.zeros(model.cfg, P, Tp)
            h_PTD, cache = model.hidden_states(ids_PT, mask_BT=mask_PT, cache=cache)
            logits_PV = model.logits(h_PTD[:, -1:])[:, 0]
        return Prompts(k=cache.k, v=cache.v, mask_PT=cache.mask, logits_PV=logits_PV,
                       length_P=jnp.sum(mask_PT.astype(jnp.int32), axis=-1))

    def _empty_fn(self, B, S, rows, prompts: Prompts, key):
        """``B`` free slots of ``S`` cache slots and empty results for ``rows`` rows."""
        self.trace_counts["empty"] += 1
        zeros = lambda x: jnp.zeros((x.shape[0], B, x.shape[2], S, x.shape[4]), x.dtype)
        cache = KVCache(k=zeros(prompts.k), v=zeros(prompts.v),
                        mask=jnp.zeros((B, S), bool), end=jnp.zeros((B,), jnp.int32))
        ints = jnp.zeros((B,), jnp.int32)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, ints)  # placeholders: a row brings its own key
        slots = Slots(row_B=ints + rows, step_B=ints, last_B=ints, prompt_len_B=ints, budget_B=ints,
                      done_B=jnp.ones((B,), bool), keys_B=keys, cache=self._constrain(cache))
        N = S - prompts.mask_PT.shape[1]
        res = Results(tokens_BA=jnp.full((rows, N), self.pad_id, jnp.int32),
                      logprobs_BA=jnp.zeros((rows, N), jnp.float32), length_B=jnp.zeros((rows,), jnp.int32),
                      finished_B=jnp.zeros((rows,), bool))
        return slots, res

    def _insert_fn(self, slots: Slots, res: Results, prompts: Prompts, key, group_size, slot_J, row_J, budget_J):
        """Rows ``row_J`` enter slots ``slot_J`` (entries past the end are padding): their prompt's cache is
        copied in, and their first token drawn from the prompt's logits, as the static prefill does."""
        self.trace_counts["insert"] += 1
        p_J = jnp.minimum(row_J // group_size, prompts.logits_PV.shape[0] - 1)
        keys_J = jax.vmap(jax.random.fold_in, (None, 0))(key, row_J)
        token_J, logp_J = choose(prompts.logits_PV[p_J], step_keys(keys_J, 0), self.cfg)
        stop_J = stop_mask(token_J, self.cfg.stop_ids)
        c = slots.cache
        Tp, S = prompts.mask_PT.shape[1], c.length
        put = lambda x, u: x.at[slot_J].set(u, mode="drop")
        put_prompt = lambda x, u: x.at[:, slot_J, :, :Tp].set(u[:, p_J], mode="drop")
        # The slots past the prompt keep the last row's keys and values: masked out, and overwritten as
        # the new row writes them.
        mask_JS = jnp.zeros((slot_J.shape[0], S), bool).at[:, :Tp].set(prompts.mask_PT[p_J])
        cache = c.replace(k=put_prompt(c.k, prompts.k), v=put_prompt(c.v, prompts.v),
                          mask=put(c.mask, mask_JS), end=put(c.end, jnp.full_like(slot_J, Tp)))
        slots = Slots(row_B=put(slots.row_B, row_J), step_B=put(slots.step_B, jnp.ones_like(slot_J)),
                      last_B=put(slots.last_B, token_J), prompt_len_B=put(slots.prompt_len_B, prompts.length_P[p_J]),
                      budget_B=put(slots.budget_B, budget_J), done_B=put(slots.done_B, stop_J | (budget_J <= 1)),
                      keys_B=put(slots.keys_B, keys_J), cache=self._constrain(cache))
        at_row = lambda x, u: x.at[row_J].set(u, mode="drop")  # padding rows are ``rows``: dropped
        res = Results(tokens_BA=res.tokens_BA.at[row_J, 0].set(token_J, mode="drop"),
                      logprobs_BA=res.logprobs_BA.at[row_J, 0].set(logp_J, mode="drop"),
                      length_B=at_row(res.length_B, jnp.ones_like(row_J)), finished_B=at_row(res.finished_B, stop_J))
        return slots, res

    def _decode_fn(self, graphdef, state, slots: Slots, res: Results):
        """Up to ``compact_every`` steps for every slot; stops early when no slot is live or a live slot's
        next write would leave the window. Returns the slots and the results."""
        self.trace_counts["decode"] += 1
        cfg, K = self.cfg, self.compact_every
        model = nnx.merge(graphdef, state)
        rows = res.length_B.shape[0]
        window = slots.cache.span

        def cond(carry):
            i, s, _ = carry
            return (i < K) & ~jnp.all(s.done_B) & jnp.all(s.done_B | (s.cache.end < window))

        def body(carry):
            i, s, r = carry
            token_B, logp_B, cache = draw_next(model, s.last_B, s.prompt_len_B + s.step_B - 1, s.cache,
                                               step_keys(s.keys_B, s.step_B), cfg, self.mesh, self.rules)
            stop_B = stop_mask(token_B, cfg.stop_ids)
            row_B = jnp.where(s.done_B, rows, s.row_B)  # a free slot writes nowhere
            step_B = s.step_B + (~s.done_B).astype(jnp.int32)
            r = Results(tokens_BA=r.tokens_BA.at[row_B, s.step_B].set(token_B, mode="drop"),
                        logprobs_BA=r.logprobs_BA.at[row_B, s.step_B].set(logp_B, mode="drop"),
                        length_B=r.length_B.at[row_B].set(step_B, mode="drop"),
                        finished_B=r.finished_B.at[row_B].set(stop_B, mode="drop"))
            done_B = s.done_B | stop_B | (step_B >= jnp.minimum(s.budget_B, cfg.max_new_tokens))
            # A free slot's clock stays put, so it never runs past the cache.
            cache = cache.replace(end=jnp.where(s.done_B, s.cache.end, cache.end))
            s = s.replace(step_B=step_B, last_B=token_B, done_B=done_B, cache=cache)
            return i + 1, s, r

        _, slots, res = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), slots, res))
        return slots, res

    def _compact_fn(self, slots: Slots, order_J) -> Slots:
        """Slots ``order_J`` (``compaction_order``: no row leaves its chip) as a smaller batch."""
        self.trace_counts["compact"] += 1
        take = lambda x: jnp.take(x, order_J, axis=0)
        if self.mesh is None:
            cache = slots.cache.take_rows(order_J)
        else:
            # Each chip gathers its own rows from its own block (``order_J`` modulo the block), inside
            # shard_map: a global gather would be partitioned as the whole kept cache on every chip.
            specs = jax.tree.map(lambda s: s.spec, slots.cache.shardings(self.mesh, self.rules))
            local_J = order_J % (slots.row_B.shape[0] // self.multiple)
            gather = jax.shard_map(_copy_rows, mesh=self.mesh, check_vma=False,
                                   in_specs=(specs, PartitionSpec(*specs.end)), out_specs=specs)
            cache = self._constrain(gather(slots.cache, local_J))
        return Slots(row_B=take(slots.row_B), step_B=take(slots.step_B), last_B=take(slots.last_B),
                     prompt_len_B=take(slots.prompt_len_B), budget_B=take(slots.budget_B),
                     done_B=take(slots.done_B), keys_B=take(slots.keys_B), cache=cache)

    def _constrain(self, cache: KVCache) -> KVCache:
        if self.mesh is None:
            return cache
        return jax.tree.map(jax.lax.with_sharding_constraint, cache, cache.shardings(self.mesh, self.rules))


def _copy_rows(cache: KVCache, idx_J) -> KVCache:
    """``cache.take_rows(idx_J)`` for in-range indices, keys and values copied one row at a time. Their
    gather, one [L, 1, K, S, H] slab per index, the TPU compiler splits into a loop per 128 cache slots
    (72 loops for k and 72 for v at S = 9216: 10 CPU s of compile each, and a 4.6 GiB temporary, on the
    1.5B), where this loop of dynamic slices compiles in under a second and needs no temporary."""
    axis = CACHE_AXES.index("batch")

    def copy(x):
        out = jnp.zeros(x.shape[:axis] + idx_J.shape + x.shape[axis + 1:], x.dtype)
        body = lambda n, o: jax.lax.dynamic_update_slice_in_dim(
            o, jax.lax.dynamic_slice_in_dim(x, idx_J[n], 1, axis), n, axis)
        return jax.lax.fori_loop(0, idx_J.shape[0], body, out)

    return cache.replace(k=copy(cache.k), v=copy(cache.v), mask=jnp.take(cache.mask, idx_J, axis=0),
                         end=jnp.take(cache.end, idx_J, axis=0))
