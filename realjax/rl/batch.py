"""The learner's typed pytrees: the update batch and the train state.

Axis letters (``realjax/__init__.py``): B rows, Q prompt tokens, A response tokens, M micro-batches (or
scoring chunks) stacked in front of B when a batch is cut for the learner.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from realjax.rl.packing import Packing


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UpdateBatch:
    """Scored rollouts as the learner reads them, rows prompt-major in whole groups.

    A row is ``[prompt (left-padded, Q) | response (A)]``. ``row_mask_B`` is 1.0 for rows that take part
    in the loss and 0.0 for rows dropped whole (DAPO's overlong filter drops truncated responses).
    ``old_logp_BA`` holds the log-probs the loss uses as the old policy (the sampler's, or a recomputation);
    ``ref_logp_BA`` is set only for objectives with a reference-KL term; ``sampler_logp_BA`` (what the
    sampler reported, the behaviour policy) only with a mismatch correction (``rollout.is_correction``),
    beside the recomputed ``old_logp_BA``. ``packing`` (``realjax.rl.packing``) runs the rows packed end to
    end; it indexes the rows of one cut, so it is set after :meth:`cut`.
    """

    prompt_ids_BQ: Any  # int32
    prompt_mask_BQ: Any  # int32
    tokens_BA: Any  # int32
    resp_mask_BA: Any  # float32: response tokens, the stop token included
    row_mask_B: Any  # float32
    old_logp_BA: Any  # float32
    rewards_B: Any  # float32
    ref_logp_BA: Any = None  # float32 or None
    sampler_logp_BA: Any = None  # float32 or None
    packing: Any = None  # realjax.rl.packing.Packing of the rows (set after the cut), or None: padded rows

    @property
    def rows(self) -> int:
        return self.rewards_B.shape[-1]

    def rows_slice(self, start: int, stop: int) -> "UpdateBatch":
        """Rows [start, stop) of a host batch."""
        return jax.tree.map(lambda x: x[start:stop], self)

    def cut(self, parts: int) -> "UpdateBatch":
        """[B, ...] -> [parts, B / parts, ...] (host arrays; each part is whole groups when B / parts is)."""
        if self.rows % parts:
            raise ValueError(f"{self.rows} rows do not cut into {parts} equal parts")
        return jax.tree.map(lambda x: np.asarray(x).reshape(parts, -1, *np.shape(x)[1:]), self)

    def replace(self, **fields) -> "UpdateBatch":
        return dataclasses.replace(self, **fields)

    @classmethod
    def spec(cls, lead: tuple[int, ...], prompt_len: int, response_len: int, *, with_ref: bool,
             sharding=None, with_sampler: bool = False, packed_sequences: int = 0,
             packed_length: int = 0) -> "UpdateBatch":
        """The abstract batch (``jax.ShapeDtypeStruct`` leaves) with leading dims ``lead``; ``sharding``
        maps a shape to the leaf's sharding (AOT compiles); ``packed_sequences``: the rows packed into that
        many sequences of ``packed_length`` tokens (default ``prompt_len + response_len - 1``; 0: padded)."""
        def leaf(tail, dtype):
            shape = tuple(lead) + tail
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding(shape) if sharding else None)

        zc = (packed_sequences, packed_length or prompt_len + response_len - 1)

        def packed_leaf(zc):  # [lead[:-1], Z, C]: the sequences take the rows' place (and sharding)
            shape = tuple(lead[:-1]) + zc
            return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding(shape) if sharding else None)

        q, a = (prompt_len,), (response_len,)
        return cls(prompt_ids_BQ=leaf(q, jnp.int32), prompt_mask_BQ=leaf(q, jnp.int32), tokens_BA=leaf(a, jnp.int32),
                   resp_mask_BA=leaf(a, jnp.float32), row_mask_B=leaf((), jnp.float32),
                   old_logp_BA=leaf(a, jnp.float32), rewards_B=leaf((), jnp.float32),
                   ref_logp_BA=leaf(a, jnp.float32) if with_ref else None,
                   sampler_logp_BA=leaf(a, jnp.float32) if with_sampler else None,
                   packing=None if not packed_sequences else Packing(*(
                       packed_leaf(zc) for _ in range(3)),
                       dst_BA=leaf(a, jnp.int32)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What the learner carries from update to update: the trained weights, the optimizer state and, for
    objectives with a reference-KL term, the frozen reference weights (None otherwise). A LoRA policy
    trains its adapters only: ``params`` holds them, ``frozen`` the base weights (which are also its
    reference policy); without LoRA ``frozen`` is None."""

    params: Any
    opt_state: Any
    ref_params: Any = None
    frozen: Any = None

    def replace(self, **fields) -> "TrainState":
        return dataclasses.replace(self, **fields)
