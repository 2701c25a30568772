"""ModelConfig: one typed description of the Qwen2/2.5, Qwen3 and Llama 3 decoders, HF config.json in
and out (the pre-5 ``rope_theta`` / ``torch_dtype`` form and the transformers 5 ``rope_parameters`` /
``dtype`` form), and presets with the exact published dimensions."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

FAMILIES = ("qwen2", "qwen3", "llama")
REMAT = ("none", "full", "dots")
# ``scan_layers`` unset scans the blocks of models with at least this many: the scan's compile-time
# saving grows with L, while the few blocks of test and demo models compile in seconds either way and
# run as the unrolled reference that the scanned path is tested against.
SCAN_MIN_LAYERS = 8
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections an adapter may sit on
_ARCH = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}


def check_remat(name: str) -> str:
    if name not in REMAT:
        raise ValueError(f"must be one of {', '.join(REMAT)}, got {name!r}")
    return name


def check_dtype(name: str, *, auto: bool = False) -> str:
    """A dtype name the model takes (``auto``, resolved per backend, where ``auto`` is allowed)."""
    if auto and name == "auto":
        return name
    try:
        jnp.dtype(name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r} (float32, bfloat16{', auto' if auto else ''})") from None
    return name


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (HF ``rope_type: llama3``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the named projections: ``W' = W + (alpha / rank) A B`` (``realjax.models.lora``).

    ``dropout`` drops the adapter path's input in the learner (never in rollouts, which read merged
    weights); ``base_dtype`` stores the frozen base weights in another dtype than the adapters ("" = the
    model's ``param_dtype``; bfloat16 halves them).
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0
    base_dtype: str = ""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1 (0 turns LoRA off), got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            why = f"unknown projection {bad[0]!r}" if bad else "none given" if not self.targets else "a name repeats"
            raise ValueError(f"targets: {why}; a comma-separated subset of {','.join(LORA_TARGETS)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.base_dtype:
            try:
                check_dtype(self.base_dtype)
            except ValueError as e:
                raise ValueError(f"base_dtype: {e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

    ``family`` picks the details: qwen2 has q/k/v biases; qwen3 has per-head q/k RMSNorm and an explicit
    ``head_dim``; llama may carry Llama 3 ``rope_scaling``. ``param_dtype`` is how weights are stored
    (fp32 master weights for training), ``dtype`` what the matmuls run in (fp32 on CPU, bf16 on
    accelerators); norms, softmax and log-probs are always fp32. ``remat`` recomputes each block in the
    backward pass: "full" saves only block inputs, "dots" also keeps matmul outputs. ``scan_layers``
    stacks the blocks into one module run by a scan over layers (True / False; None: from
    ``SCAN_MIN_LAYERS`` blocks up, see ``scanned``): it changes the parameter layout, not the function.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool | None = None
    # Trace the scan over layers fully unrolled: the same parameters and function as the scan, for
    # `realjax compile` to count FLOPs (XLA's cost analysis counts a loop body once, i.e. one layer).
    unroll_scan: bool = False
    lora: LoraConfig | None = None  # adapters (the base weights frozen); None: every weight trains

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        check_remat(self.remat)
        check_dtype(self.param_dtype)
        check_dtype(self.dtype)
        if self.scan_layers not in (None, True, False):
            raise ValueError(f"scan_layers must be true, false or unset, got {self.scan_layers!r}")

    @property
    def attention_bias(self) -> bool:
        return self.family == "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    @property
    def scanned(self) -> bool:
        """Whether the blocks are stacked and scanned (``scan_layers``, or the layer-count rule when unset)."""
        return self.num_layers >= SCAN_MIN_LAYERS if self.scan_layers is None else self.scan_layers

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Closed-form parameter count (checked against ``jax.eval_shape`` of the module in tests)."""
        D, N, K, H, F, V = (self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                            self.intermediate_size, self.vocab_size)
        attn = D * N * H + 2 * D * K * H + N * H * D
        attn += (N + 2 * K) * H if self.attention_bias else 0
        attn += 2 * H if self.qk_norm else 0
        block = attn + 3 * D * F + 2 * D
        return self.num_layers * block + V * D * (1 if self.tie_word_embeddings else 2) + D

    def num_lora_params(self) -> int:
        """Adapter parameters (``rank x (fan_in + fan_out)`` per adapted projection); 0 without LoRA."""
        if self.lora is None:
            return 0
        D, N, K, H, F = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        fans = {"q": D + N * H, "k": D + K * H, "v": D + K * H, "o": N * H + D, "gate": D + F, "up": D + F,
                "down": F + D}
        return self.num_layers * self.lora.rank * sum(fans[t] for t in self.lora.targets)


# ----------------------------------------------------------------------------------------------------
# HF config.json
# ----------------------------------------------------------------------------------------------------
def _rope_from_hf(cfg: dict) -> tuple[float, RopeScaling | None]:
    # transformers 5 moves theta and scaling into `rope_parameters`; older files use top-level keys.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    src = params if params.get("rope_type", "default") != "default" else scaling
    kind = src.get("rope_type", src.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, llama3)")
    return theta, RopeScaling(float(src["factor"]), float(src["low_freq_factor"]),
                              float(src["high_freq_factor"]), int(src["original_max_position_embeddings"]))


def config_from_hf(cfg: dict, *, source: str = "config.json", **overrides) -> ModelConfig:
    """A ModelConfig from a parsed HF config.json; ``source`` names the file in errors."""
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{source}: unsupported architecture model_type={family!r} "
                         f"(architectures={cfg.get('architectures')}); realjax supports {FAMILIES}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: unsupported hidden_act {cfg['hidden_act']!r} (only silu / SwiGLU)")
    if family == "qwen2" and cfg.get("use_sliding_window"):
        raise ValueError(f"{source}: sliding-window attention is not supported")
    try:
        theta, scaling = _rope_from_hf(cfg)
        heads = int(cfg["num_attention_heads"])
        fields = dict(
            family=family, vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate_size=int(cfg["intermediate_size"]), rope_theta=theta, rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing key {e.args[0]!r}") from None
    fields.update(overrides)
    return ModelConfig(**fields)


def load_hf_config(path: str | Path, **overrides) -> ModelConfig:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no config.json in {path}")
    return config_from_hf(json.loads(file.read_text()), source=str(file), **overrides)


def config_to_hf(cfg: ModelConfig, *, torch_dtype: str = "float32") -> dict[str, Any]:
    """config.json content that transformers (4.x and 5.x) reads back to the same architecture."""
    out: dict[str, Any] = {
        "architectures": [_ARCH[cfg.family]], "model_type": cfg.family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "torch_dtype": torch_dtype,
        "attention_dropout": 0.0, "use_cache": True,
    }
    if cfg.family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if cfg.family == "qwen2":
        out.update(use_sliding_window=False)
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(cfg, key) is not None:
            out[key] = getattr(cfg, key)
    return out


# ----------------------------------------------------------------------------------------------------
# Presets: exact dimensions of the published checkpoints (usable without weights)
# ----------------------------------------------------------------------------------------------------
_Q2 = dict(family="qwen2", vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=32768)
_Q3 = dict(family="qwen3", vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, head_dim=128,
           max_position_embeddings=40960)
_L3 = dict(family="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
           max_position_embeddings=131072)
_L3_SCALING = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

PRESETS: dict[str, ModelConfig] = {
    "deepseek-r1-distill-qwen-1.5b": ModelConfig(
        **{**_Q2, "max_position_embeddings": 131072}, hidden_size=1536, num_layers=28, num_heads=12,
        num_kv_heads=2, head_dim=128, intermediate_size=8960, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151643),
    "deepseek-r1-distill-qwen-7b": ModelConfig(
        **{**_Q2, "vocab_size": 152064, "max_position_embeddings": 131072}, hidden_size=3584, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-0.5b": ModelConfig(**_Q2, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                                head_dim=64, intermediate_size=4864, rope_theta=1e6, tie_word_embeddings=True),
    "qwen2.5-1.5b": ModelConfig(**_Q2, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                                head_dim=128, intermediate_size=8960, rope_theta=1e6, tie_word_embeddings=True),
    "qwen2.5-7b": ModelConfig(**{**_Q2, "vocab_size": 152064}, hidden_size=3584, num_layers=28, num_heads=28,
                              num_kv_heads=4, head_dim=128, intermediate_size=18944, rope_theta=1e6,
                              tie_word_embeddings=False),
    "qwen3-0.6b": ModelConfig(**_Q3, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                              intermediate_size=3072, tie_word_embeddings=True),
    "qwen3-1.7b": ModelConfig(**_Q3, hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8,
                              intermediate_size=6144, tie_word_embeddings=True),
    "qwen3-4b": ModelConfig(**_Q3, hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8,
                            intermediate_size=9728, tie_word_embeddings=True),
    "qwen3-8b": ModelConfig(**_Q3, hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                            intermediate_size=12288, tie_word_embeddings=False),
    "llama-3.2-1b": ModelConfig(**_L3, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                                head_dim=64, intermediate_size=8192, tie_word_embeddings=True,
                                rope_scaling=RopeScaling(factor=32.0, **_L3_SCALING)),
    "llama-3.2-3b": ModelConfig(**_L3, hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8,
                                head_dim=128, intermediate_size=8192, tie_word_embeddings=True,
                                rope_scaling=RopeScaling(factor=32.0, **_L3_SCALING)),
    "llama-3.1-8b": ModelConfig(**_L3, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                head_dim=128, intermediate_size=14336, tie_word_embeddings=False,
                                rope_scaling=RopeScaling(factor=8.0, **_L3_SCALING)),
}


def preset(name: str, **overrides) -> ModelConfig:
    try:
        return PRESETS[name].replace(**overrides)
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; presets: {sorted(PRESETS)}") from None


def resolve_dtype(name: str) -> str:
    """``auto`` is float32 on CPU (bf16 matmuls are slow there) and bfloat16 on accelerators."""
    if name == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(name).name
