"""Checkpoints across the decoder blocks' two layouts: a list of blocks (``model.scan_layers=false``, and every
checkpoint written before scanned layers) and one stacked module (every block weight ``[L, ...]``).

The list layout keeps block ``i``'s weights under ``layers/<i>/...``; the stacked one keeps all blocks'
under ``layers/...`` with a leading layer axis. Adam's moments (and any optimizer state that mirrors the
parameters) follow the same paths below their own prefix, so one rule covers parameters and optimizer
state alike. A restore reads the checkpoint's own tree (orbax's metadata) and, when it is the other layout
of the target, reads the saved arrays in their layout, each laid out like the target's block weight, then
stacks or unstacks them into the target's layout and sharding. The numbers are the saved ones, exactly.
A saved tree that is neither the target's nor its other layout raises :class:`LayoutMismatch`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

LAYERS = "layers"  # the decoder's blocks (``realjax.models.transformer.Transformer.layers``)


class LayoutMismatch(ValueError):
    """The checkpoint's tree is neither the target's nor the target with its blocks in the other layout
    (``saved_arrays``: how many arrays the checkpoint's record names; 0 for an empty or damaged record)."""

    def __init__(self, message: str, saved_arrays: int):
        super().__init__(message)
        self.saved_arrays = saved_arrays


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_paths(tree) -> dict[tuple[str, ...], Any]:
    """{path (each key as a string): leaf} of a pytree (an nnx.State, a dict, orbax's metadata tree)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(_key(k) for k in path): leaf for path, leaf in flat}


def _is_block_list(node) -> bool:
    return isinstance(node, Mapping) and len(node) > 0 and all(str(k).isdigit() for k in node)


def _map_layers(tree, fn):
    """``tree`` with every ``layers`` subtree (at any depth of nested mappings, optimizer states' tuples
    included) replaced by ``fn(subtree)``."""
    if isinstance(tree, Mapping):
        items = {k: (fn(v) if str(k) == LAYERS else _map_layers(v, fn)) for k, v in tree.items()}
        return _rebuild(tree, items)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # optax's NamedTuple states
        return type(tree)(*(_map_layers(v, fn) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_layers(v, fn) for v in tree)
    return tree


def _rebuild(like, items: dict):
    """A mapping of ``like``'s type (an nnx.State or a dict) holding ``items``."""
    try:
        return type(like)(items)
    except TypeError:
        return dict(items)


def _spec(sharding, ndim: int) -> tuple:
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _one_block(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """A stacked weight's abstract [L, ...] -> one block's [...] (the layer axis dropped from its sharding)."""
    sh = x.sharding
    if isinstance(sh, NamedSharding):
        sh = NamedSharding(sh.mesh, PartitionSpec(*_spec(sh, len(x.shape))[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sh)


def _stacked(xs: tuple[jax.ShapeDtypeStruct, ...]) -> jax.ShapeDtypeStruct:
    """L blocks' abstract [...] -> the stacked [L, ...] (the layer axis replicated, as the stacked model's)."""
    x, sh = xs[0], xs[0].sharding
    if isinstance(sh, NamedSharding):
        sh = NamedSharding(sh.mesh, PartitionSpec(None, *_spec(sh, len(x.shape))))
    return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=sh)


def _blocks_of(node) -> list:
    return [node[k] for k in sorted(node, key=lambda k: int(k))]


def other_layout(abstract):
    """The abstract tree in the blocks' other layout: stacked ``layers`` -> a list of L blocks, or back."""
    def swap(node):
        if _is_block_list(node):
            blocks = _blocks_of(node)
            return jax.tree.map(lambda *xs: _stacked(xs), *blocks)
        layers = jax.tree.leaves(node)[0].shape[0]
        return _rebuild(node, {i: jax.tree.map(_one_block, node) for i in range(layers)})

    return _map_layers(abstract, swap)


def saved_layout(saved_tree, abstract):
    """The tree to read the checkpoint into: ``abstract`` when the saved paths are its own, else its other
    layout when they are those (with the saved shapes), else :class:`LayoutMismatch`."""
    saved = {p: tuple(getattr(m, "shape", ()) or ()) for p, m in leaf_paths(saved_tree).items()}
    mine = {p: tuple(x.shape) for p, x in leaf_paths(abstract).items()}
    if saved == mine:
        return abstract
    other = other_layout(abstract)
    if {p: tuple(x.shape) for p, x in leaf_paths(other).items()} == saved:
        return other
    missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    example = ("/".join(missing[0]) + " not saved" if missing else
               "/".join(extra[0]) + " saved but not in the model" if extra else
               "same names, other shapes: " + ", ".join(
                   f"{'/'.join(p)} {saved[p]} vs {mine[p]}" for p in sorted(mine) if saved[p] != mine[p])[:200])
    raise LayoutMismatch(f"the checkpoint's tree ({len(saved)} arrays) is neither the model's ({len(mine)}) nor the "
                         f"model's with its blocks {'unstacked' if _has_stack(abstract) else 'stacked'}: {example}",
                         len(saved))


def _has_stack(abstract) -> bool:
    found = []
    _map_layers(abstract, lambda node: found.append(not _is_block_list(node)) or node)
    return any(found)


@functools.lru_cache(maxsize=None)
def _stacker(sharding):
    # one program per (sharding, shapes): the blocks' weights and Adam's two moments share them
    return jax.jit(lambda *blocks: jnp.stack(blocks), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _unstacker(sharding, layers: int):
    return jax.jit(lambda x: tuple(x[i] for i in range(layers)), out_shardings=(sharding,) * layers)


def to_layout(restored, abstract):
    """``restored`` (read in :func:`saved_layout`'s tree, and consumed: its converted arrays are deleted)
    in the layout, pytree types and shardings of ``abstract``, one weight at a time, so about one weight
    is held twice at once. Built by path, then unflattened in ``abstract``'s structure: an nnx.State keeps
    its inner mappings as plain dicts, which a rebuilt tree would not."""
    saved, split = leaf_paths(restored), {}

    def value(path, t):
        if path in saved:  # not a block weight
            return saved[path]
        j = path.index(LAYERS)
        if path[j + 1].isdigit():  # stacked -> list: row i of the stacked weight
            source = path[:j + 1] + path[j + 2:]
            if source not in split:
                split[source] = _unstacker(t.sharding, saved[source].shape[0])(saved[source])
                saved[source].delete()
            return split[source][int(path[j + 1])]
        blocks = [saved[path[:j + 1] + (str(i),) + path[j + 1:]] for i in range(t.shape[0])]  # list -> stacked
        stacked = _stacker(t.sharding)(*blocks)
        for x in blocks:
            x.delete()
        return stacked

    target = leaf_paths(abstract)
    return jax.tree.unflatten(jax.tree.structure(abstract), [value(p, t) for p, t in target.items()])
