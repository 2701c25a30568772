"""The attention entry point: every back end that runs on a CPU against a float64 numpy reference.

cuDNN's own kernel needs a GPU: here ``cudnn_attention`` runs ``jax.nn.dot_product_attention`` with
``implementation="xla"``, which checks the arguments the cuDNN path is given (the segment mask, causality,
grouped heads), not the kernel. Splash runs in Pallas interpret mode.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realjax.models.attention import (AttentionError, Backend, attention, cudnn_attention, full_attention,
                                      resolve_backend, splash_attention, use_backend, xla_attention)


def _reference(q_BTNH, k_BSKH, v_BSKH, visible_BTS):
    """float64 numpy attention; rows with no visible key are left at 0 (never compared)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q_BTNH, k_BSKH, v_BSKH))
    B, T, N, H = q.shape
    G = N // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    logits = np.where(visible_BTS[:, None], logits, -np.inf)
    m = np.max(logits, axis=-1, keepdims=True)
    e = np.where(visible_BTS[:, None], np.exp(logits - np.where(np.isfinite(m), m, 0)), 0)
    p = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _qkv(B=2, T=40, N=4, K=2, H=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, T, K, H)),
            jax.random.normal(ks[2], (B, T, K, H)))


def _segments(T=40):
    """Row 0: three packed segments and trailing padding; row 1: a left-padded row (padding = segment 0)."""
    row0 = np.repeat([1, 2, 3, 0], [11, 17, 5, 7])
    row1 = np.repeat([0, 1], [9, T - 9])
    return jnp.asarray(np.stack([row0, row1]).astype(np.int32))


def _visible(seg_BT):
    seg = np.asarray(seg_BT)
    T = seg.shape[1]
    return (np.arange(T)[None, :] <= np.arange(T)[:, None])[None] & (seg[:, :, None] == seg[:, None, :])


@pytest.mark.parametrize("name", ["xla", "cudnn", "splash"])
def test_backends_match_reference_under_segments(name):
    q, k, v = _qkv()
    seg = _segments()
    fns = {"xla": lambda q, k, v: xla_attention(q, k, v, segment_ids=(seg, seg)),
           "cudnn": lambda q, k, v: cudnn_attention(q, k, v, (seg, seg), implementation="xla"),
           "splash": lambda q, k, v: splash_attention(q, k, v, (seg, seg), interpret=True)}
    out = fns[name](q, k, v)
    real = np.asarray(seg) > 0  # padding outputs are discarded by every caller
    np.testing.assert_allclose(np.asarray(out)[real], _reference(q, k, v, _visible(seg))[real], atol=2e-5)
    assert np.isfinite(np.asarray(out)).all()  # padding queries see padding: never a fully masked row


@pytest.mark.parametrize("name", ["cudnn", pytest.param("splash", marks=pytest.mark.slow)])
def test_backend_gradients_match_xla(name):
    q, k, v = _qkv(seed=1)
    seg = _segments()
    w = jnp.asarray(np.asarray(seg) > 0, jnp.float32)[:, :, None, None]  # the loss reads real tokens only
    fns = {"xla": lambda q, k, v: xla_attention(q, k, v, segment_ids=(seg, seg)),
           "cudnn": lambda q, k, v: cudnn_attention(q, k, v, (seg, seg), implementation="xla"),
           "splash": lambda q, k, v: splash_attention(q, k, v, (seg, seg), interpret=True)}
    loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a)) * w))
    got = jax.grad(loss(fns[name]), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(fns["xla"]), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-5)


def test_slot_rule_matches_reference_and_stays_on_xla():
    """The cache's rule (decode): slots <= the query's slot that hold a real token, any back end asked."""
    q, k, v = _qkv(T=6)
    T = 6
    q_slot = jnp.asarray([[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7]])[:, :T]
    key_mask = jnp.asarray([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], bool)
    vis = (np.arange(T)[None, None] <= np.asarray(q_slot)[:, :, None]) & np.asarray(key_mask)[:, None]
    with use_backend(Backend(name="splash")):
        out = attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), q_slot_BT=q_slot, key_mask_BS=key_mask,
                        kv_layout="BKSH")
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, vis), atol=2e-5)


def test_full_attention_bool_mask_is_the_segment_rule_on_real_tokens():
    """A padded batch (bool mask) gives the same real-token outputs on XLA's slot rule and the fused back
    ends' segments {0: padding, 1: the row}."""
    q, k, v = _qkv()
    mask = jnp.asarray(np.stack([np.arange(40) >= 9, np.arange(40) < 31]))
    ref = full_attention(q, k, v, mask)
    with use_backend(Backend(name="splash")):
        fused = full_attention(q, k, v, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(fused)[real], np.asarray(ref)[real], atol=2e-5)


def test_resolve_backend():
    assert resolve_backend("auto", "cpu", "float32") == "xla"
    assert resolve_backend("auto", "tpu", "bfloat16") == "splash"
    assert resolve_backend("auto", "gpu", "bfloat16") == "xla"  # until the cuDNN kernel has run on a GPU
    assert resolve_backend("cudnn", "gpu", "bfloat16") == "cudnn"
    assert resolve_backend("xla", "tpu", "bfloat16") == "xla"
    for choice, platform, dtype in (("cudnn", "gpu", "float32"), ("cudnn", "cpu", "bfloat16"),
                                    ("splash", "cpu", "float32"), ("flash", "cpu", "float32")):
        with pytest.raises(AttentionError):
            resolve_backend(choice, platform, dtype)
    with pytest.raises(AttentionError, match="exactly one"):
        attention(*_qkv(), segment_ids=None)
