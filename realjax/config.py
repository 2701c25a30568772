"""Experiment configs: YAML mapped onto typed, frozen, validated dataclasses, with ``key=value`` overrides.

Every RL knob names the paper symbol it sets. An unknown key or a value of the wrong type is a one-line
``ConfigError`` that names the key and, for a typo, the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from realjax.is_correction import MODES, ROLLOUT_OBJECTIVES
from realjax.losses import get_terms, hparam_types, hparams_of
from realjax.models.attention import check_backend
from realjax.models.config import LoraConfig, check_dtype, check_remat
from realjax.sharding import MeshConfig


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """LoRA policies (``realjax.models.lora``): rank 0 (the default, the paper) trains every weight."""

    rank: int = 0  # r: adapter rank; > 0 freezes the base weights and trains only the adapters
    alpha: float = 32.0  # the adapters' output is scaled by alpha / rank
    targets: str = "q,k,v,o,gate,up,down"  # comma-separated projections that get adapters
    dropout: float = 0.0  # on the adapters' input, in the learner only
    base_dtype: str = ""  # storage of the frozen base weights ("" = model.param_dtype; bfloat16 halves them)

    def model_config(self):
        """The model's ``LoraConfig``, or None when off."""
        if self.rank == 0:
            return None
        targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        return LoraConfig(rank=self.rank, alpha=self.alpha, targets=targets, dropout=self.dropout,
                          base_dtype=self.base_dtype)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    path: str = "demo"  # local HF dir; "demo" is the tiny model shipped in realjax/assets/demo
    preset: str = ""  # architecture by name (realjax.models.PRESETS) for AOT compiles and benchmarks
    param_dtype: str = "float32"  # master weights (the paper: fp32 under FSDP mixed precision)
    dtype: str = "auto"  # compute dtype: auto = fp32 on CPU, bf16 on GPU/TPU
    remat: str = "none"  # none | full | dots: recompute blocks in the backward pass
    scan_layers: bool | None = None  # one scanned, stacked block module; unset: from 8 blocks up
    logprob_chunk_tokens: int = 4096  # tokens per chunk of vocab logits (memory vs speed)
    # The learner's attention (realjax.models.attention): auto (splash on TPU, else XLA) | xla | cudnn |
    # splash. Decode always runs the XLA back end.
    attention: str = "auto"
    lora: LoraSection = LoraSection()


@dataclasses.dataclass(frozen=True)
class DataSection:
    train: str = ""  # a data spec (see realjax.data): parquet/jsonl/dir/hub name/synthetic:...
    eval: str = ""  # comma-separated specs for held-out pass@1
    max_prompt_tokens: int = 1024  # longer prompts are skipped and counted (the paper: 1024)
    chat_template: bool = True
    max_bad_fraction: float = 0.05  # abort when more rows than this are malformed or too long
    eval_limit: int = 0  # first N problems of each eval set (0 = all)


@dataclasses.dataclass(frozen=True)
class LossSection:
    """The objective (``realjax.losses.LOSSES``) and the hyper-parameters set for it. Each objective
    declares its own in its signature (``realjax.losses.hparam_types``), so a new objective needs no
    change here; unset ones keep the function's defaults. A key that belongs to another objective is
    ignored (and reported by the trainer), so one override such as ``loss.name=grpo`` switches the
    objective of any config. In YAML: ``loss: {name: real, tau: 0.5}``."""

    name: str = "real"
    values: tuple[tuple[str, Any], ...] = ()  # (key, value), sorted; unset keys are absent

    def hparams(self) -> dict[str, Any]:
        """The set hyper-parameters that this objective takes."""
        takes = hparams_of(self.name)
        return {k: v for k, v in self.values if k in takes}

    def ignored(self) -> list[str]:
        """Set keys that belong to other objectives (``loss.tau`` under ``loss.name=grpo``)."""
        takes = hparams_of(self.name)
        return [k for k, _ in self.values if k not in takes]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dict(self.values)}

    def __getattr__(self, key: str) -> Any:
        """``cfg.loss.tau``: the set value of any objective's hyper-parameter (None when unset)."""
        if key.startswith("_") or key not in hparam_types():
            raise AttributeError(key)
        return dict(self.values).get(key)


def _loss_section(data: Any, prefix: str) -> LossSection:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of loss keys, got {data!r}")
    types = hparam_types()
    _check_keys(data, ["name", *types], prefix + ".")
    values = tuple(sorted((k, _coerce(v, types[k], f"{prefix}.{k}")) for k, v in data.items()
                          if k != "name" and v is not None))
    return LossSection(_coerce(data.get("name", "real"), str, prefix + ".name"), values)


@dataclasses.dataclass(frozen=True)
class RolloutSection:
    group_size: int = 8  # R rollouts per prompt (the paper's G)
    prompts_per_step: int = 128  # prompts per RL step (R * this = responses per step)
    temperature: float = 0.6  # the rollout temperature; the trained policy is softmax(logits / T)
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 8192  # response budget N
    prompts_per_call: int = 0  # prompts per sampler call (0 = all at once; smaller bounds KV memory)
    # Decode reads the KV cache in windows growing by this many tokens, one compiled program each (also
    # for evaluation): at 8192 new tokens and 1024, a step reads 61% of the cache on average.
    window_tokens: int = 1024
    # Continuous batching (realjax.sampling.Engine): finished rows leave the decode batch every
    # ``compact_every`` steps; with ``slots`` below a call's rows, queued rows refill the free slots.
    slots: int = 0  # decode slots per sampler call (0 = one per row of the call: compaction only)
    compact_every: int = 32  # decode steps between compaction / refill decisions (one host sync each)
    old_logp: str = "auto"  # sampler | recompute | auto (sampler in fp32, recompute otherwise)
    dynamic_sampling: bool = False  # DAPO: resample until every group has mixed rewards
    max_sampling_rounds: int = 3  # dynamic sampling gives up after this many rounds (fills with degenerate)
    overlong_filter: bool = False  # DAPO: truncated responses are masked out of the loss
    # Rollout/learner mismatch correction (README "Mismatch correction"): none (the paper) | token_tis |
    # token_mis | seq_tis | seq_mis; needs the recompute pass (old_logp auto then recomputes). is_cap: C > 1.
    is_correction: str = "none"
    is_cap: float = 2.0


@dataclasses.dataclass(frozen=True)
class RewardSection:
    fn: str = "math"  # math (the paper's verifier) or module:function taking (completions, rows)
    require_think: bool = False  # the official verifier scores 0 without </think>
    workers: int = 0  # verifier processes (0 = half the CPUs)
    timeout_s: float = 5.0  # per item; a stuck worker is killed and the item scores 0


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 2e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # global norm
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"  # constant | cosine | linear (decay to 0 over trainer.steps)
    warmup_steps: int = 0
    mini_batches: int = 4  # optimizer updates per rollout batch (the paper: 128 / 32 = 4)
    micro_batches: int = 1  # gradient accumulation chunks per mini-batch (memory)
    # Packed rollouts (realjax.rl.packing): a micro-batch's rows run end to end in sequences of one padded
    # row's length, about this many tokens in all (more when the rows need it); 0 = padded rows.
    tokens_per_micro_batch: int = 0
    max_bad_steps: int = 3  # abort after this many non-finite updates in a row


@dataclasses.dataclass(frozen=True)
class TrainerSection:
    steps: int = 100  # RL steps (each: rollout batch + mini_batches updates)
    eval_every: int = 0  # 0 = only before and after training
    save_every: int = 20
    keep_checkpoints: int = 3
    log_every: int = 1
    logp_check_every: int = 10  # with old_logp=sampler: recompute once in a while, log the mismatch
    export: bool = True  # write the final policy as an HF dir to <run>/export


@dataclasses.dataclass(frozen=True)
class EvalSection:
    n: int = 16  # samples per problem (the paper: 16)
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 0  # 0 = rollout.max_new_tokens
    prompts_per_call: int = 0  # 0 = rollout.prompts_per_call or all
    before: bool = True  # evaluate the initial policy too


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    coordinator: str = ""  # host:port of process 0; set automatically on TPU pods
    num_processes: int = 1
    process_id: int = 0
    auto: bool = True  # call jax.distributed.initialize() on a TPU pod / under SLURM


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "realjax"
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    loss: LossSection = LossSection()
    rollout: RolloutSection = RolloutSection()
    reward: RewardSection = RewardSection()
    optim: OptimSection = OptimSection()
    trainer: TrainerSection = TrainerSection()
    eval: EvalSection = EvalSection()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedSection = DistributedSection()
    logging: LoggingSection = LoggingSection()

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ----------------------------------------------------------------------------------------------------
# dict <-> dataclass, with errors that name the key
# ----------------------------------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-6` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is LossSection:
        return _loss_section(value, key)
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=key + ".")
        raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
    else:
        raise ConfigError(f"{key}: unsupported type {tp}")
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {type(value).__name__} {value!r}")


def _check_keys(data: dict, names: list[str], prefix: str) -> None:
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(prefix + n for n in names)}"
        raise ConfigError(f"unknown config key {prefix}{key}{hint}")


def from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    _check_keys(data, [f.name for f in dataclasses.fields(cls)], prefix)
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def to_dict(cfg) -> dict:
    """The config as plain data (what ``config.yaml`` holds; ``load_config`` reads it back)."""
    return {**dataclasses.asdict(cfg), "loss": cfg.loss.as_dict()}


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def demo_config_path() -> Path:
    """The demo config shipped inside the package (a copy of configs/demo.yaml)."""
    return Path(str(resources.files("realjax") / "configs" / "demo.yaml"))


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or defaults when None), apply ``key=value`` overrides, validate, return Config."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def _check(key: str, check, value) -> None:
    """A check that the library owns (it raises ValueError), reported against the config key."""
    try:
        check(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def validate(cfg: Config) -> None:
    """Every rule a setting must meet that can be checked without devices (the mesh-dependent ones are
    checked when the run plan is made, still before any step). Each failure names the key and the rule."""
    r, o, t, e = cfg.rollout, cfg.optim, cfg.trainer, cfg.eval
    _check("loss.name", get_terms, cfg.loss.name)
    at_least = {"rollout.group_size": (r.group_size, 2), "rollout.prompts_per_step": (r.prompts_per_step, 1),
                "rollout.max_new_tokens": (r.max_new_tokens, 1), "rollout.window_tokens": (r.window_tokens, 1),
                "rollout.max_sampling_rounds": (r.max_sampling_rounds, 1), "rollout.compact_every": (r.compact_every, 1),
                "optim.mini_batches": (o.mini_batches, 1), "optim.micro_batches": (o.micro_batches, 1),
                "optim.max_bad_steps": (o.max_bad_steps, 1), "trainer.steps": (t.steps, 1),
                "trainer.save_every": (t.save_every, 1), "trainer.log_every": (t.log_every, 1),
                "trainer.keep_checkpoints": (t.keep_checkpoints, 1), "eval.n": (e.n, 1),
                "trainer.eval_every": (t.eval_every, 0), "trainer.logp_check_every": (t.logp_check_every, 0),
                "rollout.top_k": (r.top_k, 0), "eval.top_k": (e.top_k, 0), "rollout.prompts_per_call": (r.prompts_per_call, 0),
                "eval.prompts_per_call": (e.prompts_per_call, 0), "eval.max_new_tokens": (e.max_new_tokens, 0),
                "optim.warmup_steps": (o.warmup_steps, 0), "data.eval_limit": (cfg.data.eval_limit, 0),
                "rollout.slots": (r.slots, 0), "optim.tokens_per_micro_batch": (o.tokens_per_micro_batch, 0)}
    for key, (value, low) in at_least.items():
        if value < low:
            why = " (every objective compares the rollouts of a group)" if key == "rollout.group_size" else ""
            raise ConfigError(f"{key} must be >= {low}, got {value}{why}")
    if not r.temperature > 0:
        raise ConfigError(f"rollout.temperature must be > 0 (the trained policy is softmax(logits / T)), got {r.temperature}")
    if e.temperature < 0:
        raise ConfigError(f"eval.temperature must be >= 0 (0 is greedy), got {e.temperature}")
    for key, value in (("rollout.top_p", r.top_p), ("eval.top_p", e.top_p)):
        if not 0 < value <= 1:
            raise ConfigError(f"{key} must be in (0, 1], got {value}")
    if not o.lr > 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if r.prompts_per_step % o.mini_batches:
        raise ConfigError(f"optim.mini_batches={o.mini_batches} must divide rollout.prompts_per_step="
                          f"{r.prompts_per_step}: every update sees whole groups")
    if (r.prompts_per_step // o.mini_batches) % o.micro_batches:
        raise ConfigError(f"optim.micro_batches={o.micro_batches} must divide the {r.prompts_per_step // o.mini_batches}"
                          " prompts of a mini-batch")
    if r.prompts_per_call and r.prompts_per_step % r.prompts_per_call:
        raise ConfigError(f"rollout.prompts_per_call={r.prompts_per_call} must divide rollout.prompts_per_step")
    if r.old_logp not in ("auto", "sampler", "recompute"):
        raise ConfigError(f"rollout.old_logp must be auto, sampler or recompute, got {r.old_logp!r}")
    _check_is_correction(cfg)
    if o.schedule not in ("constant", "cosine", "linear"):
        raise ConfigError(f"optim.schedule must be constant, cosine or linear, got {o.schedule!r}")
    _check("model.param_dtype", check_dtype, cfg.model.param_dtype)
    _check("model.dtype", functools.partial(check_dtype, auto=True), cfg.model.dtype)
    _check("model.remat", check_remat, cfg.model.remat)
    _check("model.attention", check_backend, cfg.model.attention)
    _check("model.lora", LoraSection.model_config, cfg.model.lora)  # the model's LoraConfig checks it
    row = cfg.data.max_prompt_tokens + r.max_new_tokens - 1
    if 0 < o.tokens_per_micro_batch < row:
        raise ConfigError(f"optim.tokens_per_micro_batch={o.tokens_per_micro_batch} is less than one packed sequence: "
                          f"data.max_prompt_tokens + rollout.max_new_tokens - 1 = {row} tokens")
    if not cfg.data.train:
        raise ConfigError("data.train is not set (a data spec: file, directory, hub name or synthetic:...)")


def _check_is_correction(cfg: Config) -> None:
    r = cfg.rollout
    if r.is_correction not in MODES:
        raise ConfigError(f"rollout.is_correction must be one of {', '.join(MODES)}, got {r.is_correction!r}")
    if not r.is_cap > 1:
        raise ConfigError(f"rollout.is_cap must be > 1 (weights are cut outside [1/C, C]), got {r.is_cap}")
    if r.is_correction == "none":
        return
    if r.old_logp == "sampler":
        raise ConfigError(f"rollout.is_correction={r.is_correction} needs the learner's own old log-probs: set "
                          "rollout.old_logp to recompute or auto (it is sampler)")
    if r.is_correction.startswith("token") and cfg.loss.name in ROLLOUT_OBJECTIVES:
        raise ConfigError(f"rollout.is_correction={r.is_correction}: loss.name={cfg.loss.name} weighs whole rollouts; "
                          f"use seq_{r.is_correction.split('_')[1]}")
