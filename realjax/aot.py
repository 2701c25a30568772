"""Ahead-of-time compilation of one RL step for a TPU topology, on this host (no TPU needed).

``realjax compile --config F.yaml --topology v5p-8`` builds the run's mesh over the compile-only devices
of the topology (``jax.experimental.topologies``; needs ``libtpu``, the ``tpu`` extra), the model and
optimizer state as ``ShapeDtypeStruct``s with their shardings (nothing is allocated), and lowers and
compiles the very programs the trainer runs:

* ``prefill`` and ``decode``: the sampler's two jitted programs for one call of ``prompts_per_call``
  prompts x ``group_size`` rollouts, weights laid out by ``ROLLOUT_RULES``;
* ``score``: the no-gradient log-prob pass over the whole rollout batch (old log-probs when they are
  recomputed, which ``rollout.old_logp: auto`` does in bf16; GRPO's reference log-probs);
* ``update``: the optimizer step for one mini-batch split into ``micro_batches``, ``TRAIN_RULES``.

For each it reports XLA's per-chip memory (arguments, outputs, temporaries, code) and FLOPs. A
program's ``peak`` is XLA's (arguments + outputs - donated aliases + temporaries); ``resident`` adds the
device buffers the trainer keeps alive across the call that are not its arguments (the training
weights and Adam moments during rollout, the Adam moments during scoring, GRPO's reference weights;
the trainer drops the rollout view of the weights before the learner runs). A program that XLA cannot
fit fails to compile with RESOURCE_EXHAUSTED; that is reported as not fitting, with the size XLA asked
for.

With ``data.eval`` set, the evaluation sampler's two programs (``eval.n`` samples per prompt,
``eval.prompts_per_call`` prompts) are compiled too: they must fit, but are not part of the step time.

Time is bounded below per program by ``flops / peak FLOP/s`` (compute) and by reading every argument
once at HBM bandwidth (weights and KV cache: what bounds decoding). XLA counts a ``while_loop`` body
once, so the decode program's numbers are one decode step; the RL-step bound assumes every row runs
the full budget. The sampler decodes in cache windows (``SamplingConfig.window_tokens``), one program
each: every window is compiled, and the ``decode`` row merges them (the largest peak; FLOPs and bytes
read averaged over the steps), a step reading the KV cache only up to its window. XLA's own "bytes
accessed" is kept in the JSON; it counts whole-buffer traffic of in-place cache updates, so it
overstates decoding several times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

GiB = 1024 ** 3


# ----------------------------------------------------------------------------------------------------
# Chips and topologies
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    jax_prefix: str  # the generation in JAX's topology names ("v5:2x2x1")
    dims: int  # torus dimensions: 3 (v4, v5p) or 2 (v5e, v6e)
    cores_per_chip: int  # TensorCores per chip: "v5p-8" counts cores, "v5e-8" counts chips


# Public Cloud TPU numbers (HBM as the accelerator type is sold; XLA itself allows v5p 95.74 GiB).
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1.2e12, "v4", 3, 2),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 0.82e12, "v5e", 2, 1),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2.765e12, "v5", 3, 2),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1.64e12, "v6e", 2, 1),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given, e.g. "v5p-8"
    chip: Chip
    chips: int
    shape: tuple[int, ...]  # chips per torus dimension
    host_bounds: tuple[int, int, int]  # chips per host in each dimension

    @property
    def jax_name(self) -> str:
        return f"{self.chip.jax_prefix}:" + "x".join(map(str, self.shape))


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU uses for a power-of-two chip count: keep doubling the smallest
    dimension (the last one on ties), from 2x2x1 (3-D) or 1x1 (2-D). v5p-32 -> 2x2x4, v5e-32 -> 4x8."""
    shape = [1] * dims
    if dims == 3 and chips >= 4:
        shape = [2, 2, 1]
    while math.prod(shape) < chips:
        i = max(range(dims), key=lambda d: (-shape[d], d))
        shape[i] *= 2
    if math.prod(shape) != chips:
        raise ValueError(f"{chips} chips is not a power-of-two slice; pass the shape, e.g. v5p:4x4x12")
    return tuple(shape)


def parse_topology(name: str) -> Topology:
    """``v5p-8`` (TensorCores: 4 chips), ``v4-8`` (4 chips), ``v5e-16`` / ``v5litepod-16`` / ``v6e-16``
    (chips), or an explicit torus ``v5p:2x2x4`` / ``v6e:4x4``."""
    m = re.fullmatch(r"\s*([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)*))\s*", name.lower())
    gen = m and _ALIASES.get(m.group(1), m.group(1))
    if not m or gen not in CHIPS:
        raise ValueError(f"unknown TPU topology {name!r}; expected e.g. v5p-8, v4-8, v5e-16, v6e-8 or v5p:2x2x4 "
                         f"(generations: {', '.join(CHIPS)})")
    chip = CHIPS[gen]
    if m.group(3):
        shape = tuple(int(s) for s in m.group(3).split("x"))
        if len(shape) != chip.dims:
            raise ValueError(f"{name}: a {gen} torus has {chip.dims} dimensions")
        chips = math.prod(shape)
    else:
        count = int(m.group(2))
        if count % chip.cores_per_chip:
            raise ValueError(f"{name}: {gen} slices are named by TensorCores, a multiple of {chip.cores_per_chip}")
        chips = count // chip.cores_per_chip
        shape = _torus(chips, chip.dims)
    # Single-host slices keep all their chips on the host (v5e-8: 2x4); larger ones have 4 per host.
    if chips <= 4 or (chip.dims == 2 and chips == 8):
        host = tuple(shape) + (1,) * (3 - len(shape))
    else:
        host = (2, 2, 1)
    return Topology(name, chip, chips, shape, host)


class TpuUnavailable(RuntimeError):
    pass


@contextlib.contextmanager
def _quiet_stderr():
    """libtpu writes host-detection warnings to fd 2 when it loads on a machine without TPUs; keep
    them out of the report, and hand them back if loading fails (they are the diagnosis then)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(topo: Topology) -> tuple:
    """The compile-only devices of ``topo`` (loads the TPU compiler from libtpu; claims no chip)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TpuUnavailable("libtpu is not installed (it provides the TPU compiler): pip install 'realjax[tpu]'") \
            from None
    devices = _describe(topo.jax_name, "megacore" if topo.chip.cores_per_chip == 2 else "default", topo.host_bounds)
    if len(devices) != topo.chips:
        raise TpuUnavailable(f"{topo.name}: libtpu describes {len(devices)} devices, expected {topo.chips}")
    return devices


@functools.cache
def _describe(jax_name: str, chip_config: str, host_bounds: tuple) -> tuple:
    """Cached: every compile for a topology in this process sees the same device objects, hence the same
    mesh (a second description has new devices, which JAX will not mix with functions traced on the first)."""
    from jax.experimental import topologies

    # libtpu takes /tmp/libtpu_lockfile so that two processes never drive the same chips. A compile
    # drives none, and must work beside a training run or another compile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    with _quiet_stderr() as log:
        try:
            desc = topologies.get_topology_desc(jax_name, "tpu", chip_config_name=chip_config,
                                                chips_per_host_bounds=host_bounds)
        except Exception as e:  # noqa: BLE001 - whatever the plugin raises, the user needs its words
            log.seek(0)
            detail = log.read().decode(errors="replace").strip().splitlines()
            raise TpuUnavailable(f"cannot describe TPU topology {jax_name}: {e}"
                                 + (f" ({detail[-1]})" if detail else "")) from None
    return tuple(desc.devices)


# ----------------------------------------------------------------------------------------------------
# Abstract state
# ----------------------------------------------------------------------------------------------------
def model_config(cfg):
    """The ModelConfig of ``cfg.model``: the HF config.json when ``model.path`` is a local dir, else
    ``model.preset``; compute dtype "auto" is bf16 (the target is a TPU)."""
    from pathlib import Path

    from realjax.config import ConfigError
    from realjax.models.config import load_hf_config, preset
    from realjax.rl.components import DEMO_ASSET

    m = cfg.model
    dtype = "bfloat16" if m.dtype == "auto" else m.dtype
    kw = dict(param_dtype=m.param_dtype, dtype=dtype, remat=m.remat, lora=m.lora.model_config())
    path = DEMO_ASSET if m.path == "demo" else Path(m.path).expanduser()
    if m.path and (path / "config.json").is_file():
        return load_hf_config(path, **kw), str(path)
    if m.preset:
        try:
            return preset(m.preset, **kw), f"preset {m.preset}"
        except ValueError as e:
            raise ConfigError(f"model.preset: {e}") from None
    raise ConfigError(f"model.path {m.path!r} has no config.json and model.preset is not set: "
                      "the compile needs the architecture from one of them")


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _bytes_per_chip(tree) -> int:
    """Bytes one device holds of an abstract tree (the largest shard of each leaf)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return total


# ----------------------------------------------------------------------------------------------------
# Programs
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Program:
    name: str
    runs: int  # how many times one RL step runs it (decode: steps per call x calls)
    shape: str  # what one run processes, for the table
    resident_bytes: int  # live device buffers that are not its arguments
    memory: dict[str, int] = dataclasses.field(default_factory=dict)
    flops: float = 0.0  # per chip, one run
    bytes_accessed: float = 0.0  # per chip, one run
    compile_s: float = 0.0
    error: str = ""  # RESOURCE_EXHAUSTED text when XLA cannot fit it
    unread_bytes: float = 0.0  # per chip, one run: argument bytes it never reads (cache beyond its window)

    @property
    def read_bytes(self) -> float:
        """What one run must read at least once: its arguments, less what it provably skips."""
        return self.memory.get("argument", 0) - self.unread_bytes

    @property
    def peak(self) -> int:
        return self.memory.get("peak", 0)

    @property
    def total(self) -> int:
        return self.peak + self.resident_bytes


_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory")
_SIZE = re.compile(r"([\d.]+)([KMGT])\b")


def _compile(program: Program, lower, log) -> Any:
    """Compile ``lower()``'s program and fill in ``program``; an out-of-memory compile is recorded."""
    import jax

    log(f"compiling {program.name} ({program.shape})")
    t0 = time.perf_counter()
    try:
        compiled = lower().compile()
    except jax.errors.JaxRuntimeError as e:
        if not _OOM.search(str(e)):
            raise
        program.error = str(e).strip().splitlines()[0][:400]
        sizes = [float(v) * 1024 ** " KMGT".index(u) for v, u in _SIZE.findall(program.error)]
        program.memory = {"peak": int(sizes[0]) if sizes else 0}  # "required (X) exceeds available (Y)"
        program.compile_s = time.perf_counter() - t0
        return None
    program.compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    stats = {k: int(getattr(mem, k + "_size_in_bytes", 0)) for k in ("argument", "output", "alias", "temp",
                                                                     "generated_code")}
    stats["peak"] = int(getattr(mem, "peak_memory_in_bytes", 0) or
                        stats["argument"] + stats["output"] - stats["alias"] + stats["temp"])
    program.memory = stats
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    program.flops = float(cost.get("flops", 0.0))
    program.bytes_accessed = float(cost.get("bytes accessed", 0.0))
    return compiled


@dataclasses.dataclass
class _State:
    """The run's device state, abstract: weights in both layouts, Adam moments, and their sizes per chip."""

    graphdef: Any
    plan: Any  # the run plan Trainer would build on this mesh
    state: Any  # TrainState of ShapeDtypeStructs (TRAIN_RULES)
    rollout_params: Any  # ROLLOUT_RULES
    # per chip: params (LoRA: the adapters), opt_state, rollout_params (0: same buffers), ref_params, frozen
    bytes: dict[str, int]
    rollout_graphdef: Any = None  # the model rollouts run (LoRA: the plain model on merged weights)


def _abstract_state(cfg, mcfg, mesh, stops) -> _State:
    """Weights, optimizer and shardings exactly as ``Trainer`` builds them (its run plan), nothing allocated."""
    import jax

    from realjax.models import abstract_model
    from realjax.models.lora import split_policy
    from realjax.rl.batch import TrainState
    from realjax.rl.plan import make_plan

    graphdef, abstract = abstract_model(mcfg)
    trained, frozen = split_policy(abstract, mcfg.lora)  # LoRA: adapters train, the base is frozen
    plan = make_plan(cfg, mesh, compute_dtype=mcfg.dtype, abstract_params=trained, stop_ids=stops,
                     abstract_frozen=frozen)
    sh = plan.state_shardings
    params = _abstract(trained, sh.params)
    frozen = None if frozen is None else _abstract(frozen, sh.frozen)
    opt_state = _abstract(jax.eval_shape(plan.optimizer.init, trained), sh.opt_state)
    # Rollouts read the trainer's rollout view of the weights (its layout and dtype, from the same function).
    rollout_params = jax.eval_shape(plan.rollout_view, params, frozen)
    # The rollout view lives beside the training weights during rollouts; when layout and dtype agree it
    # is the same buffers (never for LoRA: the view holds merged weights).
    same = frozen is None and all(a.sharding.spec == b.sharding.spec and a.dtype == b.dtype
                                  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(rollout_params)))
    b_params = _bytes_per_chip(params)
    own_ref = plan.use_ref and not plan.ref_is_base
    sizes = dict(params=b_params, opt_state=_bytes_per_chip(opt_state),
                 rollout_params=0 if same else _bytes_per_chip(rollout_params),
                 ref_params=b_params if own_ref else 0, frozen=0 if frozen is None else _bytes_per_chip(frozen))
    state = TrainState(params, opt_state, params if own_ref else None, frozen)
    rollout_graphdef = graphdef if frozen is None else abstract_model(mcfg.replace(lora=None))[0]
    return _State(graphdef, plan, state, rollout_params, sizes, rollout_graphdef)


def compile_report(cfg, topology: str, *, log=lambda message: None) -> dict:
    """Compile the RL step of ``cfg`` for ``topology`` (e.g. "v5p-8"); per-chip memory, FLOPs, fits.

    ``log`` receives a line as each program starts compiling (minutes each at 8k tokens on a small host).
    Raises ``TpuUnavailable`` without libtpu, ``ValueError`` for a bad topology or mesh.
    """
    import jax

    from realjax import sharding as shd
    from realjax.data import bucket_length
    from realjax.rl.batch import UpdateBatch

    topo = parse_topology(topology)
    mesh = shd.make_mesh(cfg.mesh, topology_devices(topo))
    mcfg, source = model_config(cfg)
    r, o, e = cfg.rollout, cfg.optim, cfg.eval
    G, tp, N = r.group_size, bucket_length(cfg.data.max_prompt_tokens), r.max_new_tokens
    eos = mcfg.eos_token_id if mcfg.eos_token_id is not None else 0
    stops = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    st = _abstract_state(cfg, mcfg, mesh, stops)
    plan, b = st.plan, st.bytes

    # -- rollout: the sampler's prefill and decode (and the evaluation sampler's) --------------------
    # The training weights (when the rollout copy is separate), Adam moments and GRPO's reference stay.
    resident = (b["params"] + b["frozen"] if b["rollout_params"] else 0) + b["opt_state"] + b["ref_params"]
    per_call = r.prompts_per_call or r.prompts_per_step
    programs = _sampler_programs("", plan.sampling, st, mesh, per_call, tp, G, r.prompts_per_step // per_call,
                                 resident, log)
    if cfg.data.eval:
        programs += _sampler_programs("eval_", plan.eval_sampling, st, mesh, plan.eval_prompts_per_call, tp, e.n, 0,
                                      resident, log)

    # -- learner: old / reference log-probs over the whole batch, then one update per mini-batch -------
    rows = plan.rows_per_step
    if plan.recompute_old_logp or plan.use_ref:
        chunks = plan.scoring_chunks
        score = Program("score", int(plan.recompute_old_logp) + int(plan.use_ref),
                        f"{chunks} x {rows // chunks} rows x {tp}+{N} tok", b["opt_state"] + b["ref_params"])
        batch = UpdateBatch.spec((chunks, rows // chunks), tp, N, with_ref=False, sharding=plan.batch_sharding)
        _compile(score, lambda: plan.scoring_fn(st.graphdef).lower(st.state.params, batch, st.state.frozen), log)
        programs.append(score)
    micro_rows = plan.rows_per_micro_batch
    update = Program("update", o.mini_batches, f"{o.micro_batches} x {micro_rows} rows x {tp}+{N} tok",
                     b["ref_params"])
    batch = UpdateBatch.spec((o.micro_batches, micro_rows), tp, N, with_ref=plan.use_ref, sharding=plan.batch_sharding,
                             with_sampler=cfg.rollout.is_correction != "none")  # importance weights need both
    # LoRA dropout draws its masks from a key the trainer passes to each update
    key = (jax.eval_shape(lambda: jax.random.key(0)) if plan.lora is not None and plan.lora.dropout > 0 else None)
    _compile(update, lambda: plan.update_step(st.graphdef).lower(st.state, batch, key), log)
    programs.append(update)
    return _summarise(cfg, topo, mesh, mcfg, source, programs, b)


def _sampler_programs(prefix: str, sampling, st: _State, mesh, prompts: int, tp: int, group: int, calls: int,
                      resident: int, log) -> list[Program]:
    """The sampler's prefill and decode for one call of ``prompts`` x ``group`` rows (``calls`` per step)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from realjax import sharding as shd
    from realjax.sampling import Sampler

    N = sampling.max_new_tokens
    sampler = Sampler(sampling, pad_id=sampling.stop_ids[0], mesh=mesh, rules=shd.ROLLOUT_RULES)
    ids = jax.ShapeDtypeStruct((prompts, tp), jnp.int32,
                               sharding=shd.batch_sharding(mesh, (prompts, tp), shd.ROLLOUT_RULES))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    prefill = Program(prefix + "prefill", calls, f"{prompts} prompts x {tp} tok -> {prompts * group} rows", resident)
    compiled = _compile(prefill, lambda: sampler.prefill_program.lower(st.rollout_graphdef, st.rollout_params, ids, ids,
                                                                       key, group),
                        log)
    if compiled is None:
        decode = Program(prefix + "decode", calls * N, f"{prompts * group} rows x 1 tok, cache {tp + N}", resident)
        decode.error = "not compiled: its prefill does not fit"
        return [prefill, decode]
    # The decode state is what prefill returns (shapes and shardings; XLA's layouts left to it).
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), compiled.out_info)
    cache_bytes, S = _bytes_per_chip((state.cache.k, state.cache.v)), state.cache.length
    windows, parts, start = sampler.windows(state), [], tp
    for w in windows:  # the steps that write slots [start, w) run in the program for window w
        part = Program(prefix + "decode", w - start, f"window {w}", resident,
                       unread_bytes=cache_bytes * (1 - w / S))
        _compile(part, lambda w=w: sampler.decode_program.lower(st.rollout_graphdef, st.rollout_params,
                                                        sampler.with_window(state, w)), log)
        parts.append(part)
        start = w
    decode = _merge(prefix + "decode", f"{prompts * group} rows x 1 tok, cache {S}"
                    + (f", {len(windows)} windows" if len(windows) > 1 else ""), parts)
    decode.runs *= calls  # the parts counted one call's steps
    return [prefill, decode]


def _merge(name: str, shape: str, parts: list[Program]) -> Program:
    """One row for programs that run in sequence (decode windows): memory of the largest, per-run FLOPs
    and bytes averaged over the runs, so that runs x per-run stays each total."""
    runs = sum(p.runs for p in parts)
    mean = lambda f: sum(f(p) * p.runs for p in parts) / max(runs, 1)
    worst = max(parts, key=lambda p: (bool(p.error), p.peak))
    return Program(name, runs, shape, worst.resident_bytes, memory=dict(worst.memory),
                   flops=mean(lambda p: p.flops), bytes_accessed=mean(lambda p: p.bytes_accessed),
                   compile_s=sum(p.compile_s for p in parts), error=worst.error,
                   unread_bytes=mean(lambda p: p.unread_bytes))


def _summarise(cfg, topo: Topology, mesh, mcfg, source: str, programs: list[Program], state_bytes: dict) -> dict:
    chip = topo.chip
    out, phases = {}, {"rollout": [0.0, 0.0], "score": [0.0, 0.0], "update": [0.0, 0.0]}
    flops = 0.0
    for p in programs:
        t_flops = p.flops / chip.peak_flops
        t_hbm = p.read_bytes / chip.hbm_bandwidth  # weights (+ KV cache up to the window) read once
        flops += p.flops * topo.chips * p.runs
        phase = phases["rollout" if p.name in ("prefill", "decode") else p.name] if p.runs else [0.0, 0.0]
        phase[0] += t_flops * p.runs
        phase[1] += max(t_flops, t_hbm) * p.runs
        out[p.name] = {"runs_per_step": p.runs, "shape": p.shape,
                       **{f"{k}_bytes": v for k, v in p.memory.items()},
                       "resident_bytes": p.resident_bytes, "total_bytes": p.total,
                       "fits": not p.error and p.total <= chip.hbm_bytes, "flops_per_chip": p.flops,
                       "xla_bytes_accessed_per_chip": p.bytes_accessed, "read_bytes_per_chip": p.read_bytes,
                       "time_flops_s": t_flops,
                       "time_hbm_s": t_hbm, "compile_s": round(p.compile_s, 2), "error": p.error}
    return {
        "topology": topo.name, "jax_topology": topo.jax_name, "chip": chip.name, "chips": topo.chips,
        "hbm_bytes_per_chip": chip.hbm_bytes, "peak_flops_per_chip": chip.peak_flops,
        "hbm_bandwidth_per_chip": chip.hbm_bandwidth,
        "mesh": dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
        "model": {"source": source, "params": mcfg.num_params(), "lora_params": mcfg.num_lora_params(),
                  "lora_rank": mcfg.lora.rank if mcfg.lora else 0, "param_dtype": mcfg.param_dtype, "dtype": mcfg.dtype,
                  "remat": mcfg.remat, "logprob_chunk_tokens": cfg.model.logprob_chunk_tokens},
        "state_bytes_per_chip": state_bytes, "programs": out,
        "peak_bytes_per_chip": max(p.total for p in programs),
        "flops": flops,  # one RL step, all chips (decode: every row runs the full budget)
        "step_time_lower_bound_s": sum(v[0] for v in phases.values()),  # FLOPs / (chips x peak)
        "step_time_roofline_s": sum(v[1] for v in phases.values()),  # max(FLOP time, HBM time) per program
        "phase_time_roofline_s": {k: v[1] for k, v in phases.items()},
        "fits": all(v["fits"] for v in out.values()),
    }


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _secs(s: float) -> str:
    if s >= 100:
        return f"{s:.0f} s"
    return f"{s:.3g} s" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_report(rep: dict, config: str = "") -> str:
    """The report as a readable table (GiB per chip; times are lower bounds)."""
    m, mesh, st, ph = rep["model"], rep["mesh"], rep["state_bytes_per_chip"], rep["phase_time_roofline_s"]
    head = (f"realjax compile {config} --topology {rep['topology']}: {rep['chips']} x TPU {rep['chip']} "
            f"({rep['jax_topology']}), {_gib(rep['hbm_bytes_per_chip'])} GiB HBM, "
            f"{rep['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16 per chip")
    model = (f"model: {m['source']}, {_count(m['params'])} params, {m['param_dtype']} weights, {m['dtype']} compute, "
             f"remat {m['remat']}, logprob chunk {m['logprob_chunk_tokens']} tok; "
             f"mesh data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']}")
    state = (f"state per chip (GiB): weights {_gib(st['params'])}, Adam {_gib(st['opt_state'])}, rollout copy of "
             f"the weights {_gib(st['rollout_params'])}, GRPO reference {_gib(st['ref_params'])}")
    if m.get("lora_rank"):
        model += f"; LoRA rank {m['lora_rank']}: {_count(m['lora_params'])} adapter params train"
        state = state.replace("weights", "adapters", 1) + f", frozen base {_gib(st['frozen'])}"
    columns = ("program", "runs", "one run", "args", "out", "temp", "code", "peak", "+resid", "total", "TFLOP/chip",
               "t_flops", "t_hbm")
    row = "{:<12} {:>6}  {:<40} {:>6} {:>6} {:>6} {:>5} {:>6} {:>6} {:>6}  {:>10} {:>9} {:>9}"
    lines = [head, model, state, "", row.format(*columns)]
    for name, p in rep["programs"].items():
        if "argument_bytes" not in p:
            why = p["error"] or "not compiled"
            lines.append(f"{name:<12} {p['runs_per_step']:>6}  {p['shape']:<40} DOES NOT FIT: {why}")
            continue
        sizes = (_gib(p[k + "_bytes"]) for k in ("argument", "output", "temp", "generated_code", "peak", "resident",
                                                 "total"))
        lines.append(row.format(name, p["runs_per_step"], p["shape"], *sizes, f"{p['flops_per_chip'] / 1e12:.3f}",
                                _secs(p["time_flops_s"]), _secs(p["time_hbm_s"])) + ("" if p["fits"] else "  > HBM"))
    legend = ("GiB per chip; peak = XLA's args + out - donated + temp; +resid = buffers the trainer keeps alive "
              "beside the program; runs = per RL step (decode: steps x calls, every row to the full budget; eval_*: 0, "
              "they must fit but run between steps); t_hbm = reading the arguments once, the KV cache only up to "
              "the decode window (decode: the worst window's memory, the steps' average time).")
    step = (f"RL step: {rep['flops'] / 1e15:.1f} PFLOP; lower bound {_secs(rep['step_time_lower_bound_s'])} at "
            f"peak FLOP/s; {_secs(rep['step_time_roofline_s'])} with every program at max(t_flops, t_hbm) "
            f"(rollout {_secs(ph['rollout'])}, scoring {_secs(ph['score'])}, updates {_secs(ph['update'])})")
    verdict = (f"{'fits' if rep['fits'] else 'DOES NOT FIT'}: peak {_gib(rep['peak_bytes_per_chip'])} of "
               f"{_gib(rep['hbm_bytes_per_chip'])} GiB per chip")
    return "\n".join(lines + ["", legend, step, verdict])


def _host_is_cpu() -> None:
    """Compile-only devices need no TPU backend. Unless the user chose platforms, keep JAX off local chips
    (on a TPU worker they may be training; JAX's Cloud TPU start-up would otherwise pick "tpu,cpu")."""
    import jax

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def main(args) -> int:
    """``realjax compile``: exit 0 when every program fits the chip's HBM, 1 when one does not, 2 on errors."""
    from realjax.cli import CliError
    from realjax.commands import demo_config_path
    from realjax.config import ConfigError, load_config

    _host_is_cpu()
    try:
        cfg = load_config(args.config or demo_config_path(), args.overrides)
        parse_topology(args.topology)
        t0 = time.perf_counter()
        rep = compile_report(cfg, args.topology, log=lambda message: print(
            f"realjax compile: {time.perf_counter() - t0:5.0f} s {message}", file=sys.stderr, flush=True))
    except (ConfigError, TpuUnavailable, ValueError) as e:
        raise CliError(str(e).splitlines()[0]) from None
    if args.json:
        print(json.dumps(rep, sort_keys=True))
    else:
        print(format_report(rep, f"--config {args.config}" if args.config else "(demo)"))
    return 0 if rep["fits"] else 1
