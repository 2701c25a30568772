"""Rewards: the math verifier (worker-process pool with a deadline), synthetic arithmetic tasks, and
user reward functions named in a config. Re-exports only; see the modules for what each does."""

from realjax.rewards.custom import load_reward_fn, validate_rewards
from realjax.rewards.equivalence import fast_equal, verify_equivalent
from realjax.rewards.extract import extract_answer, ground_truth_answers
from realjax.rewards.pool import VerifierPool, default_pool, score_math
from realjax.rewards.synthetic import generate_rows
from realjax.rewards.vote import answer_key, vote_key

__all__ = [
    "VerifierPool",
    "answer_key",
    "default_pool",
    "extract_answer",
    "fast_equal",
    "generate_rows",
    "ground_truth_answers",
    "load_reward_fn",
    "score_math",
    "validate_rewards",
    "verify_equivalent",
    "vote_key",
]
