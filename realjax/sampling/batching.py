"""Token-id prompts in, completions out: the batching loop that `realjax sample` and evaluation share.

Prompts go through the sampler in batches of a fixed number of prompts, left-padded to a length bucket;
the last batch is filled with copies of its first prompt (results discarded) so every batch has the same
shape and compiles stay one per bucket.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx
from tqdm import tqdm

from realjax import sharding as shd
from realjax.data import batch_prompts
from realjax.sampling.sampler import Sampler


def sample_ids(model, sampler: Sampler, prompt_ids: Sequence[Sequence[int]], *, n: int = 1, seed: int = 0,
               prompts_per_batch: int = 8, buckets=None, progress: bool = False) -> list[list[dict]]:
    """``n`` completions for every prompt: a list (per prompt) of dicts with ``token_ids``,
    ``logprobs`` (per token, see ``SamplingConfig``), ``finished`` (ended on a stop id)."""
    graphdef, state = nnx.split(model)
    key = jax.random.key(seed)
    results: list[list[dict]] = []
    starts = range(0, len(prompt_ids), prompts_per_batch)
    bar = None
    if progress and len(starts) > 1:
        bar = tqdm(total=len(prompt_ids), desc="sampling", unit="prompt")
    for b, start in enumerate(starts):
        chunk = list(prompt_ids[start:start + prompts_per_batch])
        real = len(chunk)
        chunk += [chunk[0]] * (prompts_per_batch - real)
        ids, mask = batch_prompts(chunk, sampler.pad_id, buckets=buckets)
        if sampler.mesh is not None:
            ids, mask = shd.put_batch((ids, mask), sampler.mesh, sampler.rules)
        out = sampler(graphdef, state, ids, mask, jax.random.fold_in(key, b), group_size=n)
        tokens, logprobs, lengths, finished = (shd.to_host(x) for x in
                                               (out.tokens, out.logprobs, out.lengths, out.finished))
        for p in range(real):
            rows = range(p * n, (p + 1) * n)
            results.append([{"token_ids": tokens[r, :lengths[r]].tolist(),
                             "logprobs": logprobs[r, :lengths[r]].tolist(),
                             "finished": bool(finished[r])} for r in rows])
        if bar is not None:
            bar.update(real)
    if bar is not None:
        bar.close()
    return results
