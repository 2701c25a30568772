"""The KV cache: a plain pytree that goes into a forward pass and comes out updated.

Rows of a batch share one slot clock: slot ``j`` of every row was written at the same step, so a write
is one ``dynamic_update_slice`` at ``end`` and causality is ``key slot <= query slot``. The
continuous-batching engine gives each row its own clock instead (``end`` of shape [B]): rows that
entered the batch at different steps write at their own slot, and causality is read per row. Prompts are
left-padded (all prompts end at the same slot); ``mask`` marks the slots holding real tokens, so padding
is never attended to. RoPE positions are separate (the count of real tokens before a token), which is
what makes left padding exact.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from realjax.sharding import named

# [B, K, S, H]: each kv head's keys are one contiguous [S, H] matrix, the layout the attention dot reads.
# XLA cannot relayout a jitted program's arguments, so with [B, S, K, H] the TPU compiler copied the
# whole cache into that layout on entry to the decode loop and back on exit (temp = the cache's size).
CACHE_AXES = ("batch", "kv_heads", "cache_length", "head_dim")


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # L x [B, K, S, H]
    v: tuple[jax.Array, ...]  # L x [B, K, S, H]
    mask: jax.Array  # [B, S] bool: the slot holds a real (non-padding) token
    end: jax.Array  # int32 [] (one clock) or [B] (a clock per row): slots [0, end) have been written
    # Static: attention reads slots [0, window) only (0 = the whole cache). Every write must land below
    # it; the sampler raises it in steps as the rows grow, so early tokens don't stream the empty tail.
    window: int = flax.struct.field(pytree_node=False, default=0)

    @classmethod
    def zeros(cls, cfg, batch: int, length: int, dtype=None) -> "KVCache":
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        layers = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k=layers, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   mask=jnp.zeros((batch, length), bool), end=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def span(self) -> int:
        """How many slots attention reads: ``window``, or the whole cache when it is 0."""
        return self.window or self.length

    def repeat_rows(self, n: int) -> "KVCache":
        """Each row repeated ``n`` times in place (``[a, b] -> [a, a, b, b]``): one prefilled prompt feeds
        the n rollouts of its group."""
        rep = lambda x: jnp.repeat(x, n, axis=0)
        return self.replace(k=tuple(map(rep, self.k)), v=tuple(map(rep, self.v)), mask=rep(self.mask))

    def take_rows(self, idx_J) -> "KVCache":
        """Rows ``idx_J`` (a gather): the engine moves its live rows into a smaller batch."""
        take = lambda x: jnp.take(x, idx_J, axis=0)
        end = self.end if self.end.ndim == 0 else take(self.end)
        return self.replace(k=tuple(map(take, self.k)), v=tuple(map(take, self.v)), mask=take(self.mask), end=end)

    def shardings(self, mesh, rules) -> "KVCache":
        """NamedShardings for every leaf, from the logical axes (``CACHE_AXES``) and the rules table."""
        kv = lambda x: named(CACHE_AXES, x.shape, mesh, rules)
        return self.replace(k=tuple(map(kv, self.k)), v=tuple(map(kv, self.v)),
                            mask=named(("batch", "cache_length"), self.mask.shape, mesh, rules),
                            end=named(("batch",)[:self.end.ndim], self.end.shape, mesh, rules))


def write_at(buf, update, end, axis: int):
    """``update`` written into ``buf`` at offset ``end`` along ``axis``: one offset for all rows (int []), or
    one per row (int [B]; a vmapped slice update, which XLA lowers to an in-place scatter)."""
    if jnp.ndim(end) == 0:
        return jax.lax.dynamic_update_slice(buf, update, tuple(end if a == axis else 0 for a in range(buf.ndim)))

    def row(b, u, e):
        return jax.lax.dynamic_update_slice(b, u, tuple(e if a == axis - 1 else 0 for a in range(b.ndim)))

    return jax.vmap(row)(buf, update, end)
