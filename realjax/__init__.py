"""realjax: reinforcement learning from verifiable rewards in JAX, built around REAL.

Axis-letter legend, used in every einsum, shape comment and shape-suffixed local (``q_BTNH``):

    B batch rows           T target (query) length     S source / KV-cache length
    D model width          N query heads               K key/value heads
    G queries per kv head  H head dim                  F MLP hidden width
    V vocabulary           L layers
    P prompt groups        R rollouts per prompt (the paper's G, the group size; ``B = P * R``), or
                             samples per problem in evaluation (``n``)
    Q prompt tokens        A response (answer) tokens, new tokens of the sampler
    M micro-batches or scoring chunks (``[M, B, ...]``)
    J live rows of a compacted batch (the rollout engine)
    O ordinal levels of a group (REAL-ordinal's thresholds); Y (group, level) pairs flattened
    Z packed sequences of the learner, C tokens of one (``realjax.rl.packing``)

Lower-case letters are parts of an axis: ``c`` the tokens of one scoring chunk (``T = M * c``), ``h``
half the head dim (RoPE's frequencies). A name carries its axes in order: ``logp_BA`` is [B, A].
"""

__version__ = "0.1.0"
