"""realjax: reinforcement learning from verifiable rewards in JAX, built around REAL.

Axis-letter legend, used in every einsum, shape comment and shape-suffixed local (``q_BTNH``):

    B batch rows           T target (query) length     S source / KV-cache length
    D model width          N query heads               K key/value heads
    G queries per kv head  H head dim                  F MLP hidden width
    V vocabulary           L layers
    P prompt groups        R rollouts per prompt (the paper's G; ``B = P * R`` in the losses)
    Q prompt tokens        A response (answer) tokens  M micro-batches or scoring chunks (``[M, B, ...]``)
    Z packed sequences     C tokens of a packed sequence (``realjax.rl.packing``)
"""

__version__ = "0.1.0"
