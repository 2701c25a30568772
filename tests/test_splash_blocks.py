"""Segment-aware splash block tables (``realjax.models.splash_blocks``): the tiles they compute against the
pairs the segment rule makes visible (brute force, numpy), against the static causal kernel's tables, and
the kernel with them against XLA's attention and the static kernel (Pallas interpret mode)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realjax.models import splash_blocks as sb
from realjax.models.attention import _splash_kernel, splash_attention, xla_attention

T, BLOCK = 512, 128


def _layouts():
    """[5, T] segment ids: packed rows crossing tile edges with tail padding; one row; a left- and
    right-padded row (padding id 0 at both ends); one row per tile; packed rows whose padding slots are
    each a segment of their own (``realjax.rl.packing.pack``), two whole tiles of it."""
    own_pad = np.concatenate([np.repeat([1, 2], [90, 140]), -1 - np.arange(T - 230)])
    return np.stack([np.repeat([1, 2, 3, 0], [100, 200, 150, 62]), np.ones(T, int),
                     np.repeat([0, 1, 0], [130, 300, 82]), np.repeat([1, 2, 3, 4], BLOCK), own_pad]).astype(np.int32)


def _visible_tiles(seg_T, block, real_queries=False):
    """[Q, K] bool: tiles holding a pair the segment rule makes visible (key <= query, same segment), of a
    real (non-padding) query only if ``real_queries``."""
    n = len(seg_T)
    vis = (np.arange(n)[None, :] <= np.arange(n)[:, None]) & (seg_T[:, None] == seg_T[None, :])
    vis &= (seg_T[:, None] > 0) | (not real_queries)
    Q = n // block
    return vis.reshape(Q, block, Q, block).any(axis=(1, 3))


@jax.jit(static_argnums=1)
def _device_tables(seg_T, block):
    return sb.tables(*sb.block_bounds(seg_T, seg_T, block), jnp.int32)


def _tables(seg_T, block=BLOCK):
    return [tuple(np.asarray(a)[0] for a in t) for t in _device_tables(jnp.asarray(seg_T), block)]


@pytest.mark.parametrize("row", range(5))
def test_tables_compute_every_visible_tile_and_contiguous_rows_only_those(row):
    seg = _layouts()[row]
    (fwd_next, fwd_mask), (dkv_next, dkv_mask) = _tables(seg)
    want = _visible_tiles(seg, BLOCK)
    for mask in (fwd_mask, dkv_mask):
        assert (mask > 0)[want].all()  # never skips a visible pair
        if row != 2:  # contiguous segments: exactly the visible tiles
            np.testing.assert_array_equal(mask > 0, want)
        np.testing.assert_array_equal(mask[mask > 0], np.where(np.eye(len(mask), dtype=bool), 1, 2)[mask > 0])
    # a skipped tile loads a block the kernel loads anyway: the next computed one in grid order
    Q = len(fwd_mask)
    order = [(i, j) for i in range(Q) for j in range(Q)]
    run = [(i, j) for i, j in order if fwd_mask[i, j]]
    for i, j in order:
        if not fwd_mask[i, j]:
            nxt = next(((a, b) for a, b in run if (a, b) > (i, j)), run[0])
            assert fwd_next[i, j] == nxt[1]
        else:
            assert fwd_next[i, j] == j
    for i, j in order:  # dkv: [q block, kv block], q blocks innermost
        assert dkv_next[i, j] == (i if dkv_mask[i, j] else j)  # a skipped tile: this head's, or the next's, first


def test_one_segment_gives_the_static_causal_tables():
    kernel = _splash_kernel(T, 2, BLOCK, True)
    (fwd_next, fwd_mask), (dkv_next, dkv_mask) = _tables(np.ones(T, np.int32))
    for info, (nxt, mask, name) in ((kernel.fwd_mask_info, (fwd_next, fwd_mask, "fwd")),
                                    (kernel.dq_mask_info, (fwd_next, fwd_mask, "dq")),
                                    (kernel.dkv_mask_info, (dkv_next, dkv_mask, "dkv"))):
        static_next, static_mask = np.asarray(info.data_next)[0], np.asarray(info.block_mask)[0]
        np.testing.assert_array_equal(mask, static_mask, err_msg=name)
        run = static_mask > 0  # the static dkv table loads q block 0 on skipped tiles; ours the next one run
        np.testing.assert_array_equal(nxt[run], static_next[run], err_msg=name)
        if name != "dkv":
            np.testing.assert_array_equal(nxt, static_next, err_msg=name)
    built = sb.segment_kernel(kernel, jnp.ones(T, jnp.int32), jnp.ones(T, jnp.int32), BLOCK)
    assert built.fwd_mask_info.data_next.dtype == kernel.fwd_mask_info.data_next.dtype
    assert built.kwargs == kernel.kwargs


def test_packed_blocks_counts_the_tiles_the_kernel_computes():
    """The cost model's count (numpy, from row lengths in layout order) is the tables' count, rows alone
    and with the tail padding (each slot its own segment, as ``realjax.rl.packing.pack`` lays it; splash's
    own tile padding in segment 0), on random packings (sequence lengths off the tile grid included)."""
    rng = np.random.default_rng(0)
    for n in (512, 509, 300):
        for _ in range(20):
            lengths = []
            while True:
                r = int(rng.integers(1, n // 2))
                if sum(lengths) + r > n:
                    break
                lengths.append(r)
            block, Tp = sb.tile(n, BLOCK)
            seg = np.zeros(Tp, np.int32)
            seg[:n] = -1 - np.arange(n)
            seg[:sum(lengths)] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
            (_, mask), (_, dkv_mask) = _tables(seg, block)
            rows_only = _visible_tiles(seg, block, real_queries=True)
            got = sb.packed_blocks(np.array(lengths), n, BLOCK)
            assert got == (int(rows_only.sum()), int((mask > 0).sum())) == (got[0], int((dkv_mask > 0).sum()))


def _qkv(B, N=2, K=1, H=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, T, K, H)),
            jax.random.normal(ks[2], (B, T, K, H)))


def test_kernel_with_segment_tables_matches_xla():
    seg = jnp.asarray(_layouts())
    q, k, v = _qkv(5)
    out = jax.jit(lambda q, k, v: splash_attention(q, k, v, (seg, seg), interpret=True, block=BLOCK))(q, k, v)
    ref = xla_attention(q, k, v, segment_ids=(seg, seg))
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.slow
def test_kernel_with_segment_tables_outputs_and_gradients_match_xla_and_the_static_kernel():
    seg = jnp.asarray(_layouts())
    q, k, v = _qkv(5, N=4, K=2, seed=1)
    w = jnp.asarray(np.asarray(seg) > 0, jnp.float32)[:, :, None, None]  # the loss reads real tokens only
    fns = {"segment": lambda q, k, v: splash_attention(q, k, v, (seg, seg), interpret=True, block=BLOCK),
           "static": lambda q, k, v: splash_attention(q, k, v, (seg, seg), interpret=True, block=BLOCK,
                                                      segment_blocks=False),
           "xla": lambda q, k, v: xla_attention(q, k, v, segment_ids=(seg, seg))}
    grads = {name: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a)) * w), argnums=(0, 1, 2)))(q, k, v)
             for name, f in fns.items()}
    outs = {name: f(q, k, v) for name, f in fns.items()}
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(outs["segment"]), np.asarray(outs["static"]), atol=1e-6)  # padding too
    np.testing.assert_allclose(np.asarray(outs["segment"])[real], np.asarray(outs["xla"])[real], atol=2e-5)
    for g, s, r in zip(grads["segment"], grads["static"], grads["xla"]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(s), atol=1e-6)
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-5)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install 'realjax[tpu]')")
def test_segment_tables_lower_for_tpu_under_shard_map():
    """The TPU kernel (Mosaic, not interpret mode) with per-row tables compiles for v5p-8 inside shard_map,
    the batch and the kv heads sharded (the tables are built per shard from its rows' segment ids), forward
    and backward, beside the static kernel."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from realjax.models.attention import Backend
    from realjax.tools.aot.topology import parse_topology, topology_devices

    mesh = Mesh(np.array(topology_devices(parse_topology("v5p-8"))).reshape(2, 2), ("data", "tensor"))
    B, S, N, K, H = 4, 1024, 4, 2, 128
    spec = lambda shape, dtype, *axes: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*axes)))
    q = spec((B, S, N, H), jnp.bfloat16, "data", None, "tensor")
    kv = spec((B, S, K, H), jnp.bfloat16, "data", None, "tensor")
    seg = spec((B, S), jnp.int32, "data")
    backend = Backend(name="splash", mesh=mesh, batch_axes=("data",), head_axes=("tensor",))
    temp = {}
    for blocks in (True, False):
        loss = lambda q, k, v, s: jnp.sum(splash_attention(q, k, v, (s, s), backend, segment_blocks=blocks,
                                                           block=256).astype(jnp.float32) ** 2)
        with jax.default_matmul_precision("default"):  # conftest's "highest" is no Mosaic bf16 matmul
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
        assert compiled.as_text().count("tpu_custom_call") == 3  # forward, dq, dkv: Mosaic kernels
        temp[blocks] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[True] <= 2 * temp[False]  # the loop over rows adds per-row slices, not a copy of the batch
