"""Exact sums for the learner: a mean kept as (total, weight), and an objective's terms before its one
division. Adding parts and dividing once is what makes micro-batching exact (``realjax.rl.update``)."""

from __future__ import annotations

import dataclasses
import operator

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mean:
    """A mean kept as ``total / weight`` so that adding parts and dividing once is exact (a weighted
    metric): the mean of a mini-batch is never a mean of micro-batch means."""

    total: jax.Array
    weight: jax.Array

    def __add__(self, other: "Mean") -> "Mean":
        return Mean(self.total + other.total, self.weight + other.weight)

    @property
    def value(self) -> jax.Array:
        return self.total / jnp.where(self.weight > 0, self.weight, 1.0)  # an empty mean is 0, not NaN


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossTerms:
    """An objective before its one division: ``loss = loss_sum.total / loss_sum.weight``.

    ``means``: metrics as :class:`Mean`; ``counts``: metrics that add up (valid groups, thresholds).
    """

    loss_sum: Mean
    means: dict[str, Mean]
    counts: dict[str, jax.Array]

    def __add__(self, other: "LossTerms") -> "LossTerms":
        return jax.tree.map(operator.add, self, other)

    def finish(self) -> tuple[jax.Array, Metrics]:
        return self.loss_sum.value, {**{k: m.value for k, m in self.means.items()}, **self.counts}
