"""The rollout phase of an RL step: prompts -> sampler -> text -> verifier -> a host batch of labelled groups.

Every process feeds its own slice of the prompts (a contiguous block of the global batch), the sampler
runs once over the global batch, and each process decodes and scores the rows of its own prompts; the
rewards are then all-gathered so every host holds the same global batch for the update. With DAPO's
dynamic sampling, rounds of fresh prompts are drawn until the batch holds ``prompts_per_step`` groups
with mixed rewards (or the round limit is hit; the remainder is filled with degenerate groups, which
contribute zero loss, and counted).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from realjax import sharding as shd
from realjax.data import batch_prompts, bucket_length
from realjax.losses import mixed_groups
from realjax.rewards.custom import RewardFn
from realjax.sampling import Engine, Sampler



@dataclasses.dataclass
class Rollouts:
    """A global batch on the host, rows prompt-major (rollout r of prompt p is row p * R + r)."""

    prompt_ids: np.ndarray  # int32 [B, Tp], left-padded
    prompt_mask: np.ndarray  # int32 [B, Tp]
    tokens: np.ndarray  # int32 [B, N]
    resp_mask: np.ndarray  # float32 [B, N]: response tokens, the stop token included
    old_logp: np.ndarray  # float32 [B, N]: the sampler's log-probs (tempered, untruncated)
    rewards: np.ndarray  # float32 [B]
    finished: np.ndarray  # bool [B]: ended on a stop id (False: truncated at N)

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def select_groups(self, groups: np.ndarray, group_size: int) -> "Rollouts":
        rows = (groups[:, None] * group_size + np.arange(group_size)[None]).reshape(-1)
        return Rollouts(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


def concat_rollouts(parts: list[Rollouts]) -> Rollouts:
    """Stack rounds along rows; prompts are left-padded to the longest bucket."""
    if len(parts) == 1:
        return parts[0]
    tp = max(p.prompt_ids.shape[1] for p in parts)
    left = lambda x, t: np.pad(x, ((0, 0), (t - x.shape[1], 0)))
    fields = {f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Rollouts)
              if f.name not in ("prompt_ids", "prompt_mask")}
    return Rollouts(prompt_ids=np.concatenate([left(p.prompt_ids, tp) for p in parts]),
                    prompt_mask=np.concatenate([left(p.prompt_mask, tp) for p in parts]), **fields)


def _mixed(rewards: np.ndarray, group_size: int) -> np.ndarray:
    return np.asarray(mixed_groups(rewards, group_size))


class RolloutCollector:
    """Turns prompt rows into scored rollouts with one sampler on one mesh: the continuous-batching
    ``Engine`` (the trainer's), or the static ``Sampler`` (same samples, every row decoded to the end)."""

    def __init__(self, sampler: Engine | Sampler, tokenizer, reward_fn: RewardFn, *, group_size: int,
                 prompts_per_call: int, mesh):
        self.sampler, self.tokenizer, self.reward_fn = sampler, tokenizer, reward_fn
        self.group_size, self.prompts_per_call, self.mesh = group_size, prompts_per_call, mesh
        self.timings: dict[str, float] = {}

    def _global_prompt_length(self, rows) -> int:
        local = bucket_length(max(len(r["prompt_ids"]) for r in rows))
        return int(shd.allgather_host(np.array([local])).max())  # every process pads to the same bucket

    def _score(self, tokens, lengths, rows) -> np.ndarray:
        """Decode and score this process's block of a call's rows; all-gather the rewards."""
        R, p = self.group_size, jax.process_index()
        local = slice(p * len(rows) * R, (p + 1) * len(rows) * R)
        texts = self.tokenizer.batch_decode([t[:n] for t, n in zip(tokens[local], lengths[local])],
                                            skip_special_tokens=True)
        rewards = np.asarray(self.reward_fn(texts, [rows[i // R] for i in range(len(texts))]), np.float32)
        return shd.allgather_host(rewards)

    def one_round(self, graphdef, params, rows, key) -> Rollouts:
        """Sample and score ``group_size`` rollouts for each prompt of the global batch (``rows`` is this
        process's slice). Calls of ``prompts_per_call`` prompts bound the KV-cache memory; a call's global
        rows are the processes' blocks in process order, and calls are stacked."""
        R = self.group_size
        tp = self._global_prompt_length(rows)
        ids, mask = batch_prompts([r["prompt_ids"] for r in rows], self.sampler.pad_id, buckets=(tp,))
        per_call = (self.prompts_per_call // jax.process_count()) or len(rows)
        parts = []
        for c, start in enumerate(range(0, len(rows), per_call)):
            t0 = time.perf_counter()
            g_ids, g_mask = shd.put_local_batch((ids[start:start + per_call], mask[start:start + per_call]),
                                                self.mesh, self.sampler.rules)
            out = self.sampler(graphdef, params, g_ids, g_mask, jax.random.fold_in(key, c), group_size=R)
            out = jax.tree.map(shd.to_host, out)
            t1 = time.perf_counter()
            rewards = self._score(out.tokens, out.lengths, rows[start:start + per_call])
            t2 = time.perf_counter()
            self.timings["rollout"] = self.timings.get("rollout", 0.0) + t1 - t0
            self.timings["verifier"] = self.timings.get("verifier", 0.0) + t2 - t1
            parts.append(Rollouts(prompt_ids=np.repeat(shd.to_host(g_ids), R, 0),
                                  prompt_mask=np.repeat(shd.to_host(g_mask), R, 0), tokens=out.tokens,
                                  resp_mask=out.mask.astype(np.float32), old_logp=out.logprobs.astype(np.float32),
                                  rewards=rewards, finished=out.finished.astype(bool)))
        return concat_rollouts(parts)

    def collect(self, graphdef, params, next_rows: Callable[[], list], key, *, dynamic: bool = False,
                max_rounds: int = 1) -> tuple[Rollouts, dict]:
        """One RL step's batch. With ``dynamic`` (DAPO), keep drawing rounds of prompts until the batch
        holds a full set of mixed-reward groups."""
        self.timings = {}
        rows = next_rows()
        batch = self.one_round(graphdef, params, rows, key)
        stats = {"sampling_rounds": 1.0}
        if not dynamic:
            return batch, stats
        want = batch.rows // self.group_size
        kept = [batch.select_groups(np.flatnonzero(_mixed(batch.rewards, self.group_size)), self.group_size)]
        last = batch
        rounds = 1
        while sum(k.rows for k in kept) // self.group_size < want and rounds < max_rounds:
            last = self.one_round(graphdef, params, next_rows(), jax.random.fold_in(key, 1000 + rounds))
            kept.append(last.select_groups(np.flatnonzero(_mixed(last.rewards, self.group_size)),
                                           self.group_size))
            rounds += 1
        have = sum(k.rows for k in kept) // self.group_size
        if have < want:  # keep the shape fixed: fill with the last round's degenerate groups (zero loss)
            dead = np.flatnonzero(~_mixed(last.rewards, self.group_size))[: want - have]
            kept.append(last.select_groups(dead, self.group_size))
        merged = concat_rollouts([k for k in kept if k.rows])
        merged = merged.select_groups(np.arange(want), self.group_size)
        stats.update(sampling_rounds=float(rounds), filled_degenerate=float(max(want - have, 0)))
        return merged, stats
