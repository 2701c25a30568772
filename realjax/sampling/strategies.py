"""Choosing the next token: greedy, temperature, top-k, top-p; and the log-prob that RL needs.

The returned log-prob is that of the chosen token under ``softmax(logits / T)`` -- the tempered policy
that was sampled from, *without* the top-k / top-p truncation (the released code's convention, and what
the trainer recomputes as ``old_logp``). Greedy decoding reports it under T = 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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
    when the mass of the tokens ranked above it is still below ``top_p``.
    """
    if top_k > 0 and top_k < z_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(z_BV, top_k)[0][:, -1:]
        z_BV = jnp.where(z_BV < kth_B1, _NEG, z_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(z_BV, axis=-1)[:, ::-1]
        p_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(p_BV, axis=-1) - p_BV
        kept_BV = before_BV < top_p
        # The smallest kept logit is the threshold; ties at the threshold are kept together.
        threshold_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        z_BV = jnp.where(z_BV < threshold_B1, _NEG, z_BV)
    return z_BV


def choose(logits_BV, keys_B, cfg: SamplingConfig):
    """Next tokens [B] and their log-probs [B] (see the module docstring for which distribution).

    ``keys_B`` holds one PRNG key per row, so a row's draws do not depend on the rest of the batch.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if cfg.greedy:
        token_B = jnp.argmax(logits_BV, axis=-1)
        logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    else:
        z_BV = logits_BV / cfg.temperature
        logp_BV = jax.nn.log_softmax(z_BV, axis=-1)
        z_BV = truncate(z_BV, top_k=cfg.top_k, top_p=cfg.top_p)
        token_B = jax.vmap(jax.random.categorical)(keys_B, z_BV)
    token_B = token_B.astype(jnp.int32)
    return token_B, jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
