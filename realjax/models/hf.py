"""HF checkpoints in and out: ``from_pretrained`` (local dir -> sharded NNX model) and ``save_pretrained``.

Loading never builds the whole model on one host: each safetensors tensor is memory-mapped, and every
device's shard is read straight from the file (``jax.make_array_from_callback``), converted to the
parameter dtype, and placed; a scanned model's stacked [L, ...] weight is built the same way, each
device's shard stacked from its slices of the L per-layer tensors. Saving streams one tensor at a time into safetensors files (split at
``max_shard_bytes``, with an index), written by process 0.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from realjax import sharding as shd
from realjax.models import lora as lora_lib
from realjax.models.config import LoraConfig, ModelConfig, config_to_hf, load_hf_config
from realjax.models.transformer import Transformer, placed_params

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "added_tokens.json")
# Buffers some exporters include that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ----------------------------------------------------------------------------------------------------
# safetensors, read lazily and written as a stream
# ----------------------------------------------------------------------------------------------------
class SafetensorsFile:
    """A memory-mapped safetensors file: ``array(name)`` is a read-only view, read from disk on access."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.header, self.offset = header, 8 + n

    def keys(self):
        return self.header.keys()

    def array(self, name: str) -> np.ndarray:
        info = self.header[name]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.offset + start, shape=shape)


def write_safetensors(path: Path, tensors: list[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]]):
    """Write ``(name, shape, dtype, produce)`` entries; ``produce()`` is called once, in order, so only one
    tensor is in host memory at a time."""
    header, offset = {}, 0
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in tensors:
            arr = np.ascontiguousarray(produce(), dtype=dtype)
            if arr.shape != tuple(shape):
                raise ValueError(f"{name}: produced shape {arr.shape}, declared {shape}")
            f.write(arr.tobytes())


# ----------------------------------------------------------------------------------------------------
# Name and layout mapping: HF torch Linear weights are [out, in]; ours are einsum-shaped
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorMap:
    hf_name: str
    path: tuple  # nnx state path
    to_ours: Callable[[np.ndarray], np.ndarray]  # views only: a reshape / transpose of the mmap
    to_hf: Callable[[np.ndarray], np.ndarray]
    layer: int | None = None  # a scanned model's weights are stacked: this tensor is ``state[path][layer]``


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    same = lambda x: x
    tr = lambda x: x.T
    heads_in = lambda n: (lambda w: w.T.reshape(D, n, H), lambda x: x.reshape(D, n * H).T)  # [nH, D] <-> DnH
    bias = lambda n: (lambda b: b.reshape(n, H), lambda x: x.reshape(n * H))
    maps = [TensorMap("model.embed_tokens.weight", ("embed",), same, same),
            TensorMap("model.norm.weight", ("final_norm", "scale"), same, same)]
    if not cfg.tie_word_embeddings:
        maps.append(TensorMap("lm_head.weight", ("lm_head",), tr, tr))
    for i in range(cfg.num_layers):
        # scanned: one stacked weight per kind, indexed by layer; unrolled: one weight per block
        p, a, at = f"model.layers.{i}.", ("layers",) if cfg.scanned else ("layers", i), i if cfg.scanned else None
        layer = [
            ("input_layernorm.weight", ("attn_norm", "scale"), same, same),
            ("post_attention_layernorm.weight", ("mlp_norm", "scale"), same, same),
            ("self_attn.q_proj.weight", ("attn", "q"), *heads_in(N)),
            ("self_attn.k_proj.weight", ("attn", "k"), *heads_in(K)),
            ("self_attn.v_proj.weight", ("attn", "v"), *heads_in(K)),
            ("self_attn.o_proj.weight", ("attn", "o"), lambda w: w.T.reshape(N, H, D),
             lambda x: x.reshape(N * H, D).T),
            ("mlp.gate_proj.weight", ("mlp", "gate"), tr, tr),
            ("mlp.up_proj.weight", ("mlp", "up"), tr, tr),
            ("mlp.down_proj.weight", ("mlp", "down"), tr, tr),
        ]
        if cfg.attention_bias:
            layer += [("self_attn.q_proj.bias", ("attn", "q_bias"), *bias(N)),
                      ("self_attn.k_proj.bias", ("attn", "k_bias"), *bias(K)),
                      ("self_attn.v_proj.bias", ("attn", "v_bias"), *bias(K))]
        if cfg.qk_norm:
            layer += [("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), same, same),
                      ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), same, same)]
        maps += [TensorMap(p + name, a + path, f, g, at) for name, path, f, g in layer]
    return maps


def _weight_files(path: Path) -> dict[str, SafetensorsFile]:
    """tensor name -> the file holding it (single file or sharded with an index)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {f: SafetensorsFile(path / f) for f in sorted(set(weight_map.values()))}
        return {name: files[f] for name, f in weight_map.items()}
    singles = sorted(path.glob("*.safetensors"))
    if not singles:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    out = {}
    for f in singles:
        st = SafetensorsFile(f)
        out.update({name: st for name in st.keys()})
    return out


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------
def abstract_model(cfg: ModelConfig):
    """(graphdef, abstract state): shapes and axes of the model, nothing allocated."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def init_model(cfg: ModelConfig, *, seed: int = 0, mesh=None, rules=shd.TRAIN_RULES) -> Transformer:
    """A randomly initialised model; with a mesh, each parameter is created directly in its shards.

    Built eagerly: each weight comes from a small jitted initializer shared by every weight of its shape
    (``transformer._param``), so the compile cost does not grow with the number of layers.
    """
    if mesh is None:
        return Transformer(cfg, rngs=nnx.Rngs(seed))
    with placed_params(mesh, rules):
        graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
    # the few weights made without an initializer (norm scales) move to their layout too
    return nnx.merge(graphdef, jax.device_put(state, shd.state_shardings(state, mesh, rules)))


def from_pretrained(path, dtype=jnp.float32, mesh=None, *, compute_dtype=None, remat: str = "none",
                    scan_layers: bool | None = None, rules=shd.TRAIN_RULES, lora: LoraConfig | None = None,
                    seed: int = 0) -> Transformer:
    """Load a local HF Qwen2/Qwen2.5/Qwen3/Llama-3 directory as an NNX ``Transformer``.

    Args:
      path: directory with ``config.json`` and ``*.safetensors`` (sharded with an index allowed).
      dtype: parameter dtype (and the compute dtype unless ``compute_dtype`` is given).
      mesh: place each parameter's shards straight onto this mesh (``rules`` picks the layout).
      scan_layers: stack and scan the blocks (``ModelConfig.scan_layers``; None: by layer count).
      lora: add fresh adapters (``B = 0``: the loaded model's outputs are unchanged), drawn from ``seed``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    dt = jnp.dtype(dtype).name
    cfg = load_hf_config(path, param_dtype=dt, dtype=jnp.dtype(compute_dtype or dtype).name, remat=remat,
                         scan_layers=scan_layers, lora=lora)
    graphdef, abstract = abstract_model(cfg)
    files = _weight_files(path)
    maps: dict[tuple, list[TensorMap]] = {}
    for m in tensor_maps(cfg):  # a stacked weight gathers its L per-layer tensors, in layer order
        maps.setdefault(m.path, []).append(m)
    known = {m.hf_name for ms in maps.values() for m in ms}
    unexpected = [n for n in files if n not in known and not n.endswith(_IGNORED_SUFFIXES)]
    if cfg.tie_word_embeddings:
        unexpected = [n for n in unexpected if n != "lm_head.weight"]  # some exporters keep the tied copy
    if unexpected:
        raise ValueError(f"{files[unexpected[0]].path}: tensor {unexpected[0]!r} is not part of a "
                         f"{cfg.family} model with this config ({len(unexpected)} unexpected tensors)")

    def view(m, want):
        """The tensor as a view in our layout (memory-mapped: nothing read yet), its shape checked."""
        if m.hf_name not in files:
            raise KeyError(f"{path}: missing tensor {m.hf_name!r} (searched {sorted({str(f.path.name) for f in files.values()})})")
        src = files[m.hf_name]
        raw = src.array(m.hf_name)
        expected = m.to_hf(np.empty(want, np.int8)).shape
        if raw.shape != expected:
            raise ValueError(f"{src.path}: tensor {m.hf_name!r} has shape {tuple(raw.shape)}, "
                             f"expected {tuple(expected)} for this config")
        return m.to_ours(raw)

    def load(path_, var):
        if isinstance(var, lora_lib.LoraParam):  # not in the checkpoint: a fresh adapter
            sharding = None if mesh is None else shd.named(var.get_metadata().get("axes"), var.get_value().shape,
                                                           mesh, rules)
            return var.replace(lora_lib.initial_adapter(path_, var, seed, sharding))
        want, to_dtype = var.get_value().shape, np.dtype(var.get_value().dtype)
        if maps[path_][0].layer is None:
            (m,) = maps[path_]
            src = view(m, want)
            read = lambda idx: np.asarray(src[idx]).astype(to_dtype)
        else:  # stacked [L, ...]: a shard is its layers' slices of their own tensors, stacked
            srcs = [view(m, want[1:]) for m in maps[path_]]
            read = lambda idx: np.stack([np.asarray(s[idx[1:]]).astype(to_dtype) for s in srcs[idx[0]]])
        if mesh is None:
            return var.replace(jnp.asarray(read((slice(None),) * len(want))))
        sharding = shd.named(var.get_metadata().get("axes"), want, mesh, rules)
        return var.replace(jax.make_array_from_callback(want, sharding, read))

    flat = [(p, load(p, v)) for p, v in nnx.to_flat_state(abstract)]
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    model.source = str(path.resolve())  # for save_pretrained to carry the tokenizer files along
    return model


def save_pretrained(model: Transformer, out_dir, *, dtype=None, max_shard_bytes: int = 5 * 2**30,
                    tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Write ``config.json`` + safetensors (+ the source's tokenizer files) that transformers loads.

    ``dtype`` is the saved dtype (default: the parameter dtype). A LoRA policy is saved merged
    (``W + scale A B``: a plain model). In a multi-process run every process must call this (the gathers
    are collective); only process 0 writes.
    """
    cfg = model.cfg
    if cfg.lora is not None:
        adapters, base = lora_lib.split_policy(nnx.state(model), cfg.lora)
        merged = jax.jit(lambda b, a: lora_lib.merge_adapters(b, a, cfg.lora.scale, cfg.param_dtype))(base, adapters)
        source = getattr(model, "source", None)
        model = nnx.merge(abstract_model(cfg.replace(lora=None))[0], merged)
        cfg = model.cfg
        if source:
            model.source = source
    out_dir = Path(out_dir)
    save_dt = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    entries = []
    for m in tensor_maps(cfg):
        value = state[m.path].get_value()
        shape = value.shape if m.layer is None else value.shape[1:]
        hf_shape = m.to_hf(np.empty(shape, np.int8)).shape
        # A layer of a stacked weight is sliced on device when written, so one tensor at a time is copied.
        entries.append((m.hf_name, hf_shape, save_dt,
                        lambda m=m, v=value: m.to_hf(shd.to_host(v if m.layer is None else v[m.layer]))))
    writer = jax.process_index() == 0
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for e in entries:
        nbytes = int(np.prod(e[1])) * save_dt.itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += nbytes
    shards.append(current)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        if writer:
            write_safetensors(out_dir / name, shard)
        else:  # still take part in the collective gathers
            for *_, produce in shard:
                produce()
    if not writer:
        return out_dir
    if len(shards) > 1:
        weight_map = {e[0]: name for name, shard in zip(names, shards) for e in shard}
        total = sum(int(np.prod(e[1])) * save_dt.itemsize for e in entries)
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out_dir / "config.json").write_text(json.dumps(config_to_hf(cfg, torch_dtype=save_dt.name), indent=2))
    src = tokenizer_from or getattr(model, "source", None)
    if src:
        for f in TOKENIZER_FILES:
            if (Path(src) / f).exists():
                shutil.copy2(Path(src) / f, out_dir / f)
    return out_dir


def load_tokenizer(path):
    """The HF tokenizer saved in a model directory, with a clear error when there is none."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(f"no tokenizer files in {path} (tokenizer.json / tokenizer_config.json)")
    config = path / "tokenizer_config.json"
    cls = json.loads(config.read_text()).get("tokenizer_class") if config.exists() else None
    if cls in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        # A plain tokenizer.json: load it as written. AutoTokenizer would pick the model family's class
        # from config.json (Qwen2Tokenizer), whose own pre-tokenizer replaces the saved one.
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:  # left padding needs an id; it is always masked out
        tok.pad_token = tok.eos_token
    return tok


def stop_token_ids(path, tokenizer) -> tuple[int, ...]:
    """Ids that end a response: the tokenizer's EOS plus generation_config.json's eos_token_id(s)."""
    ids = set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}
    gen = Path(path) / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
    if not ids:
        raise ValueError(f"{path}: neither the tokenizer nor generation_config.json defines an EOS token")
    return tuple(sorted(ids))
