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

Beside the rollout's price under a length distribution (``realjax.tools.aot.lengths``), the largest
compaction and insert of the continuous-batching engine's schedule are compiled (``engine_programs``;
``realjax.tools.aot.engine_moves``): they must fit too.

With ``data.eval`` set, the evaluation sampler's two programs (``eval.n`` samples per prompt,
``eval.prompts_per_call`` prompts) are compiled too: they must fit, but are not part of the step time.

Time is bounded below per program by ``flops / peak FLOP/s`` (compute) and by reading every argument
once at HBM bandwidth (weights and KV cache: what bounds decoding). XLA counts a ``while_loop`` body
once, so the decode program's numbers are one decode step; the RL-step bound assumes every row runs
the full budget. The sampler decodes in cache windows (``SamplingConfig.window_tokens``), one program
each: every window is compiled, and the ``decode`` row merges them (the largest peak; FLOPs and bytes
read averaged over the steps), a step reading the KV cache only up to its window. XLA's own "bytes
accessed" is kept in the JSON; it counts whole-buffer traffic of in-place cache updates, so it
overstates decoding several times. For the same reason a model with scanned layers
(``model.scan_layers``) would count one layer: its FLOPs are the compiled program's times the ratio of
two uncompiled counts of the whole (unpartitioned) program, one lowered with the layer scan unrolled
(``ModelConfig.unroll_scan``: same parameters) and one as compiled. Memory and compile time are the
scanned program's own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.lib import _jax  # private: no public API counts an uncompiled HLO module on another backend
from jax.sharding import NamedSharding, PartitionSpec

from realjax import sharding as shd
from realjax.config import ConfigError
from realjax.data import bucket_length
from realjax.models import abstract_model
from realjax.models.config import load_hf_config, preset
from realjax.models.lora import split_policy
from realjax.rl.batch import TrainState, UpdateBatch
from realjax.rl.plan import make_plan
from realjax.rl.setup import DEMO_ASSET
from realjax.sampling import Sampler
from realjax.tools.aot.engine_moves import engine_move_lowerings
from realjax.tools.aot.lengths import rollout_under_lengths
from realjax.tools.aot.packed_update import price_config
from realjax.tools.aot.topology import Topology, parse_topology, topology_devices

GiB = 1024 ** 3


# ----------------------------------------------------------------------------------------------------
# Abstract state
# ----------------------------------------------------------------------------------------------------
def architecture(cfg):
    """The ModelConfig of ``cfg.model``: the HF config.json when ``model.path`` is a local dir, else
    ``model.preset``; compute dtype "auto" is bf16 (the target is a TPU)."""
    m = cfg.model
    dtype = "bfloat16" if m.dtype == "auto" else m.dtype
    kw = dict(param_dtype=m.param_dtype, dtype=dtype, remat=m.remat, scan_layers=m.scan_layers,
              lora=m.lora.model_config())
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
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _bytes_per_chip(tree) -> int:
    """Bytes one device holds of an abstract tree (the largest shard of each leaf)."""
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
    window: int = 0  # a decode window's program: the cache slots it reads
    parts: list = dataclasses.field(default_factory=list)  # decode: the window programs it merges
    cache_bytes: int = 0  # decode: the KV cache, per chip

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


def _compile(program: Program, lower, log, st: "_State", counts: tuple[float, float] | None = None) -> Any:
    """Compile ``lower(graphdef)``'s program for the run's model and fill in ``program``; an out-of-memory
    compile is recorded. With scanned layers the FLOPs are scaled by unrolled / scanned ``counts``
    (``_flop_counts`` unless given)."""
    log(f"compiling {program.name} ({program.shape})")
    t0 = time.perf_counter()
    try:
        compiled = lower(st.graphdef).compile()
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
    if st.count_graphdef is not None:
        unrolled, scanned = counts or _flop_counts(lower, st)
        program.flops *= unrolled / scanned
    return compiled


def _flop_counts(lower, st: "_State") -> tuple[float, float]:
    """FLOPs of the program with its layer scan unrolled, and as scanned (where XLA counts the scan body
    once), both counted by XLA's cost analysis on the lowered, unpartitioned HLO.

    The TPU client has no cost analysis of an uncompiled program, so the host CPU client counts it (an
    HLO count, independent of the target); compiling the unrolled program would cost what scanning saves.
    """
    cpu = jax.devices("cpu")[0].client
    count = lambda graphdef: _jax.hlo_module_cost_analysis(cpu, lower(graphdef)._lowering.hlo().as_hlo_module())["flops"]
    return count(st.count_graphdef), count(st.graphdef)


@dataclasses.dataclass
class _State:
    """The run's device state, abstract: weights in both layouts, Adam moments, and their sizes per chip."""

    graphdef: Any
    count_graphdef: Any  # the model with its layer scan unrolled, for FLOPs (None: not scanned)
    plan: Any  # the run plan Trainer would build on this mesh
    state: Any  # TrainState of ShapeDtypeStructs (TRAIN_RULES)
    rollout_params: Any  # ROLLOUT_RULES
    # per chip: params (LoRA: the adapters), opt_state, rollout_params (0: same buffers), ref_params, frozen
    bytes: dict[str, int]
    rollout_graphdef: Any = None  # the model rollouts run (LoRA: the plain model on merged weights)
    rollout_count_graphdef: Any = None  # its layer scan unrolled (None: not scanned)

    def rollout(self) -> "_State":
        """The state as the sampler's programs see it: the rollout model, counted as such."""
        return dataclasses.replace(self, graphdef=self.rollout_graphdef, count_graphdef=self.rollout_count_graphdef)


def _abstract_state(cfg, mcfg, mesh, stops) -> _State:
    """Weights, optimizer and shardings exactly as ``Trainer`` builds them (its run plan), nothing allocated."""
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
    plain = mcfg if frozen is None else mcfg.replace(lora=None)  # LoRA: rollouts run the plain model
    rollout_graphdef = graphdef if frozen is None else abstract_model(plain)[0]
    unrolled = (lambda c: abstract_model(c.replace(unroll_scan=True))[0]) if mcfg.scanned else (lambda c: None)
    return _State(graphdef, unrolled(mcfg), plan, state, rollout_params, sizes, rollout_graphdef, unrolled(plain))


def compile_report(cfg, topology: str, *, log=lambda message: None, lengths: str = "r1-distill") -> dict:
    """Compile the RL step of ``cfg`` for ``topology`` (e.g. "v5p-8"); per-chip memory, FLOPs, fits.

    ``log`` receives a line as each program starts compiling (minutes each at 8k tokens on a small host).
    ``lengths``: the length distribution the rollout is also priced under (``realjax.tools.aot.lengths``).
    Raises ``TpuUnavailable`` without libtpu, ``ValueError`` for a bad topology or mesh.
    """
    topo = parse_topology(topology)
    mesh = shd.make_mesh(cfg.mesh, topology_devices(topo))
    mcfg, source = architecture(cfg)
    r, o, e = cfg.rollout, cfg.optim, cfg.eval
    R, tp, N = r.group_size, bucket_length(cfg.data.max_prompt_tokens), r.max_new_tokens
    eos = mcfg.eos_token_id if mcfg.eos_token_id is not None else 0
    stops = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    st = _abstract_state(cfg, mcfg, mesh, stops)
    plan, b = st.plan, st.bytes

    # -- rollout: the sampler's prefill and decode (and the evaluation sampler's) --------------------
    # The training weights (when the rollout copy is separate), Adam moments and GRPO's reference stay.
    resident = (b["params"] + b["frozen"] if b["rollout_params"] else 0) + b["opt_state"] + b["ref_params"]
    per_call = r.prompts_per_call or r.prompts_per_step
    programs = _sampler_programs("", plan.sampling, st, mesh, per_call, tp, R, r.prompts_per_step // per_call,
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
        batch = UpdateBatch.spec((chunks, rows // chunks), tp, N, with_ref=False, sharding=plan.batch_sharding,
                                 packed_sequences=plan.packed_sequences(rows // chunks, tp + N - 1))
        _compile(score, lambda g: plan.scoring_fn(g).lower(st.state.params, batch, st.state.frozen), log, st)
        programs.append(score)
    micro_rows = plan.rows_per_micro_batch
    packed = plan.packed_sequences(micro_rows, tp + N - 1)
    update = Program("update", o.mini_batches, f"{o.micro_batches} x {micro_rows} rows x {tp}+{N} tok"
                     + (f" packed into {packed} x {tp + N - 1}" if packed else ""), b["ref_params"])
    batch = UpdateBatch.spec((o.micro_batches, micro_rows), tp, N, with_ref=plan.use_ref, sharding=plan.batch_sharding,
                             with_sampler=cfg.rollout.is_correction != "none",  # importance weights need both
                             packed_sequences=packed)
    # LoRA dropout draws its masks from a key the trainer passes to each update
    key = (jax.eval_shape(lambda: jax.random.key(0)) if plan.lora is not None and plan.lora.dropout > 0 else None)
    _compile(update, lambda g: plan.update_step(g).lower(st.state, batch, key), log, st)
    programs.append(update)
    rep = _summarise(cfg, topo, mesh, mcfg, source, programs, b)
    if programs[1].parts and not programs[1].error:  # the training decode compiled
        calls, rows = r.prompts_per_step // per_call, per_call * R
        price = functools.partial(
            rollout_under_lengths, lengths, prefill=programs[0], decode=programs[1], chip=topo.chip, prompt=tp,
            new=N, multiple=shd.batch_rows_multiple(mesh, shd.ROLLOUT_RULES), compact_every=r.compact_every,
            window_tokens=plan.sampling.window_tokens, compiled_rows=rows)
        # As configured; and the step's rows in one call through the same slots (refill across the calls:
        # the longest rows' tail is paid once, not once per call).
        scenarios = {"rollout_under_lengths": price(rows=rows, calls=calls, prompts=per_call, slots=r.slots)}
        if calls > 1:
            scenarios["rollout_under_lengths_one_call"] = price(rows=rows * calls, calls=1, prompts=r.prompts_per_step,
                                                                slots=min(r.slots or rows, rows))
        for key, under in scenarios.items():
            under["step_time_roofline_s"] = (rep["step_time_roofline_s"] - rep["phase_time_roofline_s"]["rollout"]
                                             + under["rollout_roofline_s"])
            rep[key] = under
        _engine_moves(rep, cfg, st, mcfg, mesh, programs[1], resident, log, prompts=per_call, prompt=tp)
    rep["update_under_lengths"] = price_config(cfg, mcfg, lengths, prompt=tp, attention=plan.attention.name,
                                               multiple=shd.batch_rows_multiple(mesh, shd.TRAIN_RULES))
    return rep


def _engine_moves(rep: dict, cfg, st: _State, mcfg, mesh, decode: Program, resident: int, log, *, prompts: int,
                  prompt: int) -> None:
    """Compile the largest compaction and insert the engine runs in the priced schedule (they must fit too:
    ``realjax.tools.aot.engine_moves``); beside them live the rollout weights and, for a compaction, the
    prompts' cache."""
    r, under = cfg.rollout, rep["rollout_under_lengths"]
    weights = decode.parts[-1].memory["argument"] - decode.cache_bytes
    rep["engine_programs"] = {}
    for name, shape, lower in engine_move_lowerings(
            st.plan.sampling, mcfg, mesh, prompts=prompts, group=r.group_size, prompt=prompt, slots=r.slots,
            compact_every=r.compact_every,
            compaction=tuple(under["largest_compaction"]), insert=tuple(under["largest_insert"])):
        compact = name == "engine_compact"
        p = Program(name, under["compactions" if compact else "inserts"], shape,
                    resident + weights + (under["engine_prompts_cache_bytes_per_chip"] if compact else 0))
        _compile(p, lower, log, st, (1.0, 1.0))  # no model, nothing to count
        rep["engine_programs"][name] = {
            "runs_per_step": p.runs, "shape": p.shape, **{f"{k}_bytes": v for k, v in p.memory.items()},
            "resident_bytes": p.resident_bytes, "total_bytes": p.total, "xla_bytes_accessed_per_chip": p.bytes_accessed,
            "fits": not p.error and p.total <= rep["hbm_bytes_per_chip"], "compile_s": round(p.compile_s, 2),
            "error": p.error}
    rep["fits"] = rep["fits"] and all(v["fits"] for v in rep["engine_programs"].values())


def _sampler_programs(prefix: str, sampling, st: _State, mesh, prompts: int, tp: int, group: int, calls: int,
                      resident: int, log) -> list[Program]:
    """The sampler's prefill and decode for one call of ``prompts`` x ``group`` rows (``calls`` per step)."""
    st, N = st.rollout(), sampling.max_new_tokens
    sampler = Sampler(sampling, pad_id=sampling.stop_ids[0], mesh=mesh, rules=shd.ROLLOUT_RULES)
    ids = jax.ShapeDtypeStruct((prompts, tp), jnp.int32,
                               sharding=shd.batch_sharding(mesh, (prompts, tp), shd.ROLLOUT_RULES))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    prefill = Program(prefix + "prefill", calls, f"{prompts} prompts x {tp} tok -> {prompts * group} rows", resident)
    compiled = _compile(prefill, lambda g: sampler.prefill_program.lower(g, st.rollout_params, ids, ids,
                                                                         key, group), log, st)
    if compiled is None:
        decode = Program(prefix + "decode", calls * N, f"{prompts * group} rows x 1 tok, cache {tp + N}", resident)
        decode.error = "not compiled: its prefill does not fit"
        return [prefill, decode]
    # The decode state is what prefill returns (shapes and shardings; XLA's layouts left to it).
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), compiled.out_info)
    cache_bytes, S = _bytes_per_chip((state.cache.k, state.cache.v)), state.cache.length
    windows, parts, start = sampler.windows(state), [], tp
    lower = lambda g, w: sampler.decode_program.lower(g, st.rollout_params, sampler.with_window(state, w))
    counts = _window_counts(lower, st, windows)
    for w in windows:  # the steps that write slots [start, w) run in the program for window w
        part = Program(prefix + "decode", w - start, f"window {w}", resident,
                       unread_bytes=cache_bytes * (1 - w / S), window=w)
        _compile(part, lambda g, w=w: lower(g, w), log, st, counts(w))
        parts.append(part)
        start = w
    decode = _merge(prefix + "decode", f"{prompts * group} rows x 1 tok, cache {S}"
                    + (f", {len(windows)} windows" if len(windows) > 1 else ""), parts)
    decode.runs *= calls  # the parts counted one call's steps
    decode.parts, decode.cache_bytes = parts, cache_bytes
    return [prefill, decode]


def _window_counts(lower, st: _State, windows):
    """``window -> (unrolled, scanned)`` FLOP counts of the decode step (None: not scanned). A step's
    FLOPs are affine in its window (attention reads ``window`` slots), so the first and last windows'
    counts give every other's: two unrolled lowerings instead of one per window."""
    if st.count_graphdef is None:
        return lambda w: None
    first, last = (_flop_counts(lambda g, w=w: lower(g, w), st) for w in (windows[0], windows[-1]))
    if windows[-1] == windows[0]:
        return lambda w: first
    at = lambda w, i: first[i] + (last[i] - first[i]) * (w - windows[0]) / (windows[-1] - windows[0])
    return lambda w: (at(w, 0), at(w, 1))


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


