"""Choosing the next token: greedy, temperature, top-k, top-p; and the log-prob that RL needs.

The returned log-prob is that of the chosen token under ``softmax(logits / T)`` -- the tempered policy
that was sampled from, *without* the top-k / top-p truncation (the released code's convention, and what
the trainer recomputes as ``old_logp``). Greedy decoding reports it under T = 1.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from realjax.sampling.nucleus import nucleus_threshold

_NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How rollouts are drawn.

    Attributes:
      max_new_tokens: generation budget N (the paper: 8192 for training and evaluation).
      temperature: T; 0 means greedy (the paper samples at 0.6).
      top_p: nucleus mass kept (1.0 = off; the paper's evaluation uses 0.95).
      top_k: keep the k most likely tokens (0 = off).
      stop_ids: token ids that end a row (EOS and friends); the stop token is part of the response.
      window_tokens: the decode loop attends over the KV cache in windows that grow by this many tokens:
        while the rows are shorter than ``i * window_tokens`` new tokens it reads only the prompt slots plus
        those. Each window is one more compiled decode program; a budget of at most this many tokens is a
        single window. At N = 8192 and 1024 this reads about 60% of the cache a full-width loop reads.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: tuple[int, ...] = ()
    window_tokens: int = 1024

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1, got {self.window_tokens}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def truncate(z_BV, *, top_k: int = 0, top_p: float = 1.0):
    """Set logits outside the top-k set and outside the nucleus to -inf (at least one token survives).

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p``: a token is kept
    when the mass of the tokens ranked above it is still below ``top_p``; tokens tied at the threshold
    are kept together. Top-k applies first, top-p to what it keeps. No full sort of the vocabulary: the
    nucleus is found among the largest logits (``lax.top_k``) and bisected only for rows where it is
    wider (``realjax.sampling.nucleus``).
    """
    top_Bv = None
    if top_k > 0 and top_k < z_BV.shape[-1]:
        top_Bv = jax.lax.top_k(z_BV, top_k)[0]
        # The min, not top_Bv[:, -1:]: a slice of the values makes XLA's CPU backend sort the whole row.
        z_BV = jnp.where(z_BV < jnp.min(top_Bv, axis=-1, keepdims=True), _NEG, z_BV)
    if top_p < 1.0:
        z_BV = jnp.where(z_BV < nucleus_threshold(z_BV, top_p, top_Bv=top_Bv), _NEG, z_BV)
    return z_BV


def choose(logits_BV, keys_B, cfg: SamplingConfig):
    """Next tokens [B] and their log-probs [B] (see the module docstring for which distribution).

    ``keys_B`` holds one PRNG key per row, so a row's draws do not depend on the rest of the batch.
    """
    z_BV = logits_BV.astype(jnp.float32)
    if not cfg.greedy:
        z_BV = z_BV / cfg.temperature
    max_B = jnp.max(z_BV, axis=-1)
    if cfg.greedy:
        token_B = jnp.argmax(z_BV, axis=-1).astype(jnp.int32)
    else:
        token_B = categorical(keys_B, truncate(z_BV, top_k=cfg.top_k, top_p=cfg.top_p))
    # log_softmax at the chosen token only: the [B, V] log-probs are never written out.
    shifted_B = jnp.take_along_axis(z_BV, token_B[:, None], axis=-1)[:, 0] - max_B
    return token_B, shifted_B - jnp.log(jnp.sum(jnp.exp(z_BV - max_B[:, None]), axis=-1))


def categorical(keys_B, z_BV):
    """One exact draw per row from ``softmax(z)`` (-inf entries are never drawn), with the row's key.

    ``jax.random.categorical`` draws a Gumbel noise for every vocabulary entry: at V = 152k and 64 rows
    that is 10M threefry draws per decode step (780 ms on 2 CPU cores, twice the forward pass of the
    Qwen2-0.5B shape cut to 4 layers). Here the vocabulary is cut into blocks of W ~ sqrt(V) tokens
    (``block_width``): a Gumbel-max draw over the blocks' log-masses picks a block (P(block) = its mass),
    a second one over the block's logits picks the token in it (P(token | block)), so P(token) is exactly
    its softmax probability, from V / W + W noises (1315 at V = 152k: 12 ms). Both draws are argmaxes of
    perturbed scores, so a rounding-level change of the logits (another batch size) flips a token only
    when the top two perturbed scores tie to that level, as with ``jax.random.categorical`` (an inverse-CDF
    draw over a near-flat 152k softmax would flip on almost any rounding change); the noise depends only
    on the row's key.
    """
    B, V = z_BV.shape
    width = block_width(V)
    full = V // width  # blocks of ``width`` tokens; the last ``V - full * width`` tokens form one more
    max_B11 = jnp.max(z_BV, axis=-1)[:, None, None]
    mass_BK = jnp.sum(jnp.exp(z_BV[:, :full * width].reshape(B, full, width) - max_B11), axis=-1)
    if full * width < V:
        tail_B1 = jnp.sum(jnp.exp(z_BV[:, full * width:] - max_B11[:, 0]), axis=-1, keepdims=True)
        mass_BK = jnp.concatenate([mass_BK, tail_B1], axis=-1)
    block_keys, token_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys_B), 1, 0)
    noise = lambda keys, n: jax.vmap(lambda k: jax.random.gumbel(k, (n,), jnp.float32))(keys)
    block_B = jnp.argmax(jnp.log(mass_BK) + noise(block_keys, mass_BK.shape[1]), axis=-1).astype(jnp.int32)
    # The block's logits: a slice of ``width`` that ends at V for the short last block; entries of the
    # slice before the block's first token are masked out.
    first_B = block_B * width
    start_B = jnp.minimum(first_B, V - width)
    slice_BW = jax.vmap(lambda z, s: jax.lax.dynamic_slice(z, (s,), (width,)))(z_BV, start_B)
    index_BW = start_B[:, None] + jnp.arange(width, dtype=jnp.int32)
    score_BW = jnp.where(index_BW >= first_B[:, None], slice_BW + noise(token_keys, width), _NEG)
    return start_B + jnp.argmax(score_BW, axis=-1).astype(jnp.int32)


def block_width(V: int) -> int:
    """``categorical``'s block: the divisor of V nearest sqrt(V), so blocks are a reshape of the logits
    (at V = 152k, 64 rows: 12 ms a draw, where blocks of ceil(sqrt(V)) plus a short last one cost 92 ms:
    XLA's CPU backend copies the sliced logits), or ceil(sqrt(V)) where V has no divisor near it."""
    root = math.isqrt(V - 1) + 1  # ceil(sqrt(V))
    best = min((d for d in range(1, root + 1) if V % d == 0), key=lambda d: d + V // d)
    best = max(best, V // best)  # the wider of the two factors: fewer, larger blocks
    return best if best + V // best <= 4 * root else root
