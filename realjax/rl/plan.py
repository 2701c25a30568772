"""The run plan: every learner and sampler decision of a run, made once from the config and the mesh.

``Trainer``, ``realjax compile`` (which must model the very programs a run executes) and ``realjax bench``
all build their programs from a :class:`RunPlan`, so a decision (which optimizer, which layouts, whether
old log-probs are recomputed, how a batch is cut) lives in one place.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from realjax import sharding as shd
from realjax.config import Config, ConfigError
from realjax.losses import get_terms
from realjax.models import lora as lora_lib
from realjax.models.attention import AttentionError, Backend, resolve_backend
from realjax.rl.batch import TrainState, UpdateBatch
from realjax.rl.packing import pack_batch, sequence_buckets
from realjax.rl.update import make_optimizer, make_scoring_fn, make_update_step
from realjax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What a run's programs are, decided once (see :func:`make_plan`)."""

    cfg: Config
    mesh: Mesh
    compute_dtype: str
    optimizer: Any  # optax.GradientTransformation; its schedule counts optimizer updates
    state_shardings: TrainState  # params (TRAIN_RULES), optimizer state like the params it mirrors, reference,
    # a LoRA policy's frozen base
    rollout_shardings: Any  # the weights as rollouts read them (ROLLOUT_RULES; LoRA: merged, the plain model's)
    sampling: SamplingConfig  # rollouts
    eval_sampling: SamplingConfig
    loss_hparams: dict[str, Any]  # the objective's own hyper-parameters (others' keys in the config are ignored)
    use_ref: bool  # GRPO with a KL term scores the batch under reference weights (LoRA: the frozen base)
    recompute_old_logp: bool  # one scoring pass recomputes old log-probs before the updates
    scoring_chunks: int  # row chunks of a scoring pass (one micro-batch's rows each)
    eval_prompts_per_call: int  # prompts per evaluation sampler call (``eval.n`` rows each)
    attention: Backend = Backend()  # the learner's attention back end (model.attention, resolved)
    lora: Any = None  # realjax.models.LoraConfig of a LoRA policy (adapters train, the base is frozen); None

    @property
    def ref_is_base(self) -> bool:
        """The reference policy is a LoRA policy's frozen base: no separate reference copy is kept."""
        return self.use_ref and self.lora is not None

    @property
    def group_size(self) -> int:
        return self.cfg.rollout.group_size

    @property
    def rows_per_step(self) -> int:
        return self.cfg.rollout.prompts_per_step * self.cfg.rollout.group_size

    @property
    def rows_per_micro_batch(self) -> int:
        o = self.cfg.optim
        return self.rows_per_step // (o.mini_batches * o.micro_batches)

    def _learner_kw(self) -> dict:
        return dict(temperature=self.cfg.rollout.temperature, chunk_tokens=self.cfg.model.logprob_chunk_tokens,
                    attention=self.attention)

    def packed_sequences(self, rows: int, seq_len: int) -> int:
        """The budget's packed sequence count for ``rows`` rows of ``seq_len`` input tokens (the shape
        ``realjax compile`` models); 0 without packing."""
        budget = self.cfg.optim.tokens_per_micro_batch
        if not budget:
            return 0
        return sequence_buckets(rows, seq_len, budget, shd.batch_rows_multiple(self.mesh, shd.TRAIN_RULES))[0]

    def pack(self, batch: UpdateBatch, *, move_groups: bool = False) -> UpdateBatch:
        """A cut host batch ``[M, rows, ...]`` with its packing (``optim.tokens_per_micro_batch``), or as is.
        ``move_groups``: an update's batch, whose groups may change micro-batch to lower the sequence count
        (the rows come back in another order: not for a scoring pass, read back by position)."""
        budget = self.cfg.optim.tokens_per_micro_batch
        if not budget:
            return batch
        return pack_batch(batch, tokens_per_micro_batch=budget, group_size=self.group_size if move_groups else 0,
                          multiple=shd.batch_rows_multiple(self.mesh, shd.TRAIN_RULES))

    def update_step(self, graphdef):
        """The jitted ``(TrainState, UpdateBatch [M, rows, ...]) -> (TrainState, metrics)``."""
        return make_update_step(graphdef, self.optimizer, get_terms(self.cfg.loss.name), self.loss_hparams,
                                group_size=self.group_size, shardings=self.state_shardings,
                                is_correction=(self.cfg.rollout.is_correction, self.cfg.rollout.is_cap),
                                **self._learner_kw())

    def scoring_fn(self, graphdef):
        """The jitted ``(params, UpdateBatch [chunks, rows, ...]) -> (logp, entropy)``."""
        return make_scoring_fn(graphdef, **self._learner_kw())

    @functools.cached_property
    def rollout_view(self):
        """Jitted ``(params, frozen=None) -> rollout params``: laid out by the rollout rules and stored in the
        compute dtype. A LoRA policy's view is the plain model's state with ``W + scale A B`` merged in once
        here, so decoding costs what it costs without adapters.

        The model casts every weight to ``model.dtype`` before using it, so casting once here gives the
        same numbers (the sampler's log-probs stay the trainer's own) while each decode step reads half the
        bytes of fp32 master weights, and the rollout copy takes half the memory.
        """
        dt = jnp.dtype(self.compute_dtype)

        def view(params, frozen=None):
            if frozen is not None:
                return lora_lib.merge_adapters(frozen, params, self.lora.scale, dt)
            return jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)

        return jax.jit(view, out_shardings=self.rollout_shardings)

    def init_state(self, params, frozen=None) -> TrainState:
        """The train state around ``params`` (and a LoRA policy's ``frozen`` base), laid out by
        ``state_shardings``. The optimizer state mirrors ``params`` only."""
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings.opt_state)(params)
        ref = jax.tree.map(jnp.copy, params) if self.use_ref and not self.ref_is_base else None
        return TrainState(params, opt_state, ref, frozen)

    def batch_sharding(self, shape: tuple[int, ...]):
        """Sharding of an ``UpdateBatch`` leaf ``[M, rows, ...]``: rows over the batch mesh axes."""
        return shd.batch_sharding(self.mesh, shape, shd.TRAIN_RULES, axis=1)


def make_plan(cfg: Config, mesh: Mesh, *, compute_dtype: str, abstract_params, stop_ids: tuple[int, ...],
              abstract_frozen=None) -> RunPlan:
    """Decide everything from ``cfg``, the mesh and the weights' (abstract) state; checks the settings that
    depend on the mesh (``ConfigError`` naming the key), so they fail before any step. With LoRA
    (``model.lora.rank`` > 0), ``abstract_params`` are the adapters and ``abstract_frozen`` the base
    (``realjax.models.lora.split_policy``)."""
    lora = cfg.model.lora.model_config()
    if (lora is None) != (abstract_frozen is None):
        raise ValueError("a LoRA run plan needs the adapters and the frozen base apart (split_policy), "
                         "a full fine-tuning plan the whole state")
    _check_mesh_divides(cfg, mesh)
    o, r, e = cfg.optim, cfg.rollout, cfg.eval
    _check_packing(cfg)
    try:
        attention = resolve_backend(cfg.model.attention, mesh.devices.flat[0].platform, compute_dtype)
    except AttentionError as err:
        raise ConfigError(f"model.attention: {err}") from None
    batch_spec = shd.logical_to_spec(("batch",), (0,), mesh, shd.TRAIN_RULES)[0]  # None, an axis or a tuple
    batch_axes = (batch_spec,) if isinstance(batch_spec, str) else tuple(batch_spec or ())
    optimizer = make_optimizer(o.lr, weight_decay=o.weight_decay, grad_clip=o.grad_clip, b1=o.b1, b2=o.b2,
                               eps=o.eps, schedule=o.schedule, warmup_updates=o.warmup_steps * o.mini_batches,
                               total_updates=cfg.trainer.steps * o.mini_batches)
    param_sh = shd.state_shardings(abstract_params, mesh, shd.TRAIN_RULES)
    opt_sh = opt_state_shardings(jax.eval_shape(optimizer.init, abstract_params), param_sh, mesh)
    hparams = cfg.loss.hparams()
    use_ref = cfg.loss.name == "grpo" and hparams.get("kl_coef", 0.0) > 0
    frozen_sh = None if lora is None else shd.state_shardings(abstract_frozen, mesh, shd.TRAIN_RULES)
    ref_sh = param_sh if use_ref and lora is None else None
    # auto: the sampler's incremental numbers equal a full forward pass only in fp32.
    recompute = r.old_logp == "recompute" or (r.old_logp == "auto" and compute_dtype != "float32")
    recompute = recompute or (r.old_logp == "auto" and r.is_correction != "none")  # it needs both policies
    rollout = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                             top_k=r.top_k, stop_ids=stop_ids, window_tokens=r.window_tokens)
    evaluation = SamplingConfig(max_new_tokens=e.max_new_tokens or r.max_new_tokens, temperature=e.temperature,
                                top_p=e.top_p, top_k=e.top_k, stop_ids=stop_ids, window_tokens=r.window_tokens)
    return RunPlan(cfg=cfg, mesh=mesh, compute_dtype=compute_dtype, optimizer=optimizer,
                   state_shardings=TrainState(param_sh, opt_sh, ref_sh, frozen_sh),
                   # a LoRA policy rolls out the plain model: the base's structure, adapters merged in
                   rollout_shardings=shd.state_shardings(abstract_params if lora is None else abstract_frozen,
                                                         mesh, shd.ROLLOUT_RULES),
                   sampling=rollout, eval_sampling=evaluation, loss_hparams=hparams, use_ref=use_ref,
                   recompute_old_logp=recompute, scoring_chunks=o.mini_batches * o.micro_batches,
                   eval_prompts_per_call=eval_prompts_per_call(cfg),
                   attention=Backend(name=attention, mesh=mesh, batch_axes=batch_axes), lora=lora)


def eval_prompts_per_call(cfg: Config) -> int:
    return cfg.eval.prompts_per_call or cfg.rollout.prompts_per_call or 8


def _check_packing(cfg: Config) -> None:
    """A token budget that holds a whole micro-batch padded would only add work."""
    r, o = cfg.rollout, cfg.optim
    rows = r.prompts_per_step * r.group_size // (o.mini_batches * o.micro_batches)
    padded = rows * (cfg.data.max_prompt_tokens + r.max_new_tokens - 1)
    if o.tokens_per_micro_batch >= padded > 0:
        raise ConfigError(f"optim.tokens_per_micro_batch={o.tokens_per_micro_batch} holds the {rows} rows of a micro-batch "
                          f"padded ({padded} tokens): packing would only add work; lower it or set 0 (padded rows)")


def opt_state_shardings(abstract_opt, param_shardings, mesh: Mesh):
    """Optimizer state laid out like the parameters it mirrors (Adam's mu and nu); scalars replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    param_struct = jax.tree.structure(param_shardings)

    def mirrors_params(node) -> bool:
        return jax.tree.structure(node) == param_struct

    return jax.tree.map(lambda node: param_shardings if mirrors_params(node) else replicated, abstract_opt,
                        is_leaf=mirrors_params)


def _check_mesh_divides(cfg: Config, mesh: Mesh) -> None:
    """Every batch the run places must split evenly over the devices that share its rows."""
    r, o = cfg.rollout, cfg.optim
    train_devices = shd.batch_rows_multiple(mesh, shd.TRAIN_RULES)
    rollout_devices = shd.batch_rows_multiple(mesh, shd.ROLLOUT_RULES)
    rows = r.prompts_per_step * r.group_size
    micro = rows // (o.mini_batches * o.micro_batches)
    if micro % train_devices:
        raise ConfigError(f"rollout.prompts_per_step x rollout.group_size = {rows} rows cut into optim.mini_batches="
                          f"{o.mini_batches} x optim.micro_batches={o.micro_batches} leaves {micro} rows per "
                          f"micro-batch, not a multiple of the {train_devices} data-parallel devices of the mesh")
    per_call = r.prompts_per_call or r.prompts_per_step
    if per_call % rollout_devices:
        key = "rollout.prompts_per_call" if r.prompts_per_call else "rollout.prompts_per_step"
        raise ConfigError(f"{key}={per_call} prompts per sampler call is not a multiple of the {rollout_devices} "
                          "data-parallel devices of the mesh")
    eval_call = eval_prompts_per_call(cfg)
    if cfg.data.eval and eval_call % rollout_devices:
        raise ConfigError(f"eval.prompts_per_call: {eval_call} prompts per evaluation call is not a multiple of the "
                          f"{rollout_devices} data-parallel devices of the mesh")
    n = jax.process_count()
    if per_call % n:
        raise ConfigError(f"{per_call} prompts per sampler call do not split over {n} processes")
    # Each process feeds the p-th block of a call's prompts; the mesh must place them there.
    blocks = shd.process_row_blocks(mesh, per_call, shd.ROLLOUT_RULES)
    want = {p: (p * per_call // n, (p + 1) * per_call // n) for p in range(n)}
    if n > 1 and blocks != want:
        raise shd.ShardingError(f"the mesh places processes' rows at {blocks}, not in process order {want}")
