"""`realjax study`: the statistics against hand-computed values, the run plan, and a tiny study end to end
(summary.md and figures written; a rerun skips finished runs and redoes only an unfinished one)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from realjax.tools.study import report as rep, results as res
from realjax.config import demo_config_path
from realjax.tools.study.design import DONE_FILE, PAPER_HPARAMS
from realjax.tools.study.runs import StudyError, plan

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------
def test_t_quantiles_and_interval():
    assert res.t95(1) == 12.706 and res.t95(4) == 2.776 and res.t95(30) == 2.042
    assert res.t95(35) == 2.042 and res.t95(1000) == 1.960  # between entries: the smaller df (wider)
    assert math.isnan(res.t95(0))
    mean, half, n = res.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (mean, n) == (3.0, 5) and half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))
    mean, half, n = res.mean_ci([0.4, float("nan"), None])  # non-finite values are left out
    assert (mean, n) == (0.4, 1) and math.isnan(half)
    assert res.mean_ci([])[2] == 0


def test_t_table_matches_scipy_where_available():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 19, 29, 60, 120):
        assert res.t95(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)


def test_area_under_curve_and_threshold():
    assert res.area_under_curve([0, 5, 10], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert res.area_under_curve([0, 10], [0.2, 0.4]) == pytest.approx(0.3)
    assert res.area_under_curve([7], [0.3]) == 0.3
    assert res.steps_to_threshold([5, 10, 15], [0.1, 0.45, 0.5], 0.45) == 10
    assert res.steps_to_threshold([5, 10], [0.1, 0.2], 0.45) is None


def _fake_run(root, loss, seed, evals, entropy, status="finished"):
    """A run dir like the trainer's: train rows every step, eval rows at the given steps."""
    run = Path(root) / f"{loss}_s{seed}"
    run.mkdir(parents=True)
    rows = []
    for step in range(1, len(entropy) + 1):
        rows.append({"step": step, "loss": 0.1, "entropy": entropy[step - 1], "reward/mean": 0.5,
                     "response_length/mean": 20.0 + step})
    rows += [{"step": s, "eval/arithmetic/pass@1": v, "eval/pass@1": v, "time/eval": 1.0} for s, v in evals]
    rows.sort(key=lambda r: r["step"])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / DONE_FILE).write_text(json.dumps({"status": status, "wall_time_s": 10.0, "step": 3}))
    return run


def test_run_numbers_from_metrics(tmp_path):
    ent = [0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2]
    run = _fake_run(tmp_path, "real", 0, [(0, 0.30), (5, 0.35), (10, 0.45)], ent)
    r = res.load_run(run, "real", 0)
    assert r.base == 0.30 and r.final == 0.45 and r.reached == 10 and not r.diverged
    assert r.auc == pytest.approx(((0.30 + 0.35) / 2 * 5 + (0.35 + 0.45) / 2 * 5) / 10)
    assert r.final_entropy == pytest.approx(np.mean(ent[-res.FINAL_WINDOW:]))
    assert r.final_length == pytest.approx(np.mean([26.0, 27, 28, 29, 30]))
    collapsed = res.load_run(_fake_run(tmp_path, "dapo", 0, [(0, 0.30), (10, 0.15)], ent), "dapo", 0)
    assert collapsed.collapsed and collapsed.diverged and collapsed.reached is None
    aborted = res.load_run(_fake_run(tmp_path, "grpo", 0, [(0, 0.30)], ent[:3], status="diverged"), "grpo", 0)
    assert aborted.diverged and math.isnan(aborted.final)  # no final numbers: left out of the means
    assert res.load_run(tmp_path / "nothing", "gspo", 0).status == "missing"


def test_paired_differences_table_and_findings(tmp_path):
    finals = {"real": [0.50, 0.55, 0.60], "grpo": [0.40, 0.44, 0.47]}
    results = []
    for loss, values in finals.items():
        for seed, v in enumerate(values):
            run = _fake_run(tmp_path, loss, seed, [(0, 0.3), (10, v)], [0.2] * 10)
            results.append(res.load_run(run, loss, seed))
    d = res.paired(results)["grpo"]
    assert d["diffs"] == pytest.approx({0: -0.10, 1: -0.11, 2: -0.13})
    assert d["mean"] == pytest.approx(-0.11333333) and d["n"] == 3
    assert d["half"] == pytest.approx(res.t95(2) * np.std([-0.10, -0.11, -0.13], ddof=1) / math.sqrt(3))
    table = rep.results_table(results)
    assert "| real | 3/3 | 0.550 ± " in table and "| grpo | 3/3 | 0.437 ± " in table and "-0.113 ± " in table
    text = rep.findings(results)
    assert text[0] == "Ranking by mean final pass@1: real 0.550 > grpo 0.437."
    assert text[1].startswith("grpo is lower than real on final pass@1 (paired over 3 seeds: -0.113")
    assert "0.500 | 0.550 | 0.600" in rep.per_seed_table(results)
    assert "| grpo | -0.100 | -0.110 | -0.130 | -0.113 ± " in rep.paired_table(results)
    auc = res.paired(results, "auc")["grpo"]  # AUC of [(0, 0.3), (10, v)] is (0.3 + v) / 2
    assert auc["mean"] == pytest.approx(-0.11333333 / 2)


# ----------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------
def test_plan_gives_each_objective_the_papers_settings_and_one_budget(tmp_path):
    runs = plan(demo_config_path(), ["loss.tau=0.25", "optim.lr=5e-5"], ["real", "grpo", "gspo"], 2, tmp_path)
    assert [r.name for r in runs] == ["real_s0", "grpo_s0", "gspo_s0", "real_s1", "grpo_s1", "gspo_s1"]
    hp = {r.loss: r.cfg.loss.hparams() for r in runs}
    assert hp["real"] == {"tau": 0.25}  # a loss.* override reaches only the objectives that take it
    assert hp["grpo"] == PAPER_HPARAMS["grpo"] and hp["gspo"] == PAPER_HPARAMS["gspo"]
    assert {(r.cfg.optim.lr, r.cfg.trainer.steps, r.cfg.rollout.prompts_per_step) for r in runs} == {(5e-5, 30, 8)}
    assert [r.cfg.seed for r in runs] == [0, 0, 0, 1, 1, 1]
    assert not any(r.cfg.rollout.dynamic_sampling or r.cfg.rollout.overlong_filter for r in runs)
    assert runs[0].cfg.run_dir == tmp_path / "runs" / "real_s0"


@pytest.mark.parametrize("overrides, losses, message", [
    (["seed=3"], ["real"], "seed is set by the study"),
    (["loss.clip_eps=0.1"], ["real", "gspo"], "loss.clip_eps is a hyperparameter of none of"),
    ([], ["reall"], "unknown objective"),
])
def test_plan_refuses(tmp_path, overrides, losses, message):
    with pytest.raises(StudyError, match=message):
        plan(demo_config_path(), overrides, losses, 1, tmp_path)


# ----------------------------------------------------------------------------------------------------
# End to end (subprocesses: the study turns on JAX's persistent compilation cache for its process)
# ----------------------------------------------------------------------------------------------------
TINY = ["trainer.steps=2", "trainer.eval_every=1", "trainer.save_every=1", "rollout.prompts_per_step=4",
        "rollout.group_size=4", "rollout.max_new_tokens=16", "eval.n=2", "data.eval_limit=8", "mesh.fsdp=4",
        "mesh.tensor=2"]  # 4 prompts over 4 data-parallel devices of the 8 fake ones


def _study(out, *extra):
    cmd = [sys.executable, "-m", "realjax", "study", "--losses", "real,grpo", "--seeds", "1", "--base-n", "2",
           "--out", str(out), *TINY, *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def test_tiny_study_end_to_end_then_resume(tmp_path):
    out = tmp_path / "study"
    first = _study(out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[  1/2] real_s0" in first.stdout and "[  2/2] grpo_s0" in first.stdout and "ETA" in first.stdout
    summary = (out / "summary.md").read_text()
    assert "| real | 1/1 |" in summary and "| grpo | 1/1 |" in summary and "never (0)" in summary
    for name in ("pass_at_1.png", "entropy.png", "reward.png", "response_length.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / ".jax_cache").is_dir() and any((out / ".jax_cache").iterdir())
    metrics = out / "runs" / "real_s0" / "metrics.jsonl"
    before = metrics.read_text()

    (out / "runs" / "grpo_s0" / DONE_FILE).unlink()  # as if killed after its last checkpoint
    again = _study(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 of 2 runs finished earlier, skipped" in again.stdout
    assert "grpo_s0" in again.stdout and "real_s0" not in again.stdout.split("skipped", 1)[1]
    assert metrics.read_text() == before  # the finished run was not touched
    assert (out / "runs" / "grpo_s0" / DONE_FILE).exists()
    records = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines()]
    assert [r["runs_trained"] for r in records] == [2, 1]
    assert "Trained in 2 invocations: 2 runs in " in (out / "summary.md").read_text()

    changed = _study(out, "optim.lr=3e-4")
    assert changed.returncode == 2 and "was made with another config (differs in optim.lr)" in changed.stderr


def test_gradient_weights_table_next_to_pass_at_1(tmp_path):
    results = []
    for loss, scale in (("real", 1.0), ("grpo", 3.0)):
        for seed in range(2):
            run = _fake_run(tmp_path, loss, seed, [(0, 0.3), (3, 0.4 + 0.1 * seed)], [0.2] * 3)
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            for row in rows:
                if "loss" in row:  # step s: every statistic = scale * (s + seed), "neg" twice that
                    row.update({f"grad_weight/{side}_{k}": scale * (row["step"] + seed) * (1 + (side == "neg"))
                                for side in ("pos", "neg") for k in ("mean", "t1", "t2", "t3", "max")})
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            results.append(res.load_run(run, loss, seed))
    results.append(res.load_run(_fake_run(tmp_path, "dapo", 0, [(0, 0.3), (3, 0.2)], [0.2] * 3), "dapo", 0))
    table = rep.grad_weight_table(results)
    # real: steps 1..3 average 2, seeds 0 and 1 give 2 and 3, so 2.5 for pos and 5 for neg; grpo 3x.
    assert "| real | 0.450 | 2.5 | 2.5 | 2.5 | 2.5 | 2.5 | 5 | 5 | 5 | 5 | 5 |" in table
    assert "| grpo | 0.450 | 7.5 | 7.5 | 7.5 | 7.5 | 7.5 | 15 | 15 | 15 | 15 | 15 |" in table
    assert "| dapo | 0.200 | n/a |" in table  # a run that did not log them
