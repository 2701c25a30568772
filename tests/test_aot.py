"""`realjax compile` and the paper's configs: topology names, the configs' settings, AOT compiles for TPU.

The compile tests need libtpu (the `tpu` extra: it carries the TPU compiler) and are skipped without it.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from realjax.cli import compile as compile_command
from realjax.tools.aot import compile as aot, report as aot_report, topology
from realjax.tools.bench import rollout as bench_rollout
from realjax.cli import main as cli_main
from realjax.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# the paper's configs; *_lora.yaml are LoRA variants that depart from them (tests/test_lora.py)
PAPER = sorted(p for p in CONFIGS.glob("r1_distill_qwen_*.yaml") if not p.stem.endswith("_lora"))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install 'realjax[tpu]')")


# ----------------------------------------------------------------------------------------------------
# The paper's configs (PAPER.md 3.1 / 3.2)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem and cfg.rollout.prompts_per_step % cfg.optim.mini_batches == 0


def test_all_paper_configs_present():
    names = {p.stem for p in PAPER}
    assert names == {f"r1_distill_qwen_1.5b_{m}" for m in ("real", "real_bce", "grpo", "dapo", "gspo")} | {
        "r1_distill_qwen_7b_real"}


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_loads_with_paper_settings(path):
    cfg = load_config(path)
    r, o, e = cfg.rollout, cfg.optim, cfg.eval
    assert cfg.name == path.stem
    assert (r.prompts_per_step, r.group_size, o.mini_batches) == (128, 8, 4)
    assert (r.temperature, r.top_p, r.top_k, r.max_new_tokens, cfg.data.max_prompt_tokens) == (0.6, 1.0, 0, 8192, 1024)
    assert (o.weight_decay, o.grad_clip, o.b1, o.b2, o.schedule, o.warmup_steps) == (0.01, 1.0, 0.9, 0.999, "constant", 0)
    assert o.lr == (1e-6 if "7b" in path.stem else 2e-6)
    assert (e.n, e.temperature, e.top_p) == (16, 0.6, 0.95)
    assert cfg.reward.require_think and cfg.reward.fn == "math"
    assert (cfg.model.param_dtype, cfg.model.dtype) == ("float32", "bfloat16")
    assert cfg.model.preset == ("deepseek-r1-distill-qwen-7b" if "7b" in path.stem else "deepseek-r1-distill-qwen-1.5b")
    assert not r.dynamic_sampling and not r.overlong_filter  # the paper's DAPO baseline has neither
    # Micro-batches and sampler calls hold whole groups and split evenly.
    assert (r.prompts_per_step // o.mini_batches) % o.micro_batches == 0
    assert r.prompts_per_step % r.prompts_per_call == 0
    assert "dapo-math-17k" in cfg.data.train
    text = path.read_text()
    assert text.startswith("# ") and "realjax train --config configs/" + path.name in text
    assert "realjax compile --config configs/" + path.name in text and "Table" in text


def test_paper_config_objectives():
    loss = {p.stem.split("_", 4)[-1]: load_config(p).loss for p in PAPER if "1.5b" in p.stem}
    assert loss["real"].name == "real" and loss["real"].tau == 0.5
    assert loss["real_bce"].name == "real_bce" and loss["real_bce"].tau == 0.5
    assert (loss["grpo"].clip_eps, loss["grpo"].kl_coef, loss["grpo"].kl_estimator) == (0.2, 0.001, "k3")
    assert (loss["dapo"].clip_low, loss["dapo"].clip_high) == (0.2, 0.28)
    assert (loss["gspo"].clip_low, loss["gspo"].clip_high) == (3e-4, 4e-4)


# ----------------------------------------------------------------------------------------------------
# Topology names (no libtpu needed)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, chips, jax_name, host", [
    ("v5p-8", 4, "v5:2x2x1", (2, 2, 1)),
    ("v5p-16", 8, "v5:2x2x2", (2, 2, 1)),
    ("v5p-32", 16, "v5:2x2x4", (2, 2, 1)),
    ("v5p-128", 64, "v5:4x4x4", (2, 2, 1)),
    ("v4-8", 4, "v4:2x2x1", (2, 2, 1)),
    ("v4-64", 32, "v4:2x4x4", (2, 2, 1)),
    ("v5e-1", 1, "v5e:1x1", (1, 1, 1)),
    ("v5litepod-8", 8, "v5e:2x4", (2, 4, 1)),
    ("v5e-16", 16, "v5e:4x4", (2, 2, 1)),
    ("v6e-8", 8, "v6e:2x4", (2, 4, 1)),
    ("v6e-256", 256, "v6e:16x16", (2, 2, 1)),
    ("v5p:4x4x12", 192, "v5:4x4x12", (2, 2, 1)),
])
def test_parse_topology(name, chips, jax_name, host):
    topo = topology.parse_topology(name)
    assert (topo.chips, topo.jax_name, topo.host_bounds) == (chips, jax_name, host)
    assert math.prod(topo.shape) == chips


@pytest.mark.parametrize("name", ["v5p-7", "v3-8", "tpu", "v5p-24", "v6e:2x2x2"])
def test_parse_topology_rejects(name):
    with pytest.raises(ValueError):
        topology.parse_topology(name)


def test_chip_table():
    assert topology.CHIPS["v5p"].hbm_bytes == 95 * 2**30 and topology.CHIPS["v5p"].peak_flops == 459e12
    assert [topology.CHIPS[c].hbm_bytes // 2**30 for c in ("v4", "v5e", "v6e")] == [32, 16, 32]


def test_compile_without_libtpu_says_how_to_install(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` raises ImportError
    assert cli_main(["compile", "--topology", "v5p-8"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'realjax[tpu]'" in err and len(err.strip().splitlines()) == 1


def test_compile_bad_topology_is_a_one_line_error(capsys):
    assert cli_main(["compile", "--topology", "v9x-8"]) == 2
    assert "unknown TPU topology" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# AOT compiles (libtpu)
# ----------------------------------------------------------------------------------------------------
TINY = ["rollout.max_new_tokens=16", "rollout.prompts_per_step=8", "rollout.prompts_per_call=4",
        "data.max_prompt_tokens=16", "eval.n=4", "eval.prompts_per_call=4", "rollout.compact_every=4"]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """A one-layer version of the demo model compiled for v5p-8 through the CLI, as JSON. Only its
    config.json is needed: nothing is allocated, no weights are read."""
    if not HAS_LIBTPU:
        pytest.skip("libtpu not installed (pip install 'realjax[tpu]')")
    import contextlib
    import io

    from realjax.rl.setup import DEMO_ASSET

    model = tmp_path_factory.mktemp("tiny_model")
    arch = json.loads((DEMO_ASSET / "config.json").read_text())
    arch.update(num_hidden_layers=1, hidden_size=64, intermediate_size=128, head_dim=16)
    (model / "config.json").write_text(json.dumps(arch))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(["compile", "--topology", "v5p-8", "--json", f"model.path={model}", *TINY])
    return rc, out.getvalue()


@needs_libtpu
def test_tiny_compile_for_v5p_8(tiny_report):
    rc, text = tiny_report
    assert rc == 0 and len(text.strip().splitlines()) == 1
    rep = json.loads(text)
    assert rep["fits"] is True and (rep["chip"], rep["chips"], rep["jax_topology"]) == ("v5p", 4, "v5:2x2x1")
    assert rep["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert rep["hbm_bytes_per_chip"] == 95 * 2**30
    assert set(rep["programs"]) == {"prefill", "decode", "eval_prefill", "eval_decode", "update"}
    for name, p in rep["programs"].items():
        assert p["fits"] and not p["error"], name
        assert 0 < p["peak_bytes"] <= rep["peak_bytes_per_chip"]
        assert p["flops_per_chip"] > 0
    assert rep["programs"]["decode"]["runs_per_step"] == 16 * 2  # budget x (8 prompts / 4 per call)
    assert rep["programs"]["update"]["runs_per_step"] == 2  # the demo's optim.mini_batches
    assert rep["programs"]["eval_decode"]["runs_per_step"] == 0  # must fit, not part of the step time
    # tied embedding + q/k/v/o (4 heads, 2 kv heads, head 16) + q/k/v biases + SwiGLU + 3 norms
    assert rep["model"]["params"] == 102 * 64 + 3 * 64 * 64 + 8 * 16 + 3 * 64 * 128 + 3 * 64
    assert rep["flops"] > 0 and 0 < rep["step_time_lower_bound_s"] <= rep["step_time_roofline_s"]
    # The update's FLOPs are at least 6 x params x tokens (forward + backward), per chip.
    upd = rep["programs"]["update"]
    tokens = (8 * 8 // 2) * (16 + 16 - 1)
    assert upd["flops_per_chip"] * 4 >= 6 * rep["model"]["params"] * tokens * 0.5
    # The rollout on the engine under R1-Distill's lengths: fewer row-steps, a shorter bound.
    u = rep["rollout_under_lengths"]
    assert u["lengths"] == "r1-distill" and u["useful_tokens"] <= u["row_steps"] < 2 * 32 * 16
    assert 0 < u["rollout_roofline_s"] < rep["phase_time_roofline_s"]["rollout"]
    assert u["step_time_roofline_s"] < rep["step_time_roofline_s"]
    # The engine's own moves, the largest of each in that schedule, compiled: they fit at this size.
    moves = rep["engine_programs"]
    assert set(moves) == {"engine_compact", "engine_insert"} and all(p["fits"] for p in moves.values())
    assert moves["engine_compact"]["runs_per_step"] == u["compactions"] > 0
    assert moves["engine_insert"]["runs_per_step"] == u["inserts"] == 2  # one call's rows each, all slots free
    assert moves["engine_compact"]["shape"].startswith(f"{u['largest_compaction'][0]} -> {u['largest_compaction'][1]} ")


def test_rollout_under_lengths_prices_the_engine_schedule():
    """A decode whose steps read only the KV cache: the engine's price is the cache slots its chunks read
    (rows x window x steps), at HBM bandwidth, whatever the distribution; its compactions and inserts move
    the kept rows' whole cache and the entering rows' prompt slots."""
    from realjax.tools.aot.lengths import rollout_under_lengths
    from realjax.sampling.schedule import schedule, simulate

    chip, rows, prompt, new, cache = topology.CHIPS["v5p"], 16, 4, 12, 2**30
    parts = [aot.Program("decode", 6, "", 0, memory={"argument": cache}, window=w) for w in (10, 16)]
    decode = aot.Program("decode", 12, "", 0, memory={"argument": cache}, parts=parts, cache_bytes=cache)
    prefill = aot.Program("prefill", 1, "", 0, memory={"argument": 1})
    kw = dict(prefill=prefill, decode=decode, chip=chip, prompts=2, prompt=prompt, new=new,
              multiple=2, compact_every=3, window_tokens=6)
    for name, slots in [("r1-distill", 0), ("uniform", 0), ("uniform", 4), ("all-max", 0)]:
        u = rollout_under_lengths(name, rows=rows, calls=1, slots=slots, **kw)
        chunks = simulate(bench_rollout.oracle_lengths(name, rows, new), prompt=prompt, new=new, slots=slots,
                          multiple=2, compact_every=3, window_tokens=6)
        slot_steps = sum(b * w * s for b, w, s in chunks)
        assert u["decode_s"] == pytest.approx(cache * slot_steps / (rows * (prompt + new)) / chip.hbm_bandwidth)
        assert u["row_steps"] == rows + sum(b * s for b, _, s in chunks)
        plan = schedule(bench_rollout.oracle_lengths(name, rows, new), prompt=prompt, new=new, slots=slots,
                        multiple=2, compact_every=3, window_tokens=6)
        kept = sum(b for _, b in plan.compactions)  # each kept row's whole cache zeroed, read and written once
        assert u["compactions"] == len(plan.compactions) and u["inserts"] == len(plan.inserts)
        assert u["compaction_s"] == pytest.approx(3 * kept * cache / rows / chip.hbm_bandwidth)
        assert u["inserted_rows"] == rows
        assert u["rollout_roofline_s"] == pytest.approx(u["prefill_s"] + u["decode_s"] + u["compaction_s"]
                                                        + u["insert_s"])
        if name != "all-max":
            assert u["compactions"] > 0 and u["compaction_s"] > 0
    assert u["utilisation"] > 0.9 and u["useful_tokens"] == rows * new  # all-max: every slot busy
    # All-max in one bucket: no compaction; one insert of every row, its padded slot list the bucket itself:
    # the prompts' 4 of 16 slots read and written for all 16 rows.
    assert u["compactions"] == 0 and u["inserts"] == 1
    assert u["insert_s"] == pytest.approx(2 * cache * prompt / (prompt + new) / chip.hbm_bandwidth)
    # Two calls' rows through the compiled call's slots in one call: the same price per slot-step.
    two = rollout_under_lengths("r1-distill", rows=2 * rows, calls=1, slots=rows, compiled_rows=rows, **kw)
    chunks = simulate(bench_rollout.oracle_lengths("r1-distill", 2 * rows, new), prompt=prompt, new=new, slots=rows,
                      multiple=2, compact_every=3, window_tokens=6)
    slot_steps = sum(b * w * s for b, w, s in chunks)
    assert two["decode_s"] == pytest.approx(cache * slot_steps / (rows * (prompt + new)) / chip.hbm_bandwidth)
    with pytest.raises(ValueError, match="unknown length"):
        rollout_under_lengths("zipf", rows=rows, calls=1, slots=0, **kw)


@needs_libtpu
def test_compile_exit_1_when_it_does_not_fit(tiny_report, monkeypatch, capsys):
    """The tiny report as if the update needed more than the chip has: exit 1 and the table says so."""
    rep = json.loads(tiny_report[1])
    rep["programs"]["update"]["fits"] = rep["fits"] = False
    monkeypatch.setattr(compile_command, "compile_report", lambda cfg, topology, **kw: rep)
    assert cli_main(["compile", "--topology", "v5p-8", *TINY]) == 1
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "> HBM" in text and "update" in text


@needs_libtpu
def test_long_decode_keeps_one_cache_and_reads_it_by_windows(tmp_path):
    """A shape where the KV cache dominates the decode program (2 layers, 2048 new tokens). A layer's cache
    is [B, K, S, H], the layout the attention dot reads, so the TPU compiler updates it in place: with
    [B, S, K, H] it copied the whole cache into that layout around the loop (temp = the cache). The
    budget runs in two windows, and a step of the first reads only its half of the cache."""
    import contextlib
    import io

    from realjax.rl.setup import DEMO_ASSET

    arch = json.loads((DEMO_ASSET / "config.json").read_text())
    arch.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, head_dim=128)
    (tmp_path / "config.json").write_text(json.dumps(arch))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(["compile", "--topology", "v5p-8", "--json", f"model.path={tmp_path}",
                       "rollout.max_new_tokens=2048", "data.max_prompt_tokens=64", "rollout.prompts_per_step=16",
                       "rollout.prompts_per_call=16", "optim.mini_batches=16", "data.eval="])
    assert rc == 0
    dec = json.loads(out.getvalue())["programs"]["decode"]
    rows_per_chip, slots = 16 * 8 // 4, 64 + 2048
    cache = 2 * 2 * rows_per_chip * slots * 2 * 128 * 4  # layers x (k, v) x [B, K, S, H] fp32, per chip
    assert dec["argument_bytes"] > cache and dec["temp_bytes"] < 0.1 * cache
    assert dec["output_bytes"] - dec["alias_bytes"] < 0.01 * cache  # the state comes back in its own buffers
    assert ", 2 windows" in dec["shape"] and dec["runs_per_step"] == 2048
    # Half the steps read the cache up to slot 64 + 1024 of 2112, the other half all of it.
    unread = cache * (1 - (64 + 1024) / slots) / 2
    assert dec["read_bytes_per_chip"] == pytest.approx(dec["argument_bytes"] - unread)


def _compile_json(model_dir, *overrides) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(["compile", "--topology", "v5p-8", "--json", f"model.path={model_dir}", *overrides])
    assert rc == 0
    return json.loads(out.getvalue())


@needs_libtpu
def test_scanned_layers_keep_the_cache_in_place_and_count_every_layer(tmp_path):
    """Scanned layers (one stacked block under a scan, the cache [L, B, K, S, H] in the scan's carry) give
    the unrolled programs' FLOPs (scaled by the unrolled lowering's count: XLA counts a loop body once)
    and update the cache in place. Left free, the TPU compiler laid the loop-carried cache out as the new
    keys it writes ([L, S, K, B, H] in memory) and copied the whole cache into that layout around the
    decode loop (temp = the cache); the scan body now pins it to the arguments' layout."""
    from realjax.rl.setup import DEMO_ASSET

    arch = json.loads((DEMO_ASSET / "config.json").read_text())
    arch.update(num_hidden_layers=3, hidden_size=64, intermediate_size=128, head_dim=128)
    (tmp_path / "config.json").write_text(json.dumps(arch))
    shape = ["rollout.max_new_tokens=512", "data.max_prompt_tokens=64", "rollout.prompts_per_step=16",
             "rollout.prompts_per_call=16", "optim.mini_batches=16", "data.eval="]
    scanned = _compile_json(tmp_path, *shape, "model.scan_layers=true")
    unrolled = _compile_json(tmp_path, *shape, "model.scan_layers=false")
    assert scanned["model"]["params"] == unrolled["model"]["params"]
    for name in ("prefill", "decode", "update"):
        s, u = scanned["programs"][name], unrolled["programs"][name]
        # forward programs count the same ops; the scan's backward adds a few per-layer slice updates
        assert s["flops_per_chip"] == pytest.approx(u["flops_per_chip"], rel=0.03 if name == "update" else 1e-3), name
        assert s["argument_bytes"] == pytest.approx(u["argument_bytes"], rel=1e-2), name  # TPU tiles pad [L, D]
    cache = 3 * 2 * (16 * 8 // 4) * (64 + 512) * 2 * 128 * 4  # layers x (k, v) x [B, K, S, H] fp32, per chip
    dec, dec_u = scanned["programs"]["decode"], unrolled["programs"]["decode"]
    assert dec_u["temp_bytes"] < 0.1 * cache and dec["temp_bytes"] < 0.1 * cache
    assert dec["output_bytes"] - dec["alias_bytes"] < 0.01 * cache  # the state comes back in its own buffers


@needs_libtpu
def test_scanned_decode_keeps_the_cache_in_place_on_a_tensor_parallel_mesh(tmp_path):
    """The scan body's layout pin on the carried cache, on fsdp=2 x tensor=4 (the 7B LoRA config's mesh).
    Pinned on the global array, XLA's partitioner gathered the cache of all 8 chips onto each one around
    the pin (temp 16x the cache per chip here, 27 GiB for the 7B's decode); pinned per shard, the scanned
    decode's temp is as small as the unrolled one's."""
    from realjax.rl.setup import DEMO_ASSET

    arch = json.loads((DEMO_ASSET / "config.json").read_text())
    arch.update(num_hidden_layers=3, hidden_size=64, intermediate_size=128, head_dim=128, num_attention_heads=8,
                num_key_value_heads=4)
    (tmp_path / "config.json").write_text(json.dumps(arch))
    shape = ["rollout.max_new_tokens=512", "data.max_prompt_tokens=64", "rollout.prompts_per_step=16",
             "rollout.prompts_per_call=16", "optim.mini_batches=16", "data.eval=", "mesh.tensor=4"]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(["compile", "--topology", "v5e-8", "--json", f"model.path={tmp_path}", *shape,
                       "model.scan_layers=true"])
    assert rc == 0
    rep = json.loads(out.getvalue())
    assert rep["mesh"] == {"data": 1, "fsdp": 2, "tensor": 4}
    # layers x (k, v) x [B, K, S, H] fp32 per chip: rows over fsdp, kv heads over tensor
    cache = 3 * 2 * (16 * 8 // 2) * 1 * (64 + 512) * 128 * 4
    dec = rep["programs"]["decode"]
    assert dec["argument_bytes"] > cache and dec["temp_bytes"] < 0.1 * cache
    assert dec["output_bytes"] - dec["alias_bytes"] < 0.01 * cache  # the state comes back in its own buffers


@needs_libtpu
def test_programs_compiled_on_two_threads_give_the_report_of_one(tmp_path):
    """Independent programs compile side by side (``--jobs``): every number of the report, memory and
    FLOPs of each program (the decode windows' merged row, the scanned FLOP counts) is the one-thread
    report's; only the seconds differ."""
    from realjax.rl.setup import DEMO_ASSET

    arch = json.loads((DEMO_ASSET / "config.json").read_text())
    arch.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, head_dim=16)
    (tmp_path / "config.json").write_text(json.dumps(arch))
    shape = [*TINY, "rollout.max_new_tokens=48", "rollout.window_tokens=16", "model.scan_layers=true"]

    def numbers(rep):
        for p in [*rep["programs"].values(), *rep.get("engine_programs", {}).values()]:
            for k in ("compile_s", "lower_s", "count_s"):
                assert p.pop(k, 0) >= 0
        return rep

    two, one = (numbers(_compile_json(tmp_path, *shape, f"--jobs={n}")) for n in (2, 1))
    assert two["programs"]["decode"]["shape"].endswith(", 3 windows (1 interpolated)")
    assert len(two["programs"]["decode"]["window_peak_bytes"]) == 2  # the first and widest are compiled
    # The evaluation decode (not priced) compiles its widest window only.
    assert two["programs"]["eval_decode"]["shape"].endswith(", widest of 3 windows")
    assert "window_peak_bytes" not in two["programs"]["eval_decode"]
    assert set(two["programs"]) == {"prefill", "decode", "eval_prefill", "eval_decode", "update"}
    assert two == one


@needs_libtpu
def test_interpolated_decode_windows_give_the_report_of_every_window(tmp_path, monkeypatch):
    """The training decode compiles its first and widest windows and interpolates the others: the merged
    decode row (FLOPs, bytes, peak: what the step bound and the fit read) is the one that compiling every
    window gives, and the widest window holds the largest peak."""
    from realjax.rl.setup import DEMO_ASSET
    from realjax.tools.aot import compile as aot

    arch = json.loads((DEMO_ASSET / "config.json").read_text())
    arch.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, head_dim=16)
    (tmp_path / "config.json").write_text(json.dumps(arch))
    shape = [*TINY, "rollout.max_new_tokens=64", "rollout.window_tokens=16", "model.scan_layers=true", "data.eval="]
    reports = {}
    for mode in ("all", "ends"):
        monkeypatch.setattr(aot, "TRAINING_WINDOWS", mode)
        reports[mode] = _compile_json(tmp_path, *shape)["programs"]["decode"]
    every, ends = reports["all"], reports["ends"]
    assert every["shape"].endswith(", 4 windows") and ends["shape"].endswith(", 4 windows (2 interpolated)")
    assert max(every["window_peak_bytes"]) == every["window_peak_bytes"][-1] == ends["window_peak_bytes"][-1]
    for key in ("peak_bytes", "temp_bytes", "argument_bytes", "read_bytes_per_chip"):
        assert ends[key] == every[key], key
    for key in ("flops_per_chip", "xla_bytes_accessed_per_chip", "time_hbm_s"):
        assert ends[key] == pytest.approx(every[key], rel=1e-3), key


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("config, topology", [("r1_distill_qwen_1.5b_real", "v5p-8"),
                                              ("r1_distill_qwen_7b_real", "v5p-32")])
def test_paper_config_fits(config, topology):
    """The full-size compiles of docs/aot_reports.md (minutes each on a small host)."""
    cfg = load_config(CONFIGS / f"{config}.yaml")
    rep = aot.compile_report(cfg, topology)
    assert rep["fits"], aot_report.format_report(rep, config)
    assert rep["peak_bytes_per_chip"] < 0.9 * rep["hbm_bytes_per_chip"]
