"""`realjax bench`: every benchmark runs end to end at tiny sizes and reports finite, positive numbers; the
baselines do the same work as realjax (same loss, same bytes). No timing is ever asserted: the numbers
measure a shared machine."""

import json
import math
import sys

import jax
import numpy as np
import pytest

from realjax import cli
from realjax.tools.bench import common as bench
from realjax.tools.bench.update import torch_real_loss
from realjax.models import abstract_model

TINY = ["--preset", "tiny", "--layers", "2", "--repeats", "1"]


def _run(capsys, *argv):
    rc = cli.main(["bench", *argv, "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert len(lines) == 1, lines  # --json prints exactly one line; everything else goes to stderr
    return json.loads(lines[0])


def _positive(res, *keys):
    for k in keys:
        assert isinstance(res[k], (int, float)) and math.isfinite(res[k]) and res[k] > 0, (k, res[k])


def test_sampler_bench(capsys):
    pytest.importorskip("torch")
    res = _run(capsys, "sampler", *TINY, "--batch", "2", "--prompt", "8", "--new", "6", "--bandwidth-mb", "4")
    _positive(res, "realjax_tok_s", "realjax_decode_tok_s", "baseline_tok_s", "ratio", "bound_tok_s",
              "fraction_of_bound", "bandwidth_gb_s", "compile_s", "bytes_per_step_mb", "torch_threads")
    assert res["first_token_agreement"] == 1.0  # same weights, greedy: both pick the same first tokens
    assert res["load_avg_1m"] >= 0


@pytest.mark.parametrize("tied", [True, False])
def test_decode_bytes_count_every_weight_once(tied):
    cfg = bench.preset_config("tiny").replace(tie_word_embeddings=tied)
    _, abstract = abstract_model(cfg)
    weights = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    B, S = 3, 10
    gathered = 0 if tied else (cfg.vocab_size - B) * cfg.hidden_size * 4  # only B rows of an untied embedding
    kv = 2 * cfg.num_layers * B * S * cfg.num_kv_heads * cfg.head_dim * 4
    assert bench.decode_bytes_per_step(cfg, B, S) == weights - gathered + kv


def test_update_bench_matches_torch_loss(capsys):
    pytest.importorskip("torch")
    res = _run(capsys, "update", *TINY, "--rows", "4", "--prompt", "6", "--response", "5", "--group-size", "2")
    _positive(res, "realjax_tok_s", "baseline_tok_s", "ratio", "compile_s", "torch_threads", "flops_per_step",
              "matmul_gflop_s", "bound_step_s", "fraction_of_bound", "ratio_at_bound")
    # Same weights and batch: the first step's loss is the same number on both sides.
    assert res["loss_realjax"] == pytest.approx(res["loss_torch"], rel=1e-4, abs=1e-5)


def test_update_flops_count_six_per_weight_per_token():
    cfg = bench.preset_config("tiny")  # tied: the embedding is the LM head
    rows, prompt, response = 3, 5, 4
    T = prompt + response - 1
    head = cfg.vocab_size * cfg.hidden_size
    attention = 3 * rows * 4 * T * T * cfg.num_heads * cfg.head_dim * cfg.num_layers
    want = 6 * (cfg.num_params() - head) * rows * T + 6 * head * rows * response + attention
    assert bench.update_flops(cfg, rows=rows, prompt=prompt, response=response) == want


def test_torch_real_loss_equals_realjax():
    torch = pytest.importorskip("torch")
    from realjax.losses import real_loss

    rng = np.random.default_rng(0)
    B, T, R = 12, 7, 4
    logp, old = -rng.random((B, T)).astype(np.float32), -rng.random((B, T)).astype(np.float32)
    mask = (rng.random((B, T)) < 0.8).astype(np.float32)
    rewards = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0], np.float32)  # mixed, all-right, all-wrong
    want, _ = real_loss(logp, old, mask, rewards, group_size=R, tau=0.5)
    got = torch_real_loss(*map(torch.from_numpy, (logp, old, mask, rewards)), group_size=R, tau=0.5)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_rl_step_bench(capsys):
    # one-operation problems: every prompt has the same length, so no later step recompiles for a new bucket
    res = _run(capsys, "rl-step", "--steps", "2", "data.train=synthetic:arithmetic?n=64&seed=0&min_ops=1&max_ops=1",
               "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=6", "mesh.fsdp=4", "mesh.tensor=2",
               "optim.mini_batches=1", "reward.workers=1", "trainer.logp_check_every=0")
    _positive(res, "step_s", "first_step_s", "rollout_s", "update_s")
    fractions = [res[f"{p}_fraction"] for p in ("rollout", "verifier", "scoring", "update", "host")]
    assert all(0 <= f <= 1 for f in fractions)
    assert sum(fractions) == pytest.approx(1.0, abs=1e-6)  # the phases make up the whole step
    assert 0 <= res["verifier_and_host_fraction"] <= 1


def test_gpu_bench_needs_a_gpu(capsys):
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    assert cli.main(["bench", "gpu"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_gpu_bench_pieces_on_cpu(capsys):
    res = _run(capsys, "gpu", "--preset", "tiny", "--layers", "1", "--repeats", "1", "--allow-cpu", "--prompt", "4",
               "--new", "4", "--tokens", "32", "--seq", "8", "--copy-mb", "1", "--matmul-n", "32")
    _positive(res, "copy_bandwidth_gb_s", "matmul_tflop_s", "decode_tok_s", "decode_roofline_tok_s",
              "decode_fraction", "learner_tok_s", "mfu")
    assert res["learner_tokens"] == 32


def test_rollout_bench(capsys, tmp_path):
    res = _run(capsys, "rollout", "--preset", "tiny", "--layers", "1", "--rows", "8", "--group-size", "2",
               "--prompt", "4", "--new", "10", "--window-tokens", "10", "--compact-every", "4", "--slots", "4",
               "--top-p", "0.95", "--vllm-python", _fake_vllm_python(tmp_path))
    _positive(res, "static_s", "engine_s", "static_tok_s", "engine_tok_s", "kv_min_gb", "vllm_tok_s", "vllm_s",
              "engine_vs_vllm", "static_vs_vllm")
    assert res["vllm_version"] == "fake" and res["top_p"] == 0.95  # the baseline ran through the subprocess protocol
    assert res["engine_vs_vllm"] == pytest.approx(res["engine_tok_s"] / res["vllm_tok_s"])
    assert res["tokens_equal"] and res["logprobs_max_diff"] < 1e-5  # the same samples, row for row
    # The engine never runs more row-steps nor reads more cache than the static loop, and never less
    # than the work itself.
    assert res["useful_tokens"] <= res["engine_row_steps"] <= res["static_row_steps"]
    assert 1.0 <= res["engine_kv_vs_min"] <= res["static_kv_vs_min"]
    # The step-cost bound prices both schedules with one measured per-step cost.
    assert res["speedup_of_bound"] == pytest.approx(res["speedup"] / res["speedup_bound"])


def test_oracle_lengths_match_r1_distill():
    from realjax.tools.bench.rollout import minimum_slots_read, oracle_lengths, static_slots_read

    lengths = oracle_lengths("r1-distill", 200_000, 8192)
    assert np.mean(lengths) / 8192 == pytest.approx(0.47, abs=0.01)  # mean about 0.47 N
    assert np.mean(lengths == 8192) == pytest.approx(0.045, abs=0.005)  # about 4.5% cut at N
    assert np.median(lengths) / 8192 == pytest.approx(0.43, abs=0.005)
    assert (oracle_lengths("all-max", 5, 7) == 7).all() and oracle_lengths("uniform", 1000, 7).min() >= 1
    with pytest.raises(ValueError, match="unknown length"):
        oracle_lengths("zipf", 4, 8)
    # Two rows of 3 and 2 tokens after a 4-token prompt: reads (4+1)+(4+2) and 4+1 slots at the least; the
    # static loop (one window of 7 slots) reads 7 slots per row for both of its two steps.
    assert minimum_slots_read(np.array([3, 2]), 4) == 16
    assert static_slots_read(np.array([3, 2]), 4, (7,)) == 28


# A stand-in for the two names of vLLM that realjax/tools/bench/vllm_runner.py uses, for an interpreter without vLLM:
# it checks the runner's arguments and the exported model, and returns each row's requested tokens
# (FAKE_VLLM_SHORT=1: one token short, as a vLLM that stopped early would).
FAKE_VLLM = '''
import json, os
from pathlib import Path

__version__ = "fake"


class SamplingParams:
    def __init__(self, *, temperature, top_p, min_tokens, max_tokens, ignore_eos, detokenize):
        assert temperature > 0 and 0 < top_p <= 1 and min_tokens == max_tokens and ignore_eos and not detokenize
        self.tokens = max_tokens - (os.environ.get("FAKE_VLLM_SHORT") == "1")


class LLM:
    def __init__(self, *, model, skip_tokenizer_init, dtype, seed, max_model_len):
        assert skip_tokenizer_init and dtype == "float32"
        assert list(Path(model).glob("*.safetensors"))  # the exported weights
        self.vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        self.max_model_len = max_model_len

    def generate(self, prompts, params, use_tqdm):
        class Out:
            def __init__(self, ids):
                self.outputs = [type("Completion", (), {"token_ids": ids})]
        assert len(prompts) == len(params)
        for p, sp in zip(prompts, params):
            assert max(p["prompt_token_ids"]) < self.vocab and len(p["prompt_token_ids"]) + sp.tokens <= self.max_model_len
        return [Out(list(range(sp.tokens))) for sp in params]
'''


def _fake_vllm_python(tmp_path):
    """An interpreter (this one) that imports the fake vllm above: the real subprocess and JSON protocol."""
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{tmp_path}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return str(python)


def test_vllm_baseline_must_do_the_same_work(tmp_path, monkeypatch):
    from realjax.tools.bench.vllm_baseline import VllmFailed, run_vllm
    from realjax.models import init_model

    model = init_model(bench.preset_config("tiny", layers=1), seed=0)
    python = _fake_vllm_python(tmp_path)
    got = run_vllm(python, model, np.array([[1, 2, 3]]), np.array([4, 2]), group_size=2, temperature=0.6, repeats=1)
    assert got["vllm_tok_s"] == pytest.approx(6 / got["vllm_s"])
    monkeypatch.setenv("FAKE_VLLM_SHORT", "1")
    with pytest.raises(VllmFailed, match="other lengths"):
        run_vllm(python, model, np.array([[1, 2, 3]]), np.array([4, 2]), group_size=2, temperature=0.6, repeats=1)
    with pytest.raises(VllmFailed, match="exited 1"):  # an interpreter without vLLM
        run_vllm(sys.executable, model, np.array([[1, 2, 3]]), np.array([4, 2]), group_size=2, temperature=0.6,
                 repeats=1)
