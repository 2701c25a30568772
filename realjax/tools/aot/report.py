"""The compile report as the table ``realjax compile`` prints."""

from __future__ import annotations

from realjax.tools.aot.packed_update import format_update_line

GiB = 1024 ** 3


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
    updates = [format_update_line(rep["update_under_lengths"])] if rep.get("update_under_lengths") else []
    return "\n".join(lines + ["", legend, step, *_lengths_line(rep), *updates, verdict])


def _lengths_line(rep: dict) -> list[str]:
    """The rollout on the engine under a length distribution, beside the all-max bound."""
    allmax, lines = rep["phase_time_roofline_s"]["rollout"], []
    for key in ("rollout_under_lengths", "rollout_under_lengths_one_call"):
        u = rep.get(key)
        if not u:
            continue
        lines.append(
            f"rollout under {u['lengths']} lengths (mean {u['mean_tokens']:.0f} tok, {u['cut_at_max']:.1%} cut at the "
            f"budget) on the engine, {u['calls']} call(s) of {u['rows_per_call']} rows in {u['slots']} slots: "
            f"{_secs(u['rollout_roofline_s'])} ({u['rollout_roofline_s'] / allmax:.2f} x all-max {_secs(allmax)}), "
            f"slot utilisation {u['utilisation']:.1%}, {u['decode_programs']} decode programs, "
            f"{u['compactions']} compactions ({_secs(u['compaction_s'])}) and {u['inserts']} inserts of "
            f"{u['inserted_rows']} rows ({_secs(u['insert_s'])}) at HBM bandwidth; RL step "
            f"{_secs(u['step_time_roofline_s'])}; decode peak with the prompts' cache "
            f"{_gib(u['engine_decode_peak_bytes_per_chip'])} GiB")
    for name, p in rep.get("engine_programs", {}).items():  # the largest of the engine's own moves
        size = (f"peak {_gib(p['peak_bytes'])} + resident {_gib(p['resident_bytes'])} = {_gib(p['total_bytes'])} GiB"
                if "argument_bytes" in p else f"XLA asked for {_gib(p['peak_bytes'])} GiB: {p['error']}")
        lines.append(f"{name} ({p['shape']}, {p['runs_per_step']} per step, the largest): "
                     f"{'fits' if p['fits'] else 'DOES NOT FIT'}, {size}")
    return lines
