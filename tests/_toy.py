"""A toy policy and update batches for learner tests: one small block, a 40-token vocabulary."""

import numpy as np

from realjax.rl.batch import UpdateBatch


def toy_model(seed=0, dtype="float32"):
    from realjax.models import ModelConfig, init_model

    cfg = ModelConfig(family="qwen2", vocab_size=40, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=8, intermediate_size=48, param_dtype="float32", dtype=dtype)
    return init_model(cfg, seed=seed)


def toy_batch(*, rows=16, group_size=4, prompt=5, response=7, seed=0, degenerate_first=0, graded=False,
              dropped=()) -> UpdateBatch:
    """Rows of whole groups with ragged left-padded prompts and ragged responses (one empty); the first
    ``degenerate_first`` groups are all-right / all-wrong in turn, the others mixed. ``dropped``: rows whose
    ``row_mask`` is 0."""
    rng = np.random.default_rng(seed)
    plen = rng.integers(1, prompt + 1, rows)
    prompt_mask = (np.arange(prompt)[None] >= prompt - plen[:, None]).astype(np.int32)
    rlen = rng.integers(1, response + 1, rows)
    rlen[rows // 2] = 0  # an empty response
    resp_mask = (np.arange(response)[None] < rlen[:, None]).astype(np.float32)
    levels = np.array([0.0, 0.5, 1.0]) if graded else np.array([0.0, 1.0])
    r = levels[rng.integers(0, len(levels), rows)].reshape(-1, group_size)
    for g in range(len(r)):
        if g < degenerate_first:
            r[g] = float(g % 2 == 0)
        elif r[g].min() == r[g].max():
            r[g, 0], r[g, -1] = 0.0, 1.0
    row_mask = np.ones(rows, np.float32)
    row_mask[list(dropped)] = 0.0
    return UpdateBatch(prompt_ids_BQ=(rng.integers(3, 40, (rows, prompt)) * prompt_mask).astype(np.int32),
                       prompt_mask_BQ=prompt_mask, tokens_BA=(rng.integers(3, 40, (rows, response))).astype(np.int32),
                       resp_mask_BA=resp_mask, row_mask_B=row_mask,
                       old_logp_BA=(-rng.gamma(2.0, 1.0, (rows, response)) * resp_mask).astype(np.float32),
                       rewards_B=r.reshape(-1).astype(np.float32))
