"""The decoder: one Flax NNX module for Qwen2/2.5, Qwen3 and Llama 3 (see ``ModelConfig``).

The same module serves training (a full sequence, no cache) and sampling (a KV cache in, the updated
cache out): attention always attends from query slots to key slots with one rule, ``key slot <= query
slot`` and the key slot holds a real token. Without a cache the slots are the sequence positions.

With ``cfg.scanned`` the blocks are one stacked module (every block weight gains a leading ``layers``
axis, [L, ...]) run by one ``jax.lax.scan``: XLA compiles one block instead of L unrolled copies, which
is what keeps a 28-layer program's compile time in minutes. The remat policy wraps the scan body, so
the backward pass keeps one block input per layer. Unscanned, the blocks are a list run in a Python
loop: the reference the scanned path is tested against.

Every weight carries logical axis names (``axes`` metadata) that ``realjax.sharding`` maps to the mesh;
every projection is an einsum with the weight's shape beside it. Axis letters: see ``realjax/__init__``.
"""

from __future__ import annotations

import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.layout import Layout

from realjax.models import lora
from realjax.models.attention import attention, full_attention
from realjax.models.config import ModelConfig
from realjax.models.kv_cache import CACHE_AXES, KVCache, read_layer, write_at, write_layer
from realjax.scoped import scoped
from realjax.sharding import constrain, constrain_layout, named

_INIT = nnx.initializers.normal(0.02)


# (mesh, rules) while ``placed_params`` is active: new weights are created directly in their shards.
_PLACEMENT = contextvars.ContextVar("realjax_param_placement", default=None)


def placed_params(mesh, rules):
    """Create each weight of the modules built inside directly in its shards on ``mesh`` (by ``rules``)."""
    return scoped(_PLACEMENT, (mesh, rules))


# L while ``_stacked_layers`` is active: each weight created gets a leading [L] axis named "layers".
_STACK = contextvars.ContextVar("realjax_stacked_layers", default=0)


def _stacked_layers(num_layers: int):
    return scoped(_STACK, num_layers)


def _stacked(shape, axes):
    """``(shape, axes)`` of a weight as created: with a leading layer axis inside ``_stacked_layers``."""
    layers = _STACK.get()
    return ((layers, *shape), ("layers", *axes)) if layers else (tuple(shape), tuple(axes))


@functools.lru_cache(maxsize=None)
def _initializer(init, shape, dtype, sharding):
    # One small program per distinct (shape, dtype, layout): a model built eagerly compiles a dozen of
    # these instead of one program holding every layer's random draws, which XLA:GPU compiles for a
    # minute at 1.5B.
    return jax.jit(lambda key: init(key, shape, dtype), out_shardings=sharding)


def _param(rngs, shape, dtype, axes, init=_INIT, kind=nnx.Param):
    (shape, axes), placement, dtype = _stacked(shape, axes), _PLACEMENT.get(), jnp.dtype(dtype)
    sharding = None if placement is None else named(axes, shape, *placement)
    return kind(_initializer(init, shape, dtype, sharding)(rngs.params()), axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, axes=("norm",)):
        shape, axes = _stacked((dim,), axes)
        self.scale = nnx.Param(jnp.ones(shape, param_dtype), axes=axes)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)  # the variance in fp32 whatever the compute dtype, as HF does
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2] (float32), with Llama 3's frequency-dependent scaling when configured."""
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
    sc = cfg.rope_scaling
    if sc is not None:
        wavelen = 2 * math.pi / inv
        low_wl = sc.original_max_position_embeddings / sc.low_freq_factor
        high_wl = sc.original_max_position_embeddings / sc.high_freq_factor
        scaled = np.where(wavelen > low_wl, inv / sc.factor, inv)
        smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
            sc.high_freq_factor - sc.low_freq_factor)
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = np.where(medium, (1 - smooth) * scaled / sc.factor + smooth * scaled, scaled)
    return inv.astype(np.float32)


def apply_rope(x_BTNH, positions_BT, inv_freq_h):
    """Rotate the two halves of each head (HF's rotate_half convention), in fp32."""
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq_h
    sin, cos = jnp.sin(angles_BTh)[:, :, None, :], jnp.cos(angles_BTh)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, N, K, H, pdt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
        self.cfg = cfg
        self.q = _param(rngs, (D, N, H), pdt, ("embed", "heads", "head_dim"))  # DNH
        self.k = _param(rngs, (D, K, H), pdt, ("embed", "kv_heads", "head_dim"))  # DKH
        self.v = _param(rngs, (D, K, H), pdt, ("embed", "kv_heads", "head_dim"))  # DKH
        self.o = _param(rngs, (N, H, D), pdt, ("heads", "head_dim", "embed"))  # NHD
        lora.attach(self, cfg.lora, {"q": "D->NH", "k": "D->KH", "v": "D->KH", "o": "NH->D"}, make=_param,
                    rngs=rngs, param_dtype=pdt)
        if cfg.attention_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = _param(rngs, (N, H), pdt, ("heads", "head_dim"), zeros)
            self.k_bias = _param(rngs, (K, H), pdt, ("kv_heads", "head_dim"), zeros)
            self.v_bias = _param(rngs, (K, H), pdt, ("kv_heads", "head_dim"), zeros)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(H, cfg.rms_norm_eps, param_dtype=pdt, axes=("head_dim",))
            self.k_norm = RMSNorm(H, cfg.rms_norm_eps, param_dtype=pdt, axes=("head_dim",))

    def _project(self, x_BTD, positions_BT):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        q_BTNH = jnp.einsum("BTD,DNH->BTNH", x_BTD, self.q[...].astype(dt))
        k_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.k[...].astype(dt))
        v_BTKH = jnp.einsum("BTD,DKH->BTKH", x_BTD, self.v[...].astype(dt))
        # LoRA adapters (a no-op without them); rollouts read merged weights and have none
        q_BTNH = lora.adapt(self, "q", x_BTD, q_BTNH, dt)
        k_BTKH = lora.adapt(self, "k", x_BTD, k_BTKH, dt)
        v_BTKH = lora.adapt(self, "v", x_BTD, v_BTKH, dt)
        if cfg.attention_bias:
            q_BTNH += self.q_bias[...].astype(dt)
            k_BTKH += self.k_bias[...].astype(dt)
            v_BTKH += self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        inv_freq_h = rope_inv_freq(cfg)  # a trace-time constant, not a parameter
        return apply_rope(q_BTNH, positions_BT, inv_freq_h), apply_rope(k_BTKH, positions_BT, inv_freq_h), v_BTKH

    def __call__(self, x_BTD, positions_BT, key_mask_BS, kv=None, end=None, layer=0):
        """Attend from the T new tokens; ``kv = (k_LBKSH, v_LBKSH)`` is every layer's cache, written at
        layer ``layer``, slot ``end``. Without a cache ``key_mask_BS`` is a bool key mask or, for a packed
        batch, int32 segment ids (``realjax.models.attention.full_attention``). Returns the output and the
        updated ``(k, v)`` (None without a cache)."""
        dt = jnp.dtype(self.cfg.dtype)
        B, T, _ = x_BTD.shape
        q_BTNH, k_BTKH, v_BTKH = self._project(x_BTD, positions_BT)
        if kv is None:
            out_BTNH, new_kv = full_attention(q_BTNH, k_BTKH, v_BTKH, key_mask_BS), None
        else:  # ``end``: one slot clock [] or one per row [B] (KVCache)
            S = key_mask_BS.shape[1]  # the cache's window (KVCache.span)
            k_L = write_layer(kv[0], k_BTKH.transpose(0, 2, 1, 3).astype(kv[0].dtype), layer, end)
            v_L = write_layer(kv[1], v_BTKH.transpose(0, 2, 1, 3).astype(kv[1].dtype), layer, end)
            new_kv = (k_L, v_L)
            q_slot_BT = jnp.broadcast_to(jnp.expand_dims(end, -1) + jnp.arange(T), (B, T))
            # Read slots [0, S) only: a long decode then never streams the cache's unwritten tail.
            out_BTNH = attention(q_BTNH, read_layer(k_L, layer, S), read_layer(v_L, layer, S), q_slot_BT=q_slot_BT,
                                 key_mask_BS=key_mask_BS, kv_layout="BKSH")
        out_BTD = jnp.einsum("BTNH,NHD->BTD", out_BTNH, self.o[...].astype(dt))
        return lora.adapt(self, "o", out_BTNH, out_BTD, dt), new_kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F, pdt = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        self.dtype = jnp.dtype(cfg.dtype)
        self.gate = _param(rngs, (D, F), pdt, ("embed", "mlp"))  # DF
        self.up = _param(rngs, (D, F), pdt, ("embed", "mlp"))  # DF
        self.down = _param(rngs, (F, D), pdt, ("mlp", "embed"))  # FD
        lora.attach(self, cfg.lora, {"gate": "D->F", "up": "D->F", "down": "F->D"}, make=_param, rngs=rngs,
                    param_dtype=pdt)

    def __call__(self, x_BTD):
        dt = self.dtype
        gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.gate[...].astype(dt))
        up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.up[...].astype(dt))
        gate_BTF = lora.adapt(self, "gate", x_BTD, gate_BTF, dt)
        up_BTF = lora.adapt(self, "up", x_BTD, up_BTF, dt)
        h_BTF = jax.nn.silu(gate_BTF) * up_BTF
        return lora.adapt(self, "down", h_BTF, jnp.einsum("BTF,FD->BTD", h_BTF, self.down[...].astype(dt)), dt)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = cfg.param_dtype
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BTD, positions_BT, key_mask_BS, kv=None, end=None, layer=0):
        h_BTD, new_kv = self.attn(self.attn_norm(x_BTD), positions_BT, key_mask_BS, kv, end, layer)
        x_BTD = x_BTD + h_BTD
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD))
        return constrain(x_BTD, ("batch", "length", None)), new_kv


def _block_call(graphdef, state, x, positions, key_mask, kv, end, layer):
    return nnx.merge(graphdef, state)(x, positions, key_mask, kv, end, layer)


_ROW_MAJOR_5D = Layout(tuple(range(5)))
_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def positions_from_mask(mask_BT):
    """RoPE positions of a left- or right-padded batch: the number of real tokens before each token."""
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


class Transformer(nnx.Module):
    """Token ids -> final hidden states / logits, with an optional KV cache."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        V, D, pdt = cfg.vocab_size, cfg.hidden_size, cfg.param_dtype
        self.embed = _param(rngs, (V, D), pdt, ("vocab", "embed"))  # VD
        if cfg.scanned:
            with _stacked_layers(cfg.num_layers):
                self.layers = Block(cfg, rngs=rngs)  # one module, every weight [L, ...]
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(D, cfg.rms_norm_eps, param_dtype=pdt)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (D, V), pdt, ("embed", "vocab"))  # DV

    def unembedding(self):
        """The output projection [D, V]: the lm head, or the transposed embedding when tied."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def hidden_states(self, input_ids_BT, positions_BT=None, mask_BT=None, cache: KVCache | None = None,
                      *, embeds_BTD=None, segment_ids_BT=None):
        """Final-normed hidden states [B, T, D] and the updated cache (None without one).

        ``mask_BT`` marks real tokens (1) and padding (0); ``positions_BT`` defaults to the count of real
        tokens before each token. With a cache, the T tokens are written at slots ``[end, end + T)``.
        ``embeds_BTD`` replaces the embedding lookup (soft prompts, gradient checks). ``segment_ids_BT``
        (int32, no cache) makes this a packed batch: each row holds several sequences, a token attends
        only to earlier tokens of its own segment (0 = padding), ``positions_BT`` restart in each.
        """
        cfg = self.cfg
        B, T = input_ids_BT.shape
        mask_BT = jnp.ones((B, T), bool) if mask_BT is None else mask_BT.astype(bool)
        positions_BT = positions_from_mask(mask_BT) if positions_BT is None else positions_BT
        if embeds_BTD is None:
            embeds_BTD = jnp.take(self.embed[...], input_ids_BT, axis=0)
        x_BTD = embeds_BTD.astype(cfg.dtype)
        x_BTD = constrain(x_BTD, ("batch", "length", None))
        if cache is None:
            key_mask_BS, end = (mask_BT if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)), None
        else:
            full_mask_BS = write_at(cache.mask, mask_BT, cache.end, axis=1)
            key_mask_BS, end = full_mask_BS[:, :cache.span], cache.end
        kv = None if cache is None else (cache.k, cache.v)
        x_BTD, kv = self._blocks(x_BTD, positions_BT, key_mask_BS, kv, end)
        h_BTD = self.final_norm(x_BTD)
        if cache is None:
            return h_BTD, None
        return h_BTD, cache.replace(k=kv[0], v=kv[1], mask=full_mask_BS, end=cache.end + T)

    def _blocks(self, x_BTD, positions_BT, key_mask_BS, kv, end):
        """Every block in order: one scan over the stacked blocks, or a loop over the list."""
        call = _block_call
        if self.cfg.remat != "none":
            # A pure jax.checkpoint over (graphdef, state): nothing to write back, any trace level. Inside
            # the scan body it makes the backward pass keep only each layer's input x.
            call = jax.checkpoint(_block_call, policy=_REMAT_POLICIES[self.cfg.remat], static_argnums=(0,))
        if not self.cfg.scanned:
            for i, block in enumerate(self.layers):
                x_BTD, kv = call(*nnx.split(block), x_BTD, positions_BT, key_mask_BS, kv, end, i)
            return x_BTD, kv
        graphdef, state_L = nnx.split(self.layers)

        def body(carry, state):
            # The cache rides in the carry, not in xs/ys: each layer then writes its T new slots in place
            # instead of the scan copying a whole layer's cache in and out per step.
            x_BTD, kv, layer = carry
            x_BTD, kv = call(graphdef, state, x_BTD, positions_BT, key_mask_BS, kv, end, layer)
            if kv is not None:
                # Pin the carried cache to the arguments' row-major layout. Left free, the TPU compiler
                # gives the loop's cache the layout of the new keys it writes ([L, S, K, B, H] in memory)
                # and copies the whole cache into it before the decode loop and back after it. Per shard:
                # pinned on the global array, the partitioner gathers the whole cache to every chip.
                kv = tuple(constrain_layout(c, CACHE_AXES, _ROW_MAJOR_5D) for c in kv)
            return (x_BTD, kv, layer + 1), None

        (x_BTD, kv, _), _ = jax.lax.scan(body, (x_BTD, kv, jnp.zeros((), jnp.int32)), state_L,
                                         unroll=self.cfg.unroll_scan)
        return x_BTD, kv

    def logits(self, h_BTD):
        """fp32 logits [B, T, V] (materialised: use ``realjax.models.token_logprobs`` at long T)."""
        w_DV = self.unembedding().astype(self.cfg.dtype)
        return jnp.einsum("BTD,DV->BTV", h_BTD, w_DV, preferred_element_type=jnp.float32)

    def __call__(self, input_ids_BT, positions_BT=None, attention_mask_BT=None):
        """Logits [B, T, V] in fp32 for a whole sequence (causal; padding masked when a mask is given)."""
        h_BTD, _ = self.hidden_states(input_ids_BT, positions_BT, attention_mask_BT)
        return self.logits(h_BTD)
