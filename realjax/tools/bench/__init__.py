"""Benchmarks whose baselines run in the same process: ``realjax bench sampler|update|rl-step|rollout|gpu``
(one module each; the command is ``realjax.cli.bench``).

Every time is the median of ``--repeats`` calls after one warm-up call; the warm-up's extra time (the
compile) is reported apart as ``compile_s``. Each benchmark prints a table, or with ``--json`` one JSON
line (anything else the run prints goes to stderr). Targets are documented, never asserted: a shared CPU
is noisy, so each report carries the load average it ran under.

* ``sampler``: new tokens/s of realjax's Sampler vs transformers ``generate`` (torch, KV cache, greedy)
  on the same weights (target >= 4x), and vs the memory-bandwidth bound: a decode step must read every
  weight once plus the KV cache, at the bandwidth of a large fp32 matrix-vector product measured in this
  run (the operation decode is made of), so ``bound_tok_s = batch * bandwidth / bytes_per_step``
  (target >= 80%).
* ``update``: tokens/s of one REAL update (forward, backward, clip, AdamW) vs the same step in torch
  (transformers Qwen2 + REAL written in torch + torch.optim.AdamW; target >= 1.5x), and vs the compute
  bound: the step's FLOPs (``update_flops``) at the rate of a large fp32 matmul measured in this run.
  With ``--lengths`` (``packing``): rows of realistic lengths, packed vs padded, in real tokens/s.
* ``rl-step``: whole RL steps of a config (default: the demo) through ``Trainer``; the split of a step
  from its ``time/*`` metrics (target: verifier + host < 10% of a step).
* ``gpu``: the card's copy bandwidth and bf16 matmul rate; batch-1 decode of the 1.5B preset vs the HBM
  roofline (target >= 70%); learner MFU at 8k tokens (one update: bf16 compute, fp32 params, full remat),
  ``6 * params * tokens / time / matmul rate`` counting matmul parameters only (an untied input embedding
  is a gather) and the LM head only on the response tokens it scores (target >= 45%).
"""
