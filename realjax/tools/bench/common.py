"""What every benchmark shares: model sizes, the machine record, the bandwidth and matmul probes that
bound decode and the update, FLOP and byte counts, and the same weights as a transformers model."""


from __future__ import annotations

import contextlib
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from realjax.models import ModelConfig, preset, save_pretrained
from realjax.tools.bench.timing import seconds

# The bench's own smoke-test size: every code path of every benchmark in seconds on a CPU.
TINY = {"family": "qwen2", "vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 16, "intermediate_size": 128, "rope_theta": 1e6, "tie_word_embeddings": True}


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------
def preset_config(name: str, *, layers: int = 0, dtype: str = "float32", param_dtype: str | None = None):
    """A preset (or ``tiny``) with ``layers`` blocks (0 = as published) and the given dtypes."""
    cfg = ModelConfig(**TINY) if name == "tiny" else preset(name)
    if layers:
        cfg = cfg.replace(num_layers=layers)
    return cfg.replace(dtype=dtype, param_dtype=param_dtype or dtype)


def machine() -> dict:
    """Where the numbers came from: backend, devices, cores and the load when the run started."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "cpu_cores": os.cpu_count(), "load_avg_1m": round(load, 2)}


def decode_bytes_per_step(cfg, batch: int, cache_len: float) -> float:
    """Bytes one decode step must read: every weight once as stored (an untied input embedding only for
    the ``batch`` rows it gathers) plus the K and V caches of all layers up to ``cache_len`` slots."""
    n = cfg.num_params()
    if not cfg.tie_word_embeddings:
        n -= (cfg.vocab_size - batch) * cfg.hidden_size
    kv = 2 * cfg.num_layers * batch * cache_len * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    return n * jnp.dtype(cfg.param_dtype).itemsize + kv


def matmul_params(cfg) -> int:
    """Parameters that take part in a matmul (an untied input embedding is a gather, not a matmul)."""
    return cfg.num_params() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)


def matvec_probe(rows: int, dim: int, mbytes: float, calls: int = 3):
    """A function measuring the GB/s at which ``x[rows, dim] @ W`` reads an fp32 W of about ``mbytes`` MB:
    the operation every decode step is made of (not an elementwise copy, which streams differently).
    Both weight layouts of decode are measured, [dim, out] contracted on its first axis like the block
    weights and [out, dim] on its last like a tied LM head; the faster sets the bound. Each probe returns
    the median of ``calls`` products per layout."""
    out = max(1, int(mbytes * 2**20 / 4 / dim))
    x = jnp.full((rows, dim), 0.5, jnp.float32)
    layouts = {name: (jnp.full(shape, 0.01, jnp.float32), jax.jit(lambda x, w, spec=spec: jnp.einsum(spec, x, w)))
               for name, shape, spec in (("in_out", (dim, out), "bd,do->bo"), ("out_in", (out, dim), "bd,od->bo"))}

    def probe() -> dict:
        res = {}
        for name, (w, f) in layouts.items():
            t = np.median([seconds(lambda f=f, w=w: f(x, w).block_until_ready()) for _ in range(calls)])
            res[f"bandwidth_{name}_gb_s"] = w.nbytes / t / 1e9
        res["bandwidth_gb_s"] = max(res.values())
        return res

    probe.matrix_mb = out * dim * 4 / 2**20
    return probe


def matmul_probe(m: int, k: int, n: int, dtype: str = "float32", calls: int = 3):
    """A function measuring the FLOP/s of ``x[m, k] @ w[k, n]`` (median of ``calls``): the rate of the
    large matmuls an update is made of, measured next to it (the bound on the update's speed)."""
    x, w = jnp.full((m, k), 0.5, dtype), jnp.full((k, n), 0.01, dtype)
    f = jax.jit(lambda x, w: x @ w)
    f(x, w).block_until_ready()

    def probe() -> dict:
        t = np.median([seconds(lambda: f(x, w).block_until_ready()) for _ in range(calls)])
        return {"matmul_gflop_s": 2 * m * k * n / t / 1e9}

    return probe


def update_flops(cfg, *, rows: int, prompt: int, response: int) -> float:
    """FLOPs of one update (forward + backward = 6 per weight per token): every block weight on all
    ``prompt + response - 1`` input positions, the LM head on the ``response`` positions it scores, and
    attention's two [T, T] products (computed in full, masked, as the model does)."""
    T = prompt + response - 1
    head = cfg.vocab_size * cfg.hidden_size
    blocks = matmul_params(cfg) - head
    attention = 2 * 2 * T * T * cfg.num_heads * cfg.head_dim * cfg.num_layers
    return 6 * blocks * rows * T + 6 * head * rows * response + 3 * rows * attention


@contextlib.contextmanager
def hf_copy(model):
    """The realjax model as a transformers model on the same weights (fp32 torch, eval mode)."""
    import torch  # lazy: torch only for the baselines (and not on GPU/TPU hosts)
    from transformers import AutoModelForCausalLM


    with tempfile.TemporaryDirectory(prefix="realjax-bench-") as d:
        save_pretrained(model, d)
        yield AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def torch_threads() -> int:
    import torch  # lazy: torch only for the baselines

    return torch.get_num_threads()


def torch_name(what: str) -> str:
    import torch  # lazy: torch only for the baselines
    import transformers

    return f"{what}: torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads"
