"""The engine's cache moves as ``realjax compile`` compiles them: its compaction and insert programs.

Training's rollouts run on ``realjax.sampling.Engine``, whose decode is the sampler's (compiled and
priced by ``realjax.tools.aot.compile``), but which also runs two programs of its own between chunks:
``_compact`` (gather the kept slots into a smaller bucket) and ``_insert`` (copy queued rows' prompt
caches into free slots). They must fit too. Their memory grows with the rows they move, so the largest
of each that the priced schedule runs is compiled (``rollout_under_lengths``' ``largest_compaction`` and
``largest_insert``), with the shapes and shardings the engine gives them on the run's mesh. Their time is
priced as HBM traffic in ``realjax.tools.aot.lengths``.

Why the compile matters: the batch axis of the cache is split over the data-parallel chips and a gather
along it with indices known only at run time is partitioned by XLA as "every chip gathers what it holds
into the whole result, then all-reduce": each chip materialises the kept batch's whole cache, not its
share, which for the paper configs exceeds a chip's HBM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from realjax import sharding as shd
from realjax.models.kv_cache import CACHE_AXES, KVCache
from realjax.sampling.engine import Engine, Prompts, Results, Slots


def _sds(shape, dtype, axes, mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=shd.named(axes, shape, mesh, shd.ROLLOUT_RULES))


def _slots(mcfg, mesh, B: int, S: int) -> Slots:
    """The engine's decode batch of ``B`` slots of ``S`` cache slots, abstract, sharded as ``_empty`` makes it."""
    cache = jax.eval_shape(lambda: KVCache.zeros(mcfg, B, S).replace(end=jnp.zeros((B,), jnp.int32)))
    cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache,
                         cache.shardings(mesh, shd.ROLLOUT_RULES))
    ints = _sds((B,), jnp.int32, ("batch",), mesh)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), B))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=ints.sharding)
    return Slots(row_B=ints, step_B=ints, last_B=ints, prompt_len_B=ints, budget_B=ints,
                 done_B=_sds((B,), jnp.bool_, ("batch",), mesh), keys_B=keys, cache=cache)


def engine_move_lowerings(sampling, mcfg, mesh, *, prompts: int, group: int, prompt: int, slots: int,
                          compact_every: int, compaction: tuple[int, int], insert: tuple[int, int]) -> list:
    """``[(name, shape, lower)]`` for the engine's compaction ``compaction`` = (from bucket, to bucket)
    and its insert ``insert`` = (bucket, rows entering) (0 buckets: none), for one call of ``prompts`` x
    ``group`` rows with ``prompt`` prompt tokens; ``lower(graphdef)`` lowers it (the graphdef unused: the
    moves run no model)."""
    N = sampling.max_new_tokens
    S, rows = prompt + N, prompts * group
    engine = Engine(sampling, pad_id=sampling.stop_ids[0], slots=slots, compact_every=compact_every, mesh=mesh,
                    rules=shd.ROLLOUT_RULES)
    out = []
    if compaction[0]:
        b, kept = compaction
        order = np.arange(kept, dtype=np.int32)  # which slots does not change the program, only how many
        out.append(("engine_compact", f"{b} -> {kept} slots, cache {S}",
                    lambda g, s=_slots(mcfg, mesh, b, S): engine._compact.lower(s, order)))
    if insert[0]:
        b, n = insert
        cache = jax.eval_shape(lambda: KVCache.zeros(mcfg, prompts, prompt))
        # The prefill's outputs, batch-sharded as the prefill's constraints leave them.
        kv = _sds(cache.k.shape, cache.k.dtype, CACHE_AXES, mesh)
        logits = jax.ShapeDtypeStruct((prompts, mcfg.vocab_size), jnp.float32, sharding=shd.batch_sharding(
            mesh, (prompts, mcfg.vocab_size), shd.ROLLOUT_RULES))
        pre = Prompts(k=kv, v=kv, mask_PT=_sds((prompts, prompt), jnp.bool_, ("batch", "length"), mesh),
                      logits_PV=logits, length_P=_sds((prompts,), jnp.int32, ("batch",), mesh))
        rep = NamedSharding(mesh, PartitionSpec())
        res = Results(tokens_BA=jax.ShapeDtypeStruct((rows, N), jnp.int32, sharding=rep),
                      logprobs_BA=jax.ShapeDtypeStruct((rows, N), jnp.float32, sharding=rep),
                      length_B=jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rep),
                      finished_B=jax.ShapeDtypeStruct((rows,), jnp.bool_, sharding=rep))
        key = jax.eval_shape(lambda: jax.random.key(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
        slot_J = np.full(b, b, np.int32)  # the slot list is padded to the bucket, as the engine pads it
        slot_J[:n] = np.arange(n)
        row_J = np.minimum(np.arange(b), rows).astype(np.int32)
        out.append(("engine_insert", f"{n} rows into {b} slots, prompts {prompts} x {prompt}",
                    lambda g, s=_slots(mcfg, mesh, b, S): engine._insert.lower(
                        s, res, pre, key, group, slot_J, row_J, np.full(b, N, np.int32))))
    return out
