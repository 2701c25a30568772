"""The RL trainer: rollouts, verifier labels, updates with any objective in ``realjax.losses.LOSSES``."""

from realjax.rl.batch import TrainState, UpdateBatch
from realjax.rl.plan import RunPlan, make_plan
from realjax.rl.rollout import RolloutCollector, Rollouts
from realjax.rl.trainer import Trainer, TrainingDiverged, train
from realjax.rl.update import make_optimizer, make_scoring_fn, make_update_step, policy_logprobs

__all__ = ["RolloutCollector", "Rollouts", "RunPlan", "TrainState", "Trainer", "TrainingDiverged", "UpdateBatch",
           "make_optimizer", "make_plan", "make_scoring_fn", "make_update_step", "policy_logprobs", "train"]
