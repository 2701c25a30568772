"""LoRA policies: low-rank adapters inside the projection modules, frozen base weights, merged rollouts.

An adapted projection ``W`` (any einsum weight ``[in..., out...]``: ``q`` is ``DNH``, ``o`` is ``NHD``)
gets a pair ``A [in..., r]`` and ``B [r, out...]`` (r: the adapter rank) in a :class:`LoraPair` that sits
beside it in the same module, named ``<projection>_lora``: the learner computes
``x W + scale (x A) B`` with ``scale = alpha / r``. ``B`` starts at zero, so at initialisation the
policy is the base model exactly; ``A`` is drawn with standard deviation ``1 / sqrt(fan_in)``.

Because the pair lives inside the module that owns the projection, whatever stacks the modules (a
scanned layer stack gives every weight a leading layer axis) stacks the adapters the same way. Nothing
here counts layers: adapters are found by their type (:class:`LoraParam`) and by their name next to the
weight they adapt, and the merge works on any leading axes (see :func:`merge_adapters`).

A policy's state splits in two (:func:`split_policy`): the adapters (trainable: the only leaves the
optimizer sees) and the base (frozen, optionally stored in another dtype). Rollouts read the merged
weights ``W + scale A B`` of the plain model, built once per RL step, so decoding costs what it costs
without LoRA; the base alone is the reference policy of a KL term, so no reference copy is kept.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import math
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from realjax.models.config import LoraConfig
from realjax.scoped import scoped

SUFFIX = "_lora"  # a projection ``q`` is adapted by the LoraPair ``q_lora`` beside it


class LoraParam(nnx.Param):
    """An adapter weight: with LoRA, the only parameters that train (the optimizer's state mirrors them)."""


# (key, counter) while ``dropout_rng`` is active: each adapter call draws its mask from the next fold.
_DROPOUT = contextvars.ContextVar("realjax_lora_dropout", default=None)


def dropout_rng(key):
    """Enable adapter dropout for the forward passes traced inside (the learner's); ``key=None`` keeps it
    off. Adapter calls take folds of ``key`` in trace order (layer by layer, projection by projection)."""
    return scoped(_DROPOUT, None if key is None else (key, itertools.count()))


@functools.lru_cache(maxsize=None)
def _a_init(fan_in: int):
    # One initializer object per fan-in: the model's jitted initializers are cached by it.
    return nnx.initializers.normal(1.0 / math.sqrt(fan_in))


class LoraPair(nnx.Module):
    """``delta(x) = scale * (dropout(x) A) B`` for one projection; ``spec`` names its axes, e.g. ``"D->NH"``."""

    def __init__(self, weight: nnx.Param, spec: str, cfg: LoraConfig, *, make, rngs: nnx.Rngs, param_dtype):
        ins, outs = spec.split("->")
        shape, axes = weight.get_value().shape, weight.get_metadata().get("axes")
        if axes and axes[0] == "layers":  # a scanned stack's weight: ``make`` adds the layer axis again
            shape, axes = shape[1:], axes[1:]
        n = len(ins)
        self.ins, self.outs, self.scale, self.dropout = ins, outs, cfg.scale, cfg.dropout
        fan_in = math.prod(shape[:n])
        # The rank axis is never sharded (r is small); the other axes shard like the weight's.
        self.a = make(rngs, (*shape[:n], cfg.rank), param_dtype, (*axes[:n], None), _a_init(fan_in), kind=LoraParam)
        self.b = make(rngs, (cfg.rank, *shape[n:]), param_dtype, (None, *axes[n:]), nnx.initializers.zeros,
                      kind=LoraParam)

    def __call__(self, x, dtype):
        active = _DROPOUT.get()
        if active is not None and self.dropout > 0:
            key, counter = active
            keep = jax.random.bernoulli(jax.random.fold_in(key, next(counter)), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        i, o = self.ins, self.outs
        xa = jnp.einsum(f"BT{i},{i}r->BTr", x, self.a[...].astype(dtype))
        return jnp.einsum(f"BTr,r{o}->BT{o}", xa, (self.scale * self.b[...]).astype(dtype))


def attach(module: nnx.Module, cfg: LoraConfig | None, specs: dict[str, str], *, make, rngs: nnx.Rngs,
           param_dtype) -> None:
    """Give ``module`` a ``<name>_lora`` pair for each of its projections named in ``cfg.targets``.

    ``specs`` maps the module's projection attributes to their axes (``{"q": "D->NH"}``); ``make`` builds a
    weight as the model does (``(rngs, shape, dtype, axes, init, kind=...)``, placed in its shards).
    """
    if cfg is None:
        return
    for name, spec in specs.items():
        if name in cfg.targets:
            setattr(module, name + SUFFIX, LoraPair(getattr(module, name), spec, cfg, make=make, rngs=rngs,
                                                    param_dtype=param_dtype))


def adapt(module: nnx.Module, name: str, x, y, dtype):
    """``y`` (the output of ``module``'s projection ``name`` on ``x``) plus its adapter's, if it has one."""
    pair = getattr(module, name + SUFFIX, None)
    return y if pair is None else y + pair(x, dtype)


# ----------------------------------------------------------------------------------------------------
# The policy's state: adapters (trainable) and base (frozen)
# ----------------------------------------------------------------------------------------------------
def cast_state(state, dtype):
    """Floating leaves of a (concrete or abstract) state in ``dtype``."""
    dt = jnp.dtype(dtype)

    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dt:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding)
        return x.astype(dt)

    return jax.tree.map(one, state)


def split_policy(state, lora: LoraConfig | None):
    """``(trainable, frozen)`` of a model's state: ``(state, None)`` without LoRA, else the adapters and the
    base weights (cast to ``lora.base_dtype`` when set). ``nnx.merge(graphdef, trainable, frozen)`` rebuilds."""
    if lora is None:
        return state, None
    adapters, base = nnx.split_state(state, LoraParam, ...)
    return adapters, cast_state(base, lora.base_dtype) if lora.base_dtype else base


def merge_policy(graphdef, params, frozen=None):
    """The module of ``(graphdef, trainable, frozen)`` (``frozen`` None: ``params`` is the whole state)."""
    return nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)


def _delta(a, b, w_ndim: int):
    """``A B`` as ``[lead..., in..., out...]`` for ``A [lead..., in..., r]`` and ``B [lead..., r, out...]``:
    the leading axes (a stacked layer axis) are read off the three ranks, so any stacking works."""
    lead = a.ndim + b.ndim - 2 - w_ndim
    lead_shape, ins, outs = a.shape[:lead], a.shape[lead:-1], b.shape[lead + 1:]
    a2 = a.reshape(*lead_shape, math.prod(ins), a.shape[-1]).astype(jnp.float32)
    b2 = b.reshape(*lead_shape, b.shape[lead], math.prod(outs)).astype(jnp.float32)
    d = jnp.einsum("...ir,...ro->...io", a2, b2, precision=jax.lax.Precision.HIGHEST)
    return d.reshape(*lead_shape, *ins, *outs)


def merge_adapters(base, adapters, scale: float, dtype=None):
    """The plain model's state: each adapted weight becomes ``W + scale A B`` (in fp32, then ``dtype``,
    default the weight's). ``base`` and ``adapters`` are the halves of :func:`split_policy`."""
    pairs = {}
    for path, var in nnx.to_flat_state(adapters):
        pairs.setdefault(path[:-1], {})[path[-1]] = _value(var)
    out = []
    for path, var in nnx.to_flat_state(base):
        pair = pairs.get(path[:-1] + (str(path[-1]) + SUFFIX,))
        value = new = _value(var)
        if pair is not None:
            merged = value.astype(jnp.float32) + scale * _delta(pair["a"], pair["b"], value.ndim)
            new = merged.astype(dtype or value.dtype)
        elif dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
            new = value.astype(dtype)
        out.append((path, var.replace(new) if isinstance(var, nnx.Variable) else new))
    return nnx.from_flat_state(out)


def _value(leaf):
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


_INPUT_AXES = ("embed", "heads", "head_dim", "mlp")  # what A contracts; a stacking axis is none of these


def initial_adapter(path: tuple, var: nnx.Variable, seed: int, sharding=None):
    """A fresh value for the adapter leaf ``var`` at ``path`` (``A`` random, ``B`` zero), for models whose
    base weights come from a checkpoint; the draw depends on the seed and the path only."""
    shape, dtype = var.get_value().shape, var.get_value().dtype
    if path[-1] == "b":
        init = nnx.initializers.zeros
    else:
        axes = var.get_metadata().get("axes") or (None,) * len(shape)
        init = _a_init(math.prod(n for n, ax in zip(shape, axes) if ax in _INPUT_AXES))
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(repr(path).encode()) % 2 ** 31)
    return jax.jit(lambda k: init(k, shape, dtype), out_shardings=sharding)(key)
