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
``realjax.tools.aot.engine_moves``): they must fit too. The schedule depends on the config alone, so
they compile beside the model's programs. A packed update compiles at the largest shape the step's
updates run under the same distribution (``realjax.tools.aot.packed_update``).

With ``data.eval`` set, the evaluation sampler's two programs (``eval.n`` samples per prompt,
``eval.prompts_per_call`` prompts) are compiled too: they must fit, but are not part of the step time,
so of its decode windows only the widest (its largest temporaries) is compiled.

Time is bounded below per program by ``flops / peak FLOP/s`` (compute) and by reading every argument
once at HBM bandwidth (weights and KV cache: what bounds decoding). XLA counts a ``while_loop`` body
once, so the decode program's numbers are one decode step; the RL-step bound assumes every row runs
the full budget. The sampler decodes in cache windows (``SamplingConfig.window_tokens``), one program
each: the first and the widest are compiled and the others interpolated between them
(``programs.interpolate``; ``TRAINING_WINDOWS = "all"`` compiles every one), and the ``decode`` row
merges them (the largest peak; FLOPs and bytes read averaged over the steps), a step reading the KV
cache only up to its window. XLA's own "bytes
accessed" is kept in the JSON; it counts whole-buffer traffic of in-place cache updates, so it
overstates decoding several times. For the same reason a model with scanned layers
(``model.scan_layers``) would count one layer: its FLOPs are the compiled program's times the ratio of
two uncompiled counts of the whole (unpartitioned) program, one lowered with the layer scan unrolled
(``ModelConfig.unroll_scan``: same parameters) and the one compiled (``realjax.tools.aot.programs``).
Memory and compile time are the scanned program's own. Independent programs compile side by side on
``workers`` threads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
from realjax.tools.aot.lengths import call_schedules, largest_moves, rollout_under_lengths
from realjax.tools.aot.packed_update import largest_shape, price_config
from realjax.tools.aot.programs import Jobs, Program, compile_program, interpolate, merge, window_unrolled_flops
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
    count_graphdef: Any = None  # the model with its layer scan unrolled, for FLOPs (None: not scanned)
    rollout_count_graphdef: Any = None  # the rollout model's, unrolled (None: not scanned)

    def rollout(self) -> "_State":
        """The state as the sampler's programs see it: the rollout model, counted as such."""
        return dataclasses.replace(self, graphdef=self.rollout_graphdef, count_graphdef=self.rollout_count_graphdef)

    def unrolled(self) -> "_State":
        """The same state with the model's layer scan unrolled: same parameters, XLA counts every layer."""
        return dataclasses.replace(self, graphdef=self.count_graphdef)


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
    return _State(graphdef, plan, state, rollout_params, sizes, rollout_graphdef, unrolled(mcfg), unrolled(plain))


def compile_report(cfg, topology: str, *, log=lambda message: None, lengths: str = "r1-distill",
                   workers: int = 2) -> dict:
    """Compile the RL step of ``cfg`` for ``topology`` (e.g. "v5p-8"); per-chip memory, FLOPs, fits.

    ``log`` receives a line as each program starts compiling (minutes each at 8k tokens on a small host).
    ``lengths``: the length distribution the rollout is also priced under (``realjax.tools.aot.lengths``).
    ``workers``: programs compiled side by side (``programs.Jobs``); the report does not depend on it.
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
    with Jobs(workers) as jobs:
        # -- learner: one update per mini-batch (the longest compile: first) ---------------------------
        micro_rows = plan.rows_per_micro_batch
        # packed: at the largest shape the updates run under ``lengths`` (the memory that must fit)
        priced = price_config(cfg, mcfg, lengths, prompt=tp, attention=plan.attention.name,
                              multiple=shd.batch_rows_multiple(mesh, shd.TRAIN_RULES))
        packed, packed_len = largest_shape(priced, (plan.packed_sequences(micro_rows, tp + N - 1), tp + N - 1))
        update = Program("update", o.mini_batches, f"{o.micro_batches} x {micro_rows} rows x {tp}+{N} tok"
                         + (f" packed into {packed} x {packed_len}" if packed else ""), b["ref_params"])
        batch = UpdateBatch.spec((o.micro_batches, micro_rows), tp, N, with_ref=plan.use_ref,
                                 sharding=plan.batch_sharding,
                                 with_sampler=cfg.rollout.is_correction != "none",  # importance weights need both
                                 packed_sequences=packed, packed_length=packed_len)
        # LoRA dropout draws its masks from a key the trainer passes to each update
        key = (jax.eval_shape(lambda: jax.random.key(0)) if plan.lora is not None and plan.lora.dropout > 0 else None)
        jobs.submit(compile_program, update, lambda s: s.plan.update_step(s.graphdef).lower(s.state, batch, key),
                    log, st)

        # -- rollout: the sampler's prefill and decode (and the evaluation sampler's) ----------------
        # The training weights (when the rollout copy is separate), Adam moments and GRPO's reference stay.
        resident = (b["params"] + b["frozen"] if b["rollout_params"] else 0) + b["opt_state"] + b["ref_params"]
        per_call = r.prompts_per_call or r.prompts_per_step
        calls, multiple = r.prompts_per_step // per_call, shd.batch_rows_multiple(mesh, shd.ROLLOUT_RULES)
        samplers = [_sampler_programs(jobs, "", plan.sampling, st, mesh, per_call, tp, R, calls, resident, log)]
        if cfg.data.eval:
            samplers.append(_sampler_programs(jobs, "eval_", plan.eval_sampling, st, mesh, plan.eval_prompts_per_call,
                                              tp, e.n, 0, resident, log, every_window=False))

        # -- learner: old / reference log-probs over the whole batch ---------------------------------
        rows, score = plan.rows_per_step, []
        if plan.recompute_old_logp or plan.use_ref:
            chunks = plan.scoring_chunks
            score = [Program("score", int(plan.recompute_old_logp) + int(plan.use_ref),
                             f"{chunks} x {rows // chunks} rows x {tp}+{N} tok", b["opt_state"] + b["ref_params"])]
            sbatch = UpdateBatch.spec((chunks, rows // chunks), tp, N, with_ref=False, sharding=plan.batch_sharding,
                                      packed_sequences=plan.packed_sequences(rows // chunks, tp + N - 1))
            jobs.submit(compile_program, score[0],
                        lambda s: s.plan.scoring_fn(s.graphdef).lower(s.state.params, sbatch, s.state.frozen), log, st)
        moves, schedules = _submit_engine_moves(jobs, cfg, st, mcfg, mesh, log, lengths=lengths, rows=per_call * R,
                                                calls=calls, prompts=per_call, prompt=tp, multiple=multiple)
        jobs.wait()
    programs = [p for finish in samplers for p in finish()] + score + [update]
    rep = _summarise(cfg, topo, mesh, mcfg, source, programs, b)
    if programs[1].parts and not programs[1].error:  # the training decode compiled
        rows = per_call * R
        price = functools.partial(
            rollout_under_lengths, lengths, prefill=programs[0], decode=programs[1], chip=topo.chip, prompt=tp,
            new=N, multiple=multiple, compact_every=r.compact_every,
            window_tokens=plan.sampling.window_tokens, compiled_rows=rows)
        # As configured; and the step's rows in one call through the same slots (refill across the calls:
        # the longest rows' tail is paid once, not once per call).
        scenarios = {"rollout_under_lengths": price(rows=rows, calls=calls, prompts=per_call, slots=r.slots,
                                                    schedules=schedules)}
        if calls > 1:
            scenarios["rollout_under_lengths_one_call"] = price(rows=rows * calls, calls=1, prompts=r.prompts_per_step,
                                                                slots=min(r.slots or rows, rows))
        for key, under in scenarios.items():
            under["step_time_roofline_s"] = (rep["step_time_roofline_s"] - rep["phase_time_roofline_s"]["rollout"]
                                             + under["rollout_roofline_s"])
            rep[key] = under
        _engine_report(rep, moves, programs[1], resident)
    rep["update_under_lengths"] = priced
    return rep


def _submit_engine_moves(jobs: Jobs, cfg, st: _State, mcfg, mesh, log, *, lengths: str, rows: int, calls: int,
                         prompts: int, prompt: int, multiple: int) -> tuple[list[Program], tuple]:
    """Submit the compiles of the largest compaction and insert the engine runs in the priced schedule (they
    must fit too: ``realjax.tools.aot.engine_moves``). The schedule depends on the config alone, so they
    compile beside the model's programs rather than after them; what lives beside them is known once the
    decode has compiled (``_engine_report``). Returns the moves and the schedules (``call_schedules``),
    which the rollout's price reuses."""
    r = cfg.rollout
    schedules = call_schedules(lengths, rows=rows, calls=calls, prompt=prompt, new=r.max_new_tokens, slots=r.slots,
                              multiple=multiple, compact_every=r.compact_every,
                              window_tokens=st.plan.sampling.window_tokens)
    plans = schedules[1]
    compaction, insert = largest_moves(plans)
    moves = []
    for name, shape, lower in engine_move_lowerings(
            st.plan.sampling, mcfg, mesh, prompts=prompts, group=r.group_size, prompt=prompt, slots=r.slots,
            compact_every=r.compact_every, compaction=compaction, insert=insert):
        runs = sum(len(plan.compactions if name == "engine_compact" else plan.inserts) for plan in plans)
        moves.append(Program(name, runs, shape, 0))
        # no model in these programs: nothing to count, and their lowering ignores the graphdef
        jobs.submit(compile_program, moves[-1], lambda s, lower=lower: lower(s.graphdef), log,
                    dataclasses.replace(st, count_graphdef=None))
    return moves, schedules


def _engine_report(rep: dict, moves: list[Program], decode: Program, resident: int) -> None:
    """The engine's compiled moves in the report: beside them live the rollout weights and, for a
    compaction, the prompts' cache."""
    under = rep["rollout_under_lengths"]
    weights = decode.parts[-1].memory["argument"] - decode.cache_bytes
    rep["engine_programs"] = {}
    for p in moves:
        compact = p.name == "engine_compact"
        p.resident_bytes = resident + weights + (under["engine_prompts_cache_bytes_per_chip"] if compact else 0)
        rep["engine_programs"][p.name] = {
            "runs_per_step": p.runs, "shape": p.shape, **{f"{k}_bytes": v for k, v in p.memory.items()},
            "resident_bytes": p.resident_bytes, "total_bytes": p.total, "xla_bytes_accessed_per_chip": p.bytes_accessed,
            "fits": not p.error and p.total <= rep["hbm_bytes_per_chip"], "compile_s": round(p.compile_s, 2),
            "error": p.error}
    rep["fits"] = rep["fits"] and all(v["fits"] for v in rep["engine_programs"].values())


# "ends": the training decode compiles its first and widest windows and interpolates the others; "all"
# compiles every window (the tests compare the two).
TRAINING_WINDOWS = "ends"


def _sampler_programs(jobs: Jobs, prefix: str, sampling, st: _State, mesh, prompts: int, tp: int, group: int,
                      calls: int, resident: int, log, *, every_window: bool = True):
    """Submit the sampler's prefill for one call of ``prompts`` x ``group`` rows (``calls`` per step), whose
    job submits the decode windows; returns a function that gives [prefill, decode] once the jobs ran.

    ``every_window=False`` (the evaluation sampler: it must fit, but is not priced) compiles only the widest
    window, the whole cache. The windows are one program but for the span attention reads, and their
    arguments and outputs are the same buffers, so the widest has the largest temporaries (the training
    decode's compiled windows show it, ``window_peak_bytes``). Its FLOPs are the widest window's, not the
    mean over the windows. The training decode (priced) compiles its first and widest windows and
    interpolates the others (``TRAINING_WINDOWS``)."""
    st, N = st.rollout(), sampling.max_new_tokens
    sampler = Sampler(sampling, pad_id=sampling.stop_ids[0], mesh=mesh, rules=shd.ROLLOUT_RULES)
    ids = jax.ShapeDtypeStruct((prompts, tp), jnp.int32,
                               sharding=shd.batch_sharding(mesh, (prompts, tp), shd.ROLLOUT_RULES))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    prefill = Program(prefix + "prefill", calls, f"{prompts} prompts x {tp} tok -> {prompts * group} rows", resident)
    parts, cache = [], {}  # filled by the prefill's job

    def prefill_then_windows():
        compiled = compile_program(prefill, lambda s: sampler.prefill_program.lower(
            s.graphdef, s.rollout_params, ids, ids, key, group), log, st)
        if compiled is None:
            return
        # The decode state is what prefill returns (shapes and shardings; XLA's layouts left to it).
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), compiled.out_info)
        windows, start = sampler.windows(state), tp
        cache.update(bytes=_bytes_per_chip((state.cache.k, state.cache.v)), slots=state.cache.length,
                     windows=len(windows))
        if not every_window:  # one part for every step: the widest window's program
            windows = windows[-1:]
        lower = lambda s, w: sampler.decode_program.lower(s.graphdef, s.rollout_params, sampler.with_window(state, w))
        t0 = time.perf_counter()
        unrolled = window_unrolled_flops(lower, st, windows) if st.count_graphdef is not None else lambda w: None
        for w in windows:  # the steps that write slots [start, w) run in the program for window w
            parts.append(Program(prefix + "decode", w - start, f"window {w}", resident,
                                 unread_bytes=cache["bytes"] * (1 - w / cache["slots"]), window=w))
            start = w
        parts[0].count_s = time.perf_counter() - t0
        cache["interpolate"] = every_window and TRAINING_WINDOWS == "ends" and len(parts) > 2
        for part in ([parts[0], parts[-1]] if cache["interpolate"] else parts):
            jobs.submit(compile_program, part, lambda s, w=part.window: lower(s, w), log, st, unrolled(part.window))

    jobs.submit(prefill_then_windows)

    def programs() -> list[Program]:
        if not parts:
            decode = Program(prefix + "decode", calls * N, f"{prompts * group} rows x 1 tok, cache {tp + N}", resident)
            decode.error = "not compiled: its prefill does not fit"
            return [prefill, decode]
        n = cache["windows"]
        windows = "" if n == 1 else f", {n} windows" if len(parts) == n else f", widest of {n} windows"
        if cache["interpolate"]:  # the windows between the first and the widest were not compiled
            interpolate(parts)
            windows += f" ({len(parts) - 2} interpolated)"
        decode = merge(prefix + "decode", f"{prompts * group} rows x 1 tok, cache {cache['slots']}{windows}", parts)
        decode.runs *= calls  # the parts counted one call's steps
        decode.parts, decode.cache_bytes = parts, cache["bytes"]
        return [prefill, decode]

    return programs


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
                       "time_hbm_s": t_hbm, "compile_s": round(p.compile_s, 2), "lower_s": round(p.lower_s, 2),
                       "count_s": round(p.count_s, 2), "error": p.error,
                       **({"window_peak_bytes": [q.peak for q in p.parts if not q.interpolated]}
                          if len(p.parts) > 1 else {})}
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


