"""One attention entry point, three back ends: XLA (the reference, every platform), cuDNN (GPU), splash (TPU).

Two masking rules, both causal:

* **segments** (the learner's full sequences, padded or packed): ``segment_ids = (q_seg_BT, kv_seg_BS)``
  with ``S = T``; query ``t`` sees key ``s <= t`` of its own segment. Padding is never in a row's segment
  (a padded row's is id 0; a packed sequence gives each padding slot its own negative id), so a padding
  query sees padding and never a real token, and no query row is ever fully masked (a fully masked row
  is a NaN in some fused kernels; padding outputs are discarded but a NaN would still reach the loss as
  ``0 * NaN``). Every back end implements this rule.
* **slots** (the KV cache of the sampler and the engine): query ``t`` sits at cache slot ``q_slot_BT``
  and sees the keys at slots ``<= q_slot`` that hold a real token (``key_mask_BS``). Only the XLA back end
  takes it: decode reads a cache laid out ``[B, K, S, H]`` one token at a time, which the fused kernels
  do not serve.

Back ends (``model.attention``; ``auto`` picks by the platform of the devices the program runs on):

* ``xla``: einsum, fp32 softmax, einsum; grouped-query attention without repeating K/V. Materialises the
  ``[B, K, G, T, S]`` logits.
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (bf16/fp16 only). Its public API has
  no segment ids, so the segment rule goes in as a dense boolean mask (which JAX's wrapper turns into an
  additive bias) beside ``is_causal``: segment ids are honoured, at the cost of an O(T * S) mask.
* ``splash``: Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) with its
  causal mask and native segment ids, and per-sequence block tables built from the segment ids
  (``realjax.models.splash_blocks``) so a packed sequence computes only the tiles its rows see, not its
  whole causal triangle; one MQA kernel per kv head (vmapped) so K/V are never repeated;
  inside ``shard_map`` over the batch (and kv heads) when a mesh is given, because a Mosaic kernel is not
  partitioned by GSPMD. Off TPU it runs in Pallas interpret mode (tests).

Axis letters: see ``realjax/__init__``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as sk,
)
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import Mesh, PartitionSpec

from realjax.models.splash_blocks import SPLASH_BLOCK, segment_kernel, tile
from realjax.scoped import scoped

BACKENDS = ("xla", "cudnn", "splash")
CHOICES = ("auto",) + BACKENDS
_NEG = float(np.finfo(np.float32).min)  # finite, so a row with no visible key gives a uniform softmax, not NaN


class AttentionError(ValueError):
    """An attention back end asked for something it cannot do (a platform, a dtype, a masking rule)."""


def check_backend(choice: str) -> str:
    """``choice`` if it names a back end (or ``auto``); else ``AttentionError`` (``model.attention``)."""
    if choice not in CHOICES:
        raise AttentionError(f"unknown attention back end {choice!r}; choose from {', '.join(CHOICES)}")
    return choice


def resolve_backend(choice: str, platform: str, compute_dtype: str) -> str:
    """The back end ``choice`` (one of ``CHOICES``) names on ``platform`` ("cpu", "gpu", "tpu")."""
    check_backend(choice)
    half = jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if choice == "auto":
        # ``auto`` picks only a kernel that has run on its platform: splash's lowering is compiled for TPU
        # by ``realjax compile`` and checked in interpret mode; the cuDNN kernel has not run on a GPU yet
        # (README, GPU section), so a GPU keeps the XLA reference unless ``cudnn`` is asked for.
        return {"tpu": "splash"}.get(platform, "xla")
    if choice == "cudnn" and (platform != "gpu" or not half):
        raise AttentionError(f"attention back end cudnn needs a GPU and bf16/fp16 compute (platform {platform}, "
                             f"compute dtype {compute_dtype})")
    if choice == "splash" and platform != "tpu":
        raise AttentionError(f"attention back end splash needs a TPU (platform {platform})")
    return choice


@dataclasses.dataclass(frozen=True)
class Backend:
    """The back end the learner's programs trace with, and the mesh a splash kernel is mapped over."""

    name: str = "xla"
    mesh: Mesh | None = None
    batch_axes: tuple[str, ...] = ()  # mesh axes of the batch dimension (splash's shard_map)
    head_axes: tuple[str, ...] = ()  # mesh axes of the kv-head dimension


_BACKEND = contextvars.ContextVar("realjax_attention_backend", default=Backend())


def use_backend(backend: Backend):
    """Within this block (at trace time), full-sequence attention runs on ``backend``; decode is always XLA."""
    return scoped(_BACKEND, backend)


def active_backend() -> Backend:
    return _BACKEND.get()


def attention(q_BTNH, k_BSKH, v_BSKH, *, segment_ids=None, q_slot_BT=None, key_mask_BS=None,
              kv_layout: str = "BSKH", backend: str | None = None):
    """Causal grouped-query attention ``softmax(q k^T / sqrt(H)) v`` under one of the two masking rules.

    Args:
      q_BTNH: queries (RoPE applied), in the compute dtype.
      k_BSKH, v_BSKH: keys and values, ``[B, S, K, H]`` (or ``[B, K, S, H]`` with ``kv_layout="BKSH"``,
        the cache's layout; XLA only).
      segment_ids: ``(q_seg_BT, kv_seg_BS)`` int32, the segment rule (``S == T``).
      q_slot_BT, key_mask_BS: the slot rule (cached decode; XLA only).
      backend: one of ``BACKENDS``; default: the enclosing :func:`use_backend`'s (XLA outside one).
    Returns:
      ``out_BTNH`` in the compute dtype.
    """
    ctx = active_backend()
    name = backend or ctx.name
    if (segment_ids is None) == (q_slot_BT is None):
        raise AttentionError("give exactly one masking rule: segment_ids, or q_slot_BT with key_mask_BS")
    if name == "xla" or segment_ids is None:  # the slot rule (decode) always runs on XLA
        return xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids=segment_ids, q_slot_BT=q_slot_BT,
                             key_mask_BS=key_mask_BS, kv_layout=kv_layout)
    if kv_layout != "BSKH":
        raise AttentionError(f"attention back end {name} takes K/V as [B, S, K, H], got {kv_layout}")
    if name == "cudnn":
        return cudnn_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids)
    if name == "splash":
        return splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids, ctx)
    raise AttentionError(f"unknown attention back end {name!r}; choose from {', '.join(BACKENDS)}")


def segment_mask(q_seg_BT, kv_seg_BS):
    """[B, T, S] bool: the segment rule (same segment, key index <= query index)."""
    T, S = q_seg_BT.shape[1], kv_seg_BS.shape[1]
    causal_TS = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
    return causal_TS[None] & (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :])


def xla_attention(q_BTNH, k_BSKH, v_BSKH, *, segment_ids=None, q_slot_BT=None, key_mask_BS=None,
                  kv_layout: str = "BSKH"):
    """The reference: einsums with an fp32 softmax; either masking rule."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[kv_layout.index("K")]
    S = k_BSKH.shape[kv_layout.index("S")]
    dt = q_BTNH.dtype
    if segment_ids is not None:
        visible_BTS = segment_mask(*segment_ids)
    else:
        visible_BTS = (jnp.arange(S)[None, None, :] <= q_slot_BT[:, :, None]) & key_mask_BS[:, None, :]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    # Grouped-query attention without repeating K/V: the G query heads of a kv head share it.
    logits_BKGTS = jnp.einsum(f"BTKGH,{kv_layout}->BKGTS", q_BTKGH, k_BSKH.astype(dt),
                              preferred_element_type=jnp.float32) * (H ** -0.5)
    logits_BKGTS = jnp.where(visible_BTS[:, None, None], logits_BKGTS, _NEG)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(dt)
    out_BTKGH = jnp.einsum(f"BKGTS,{kv_layout}->BTKGH", probs_BKGTS, v_BSKH.astype(dt))
    return out_BTKGH.reshape(B, T, N, H)


def cudnn_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids, *, implementation: str = "cudnn"):
    """``jax.nn.dot_product_attention`` under the segment rule (``implementation="xla"`` runs it on any
    platform: the tests check the arguments that way). ``is_causal`` lets cuDNN skip the upper triangle;
    the segment mask goes in as a dense mask because the public API has no segment ids."""
    mask_B1TS = segment_mask(*segment_ids)[:, None]
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype),
                                        mask=mask_B1TS, is_causal=True, implementation=implementation)


def splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids, backend: Backend | None = None, *,
                     interpret: bool | None = None, segment_blocks: bool = True, block: int = SPLASH_BLOCK):
    """Pallas splash attention under the segment rule: causal mask and native segment ids.

    The sequence is padded to a whole number of tiles (padding in segment 0, so padded queries see only
    padding); ``interpret`` (default: off TPU) runs the kernel in Pallas interpret mode. ``segment_blocks``
    (default) gives each sequence block tables from its segment ids (``realjax.models.splash_blocks``: the
    same outputs, fewer tiles); off, the static causal tables of the whole sequence (the tests' baseline).
    ``block``: the tile (tests use small ones to get many tiles from short sequences).
    """
    backend = backend or Backend(name="splash")
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    block, Tp = tile(T, block)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T)) + ((0, 0),) * (x.ndim - 2))
    q_seg_BT, kv_seg_BS = (pad(s.astype(jnp.int32)) for s in segment_ids)
    # [B, K, G, T, H] and [B, K, S, H]: splash's MQA kernel takes one kv head with its G query heads.
    q_BKGTH = pad(q_BTNH * jnp.asarray(H ** -0.5, q_BTNH.dtype)).reshape(B, Tp, K, N // K, H).transpose(0, 2, 3, 1, 4)
    k_BKSH, v_BKSH = (pad(x.astype(q_BTNH.dtype)).transpose(0, 2, 1, 3) for x in (k_BSKH, v_BSKH))
    if interpret is None:
        platform = (backend.mesh.devices.flat[0].platform if backend.mesh is not None else jax.default_backend())
        interpret = platform != "tpu"
    kernel = _splash_kernel(Tp, N // K, block, interpret)

    def run(q_BKGTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS):
        def one_row(q_KGTH, k_KSH, v_KSH, qs_T, ks_S):
            seg = sk.SegmentIds(q=qs_T, kv=ks_S)
            # Per-row tables make the kernel's scalar-prefetch operands batched over rows, which pallas_call
            # batches as a loop over rows (one kernel per row, each over all its heads).
            row_kernel = segment_kernel(kernel, qs_T, ks_S, block) if segment_blocks else kernel
            return jax.vmap(lambda q, k, v: row_kernel(q, k, v, segment_ids=seg))(q_KGTH, k_KSH, v_KSH)

        return jax.vmap(one_row)(q_BKGTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS)

    if backend.mesh is not None and (backend.batch_axes or backend.head_axes):
        b = backend.batch_axes or None
        k = backend.head_axes or None
        run = jax.shard_map(run, mesh=backend.mesh, check_vma=False,
                            in_specs=(PartitionSpec(b, k), PartitionSpec(b, k), PartitionSpec(b, k),
                                      PartitionSpec(b), PartitionSpec(b)),
                            out_specs=PartitionSpec(b, k))
    out_BKGTH = run(q_BKGTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, :T].astype(q_BTNH.dtype)


@functools.lru_cache(maxsize=None)
def _splash_kernel(T: int, G: int, block: int, interpret: bool):
    """One causal MQA splash kernel per (length, query heads per kv head, tile, mode): built once, since
    building it walks the mask on the host."""
    mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(G)])
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # The kernel holds the mask's block tables as arrays: made concrete here, else a kernel first built
    # inside a jit would cache (and leak) that trace's tracers into every later program.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def full_attention(q_BTNH, k_BTKH, v_BTKH, key_mask_or_segments_BT):
    """Attention over one whole sequence (no cache): ``key_mask_or_segments_BT`` is a bool key mask (a
    padded batch) or int32 segment ids (a packed one, ``realjax.rl.packing``).

    A bool mask keeps the slot rule on XLA (so padded outputs stay as they always were) and becomes
    segments ``{0: padding, 1: the row}`` on the fused back ends, which only take segments.
    """
    m_BT = key_mask_or_segments_BT
    if jnp.issubdtype(m_BT.dtype, jnp.integer):
        return attention(q_BTNH, k_BTKH, v_BTKH, segment_ids=(m_BT, m_BT))
    if active_backend().name == "xla":
        B, T = m_BT.shape
        return attention(q_BTNH, k_BTKH, v_BTKH, q_slot_BT=jnp.broadcast_to(jnp.arange(T), (B, T)), key_mask_BS=m_BT)
    seg_BT = m_BT.astype(jnp.int32)
    return attention(q_BTNH, k_BTKH, v_BTKH, segment_ids=(seg_BT, seg_BT))
