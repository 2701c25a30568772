"""The RL trainer end to end: metrics, exact resume after SIGKILL, SIGTERM checkpoints, NaN guard,
config errors, every objective, and the demo config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from realjax.checkpoint import Checkpointer
from realjax.config import demo_config_path
from realjax.config import ConfigError, load_config
from realjax.losses import LOSSES
from realjax.losses import TERMS
from realjax.rl import TrainingDiverged, Trainer, make_optimizer, make_update_step
from realjax.rl.batch import TrainState
from _toy import toy_batch, toy_model

REPO = Path(__file__).resolve().parents[1]
# 4 prompts per call split over 4 data-parallel devices of the 8 fake ones (a batch must divide its devices).
TINY = ["rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=16",
        "optim.mini_batches=2", "trainer.steps=3", "trainer.eval_every=0", "trainer.save_every=1",
        "eval.n=2", "data.eval_limit=8", "logging.progress=false", "mesh.fsdp=4", "mesh.tensor=2"]
REQUIRED = ("loss", "reward/mean", "entropy", "response_length/mean", "kl", "grad_norm", "time/rollout",
            "time/update")


def tiny_config(tmp_path, *extra, name="t"):
    return load_config(demo_config_path(), [f"output_dir={tmp_path}", f"name={name}", *TINY, *extra])


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def test_end_to_end_few_steps(tmp_path):
    cfg = tiny_config(tmp_path)
    summary = Trainer(cfg).run()
    rows = read_metrics(cfg.run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        for key in REQUIRED:
            assert r[key] is not None and np.isfinite(r[key]), (key, r)
    evals = [r for r in rows if "eval/arithmetic/pass@1" in r]
    assert [r["step"] for r in evals] == [0, 3]
    assert 0.0 <= summary["pass@1_after"] <= 1.0
    run = Path(summary["run_dir"])
    assert (run / "config.yaml").exists() and (run / "plots" / "dynamics.png").exists()
    assert list((run / "tensorboard").glob("events.*"))
    from realjax.models import from_pretrained, load_tokenizer

    exported = from_pretrained(run / "export")
    assert exported.cfg.num_layers == 4 and load_tokenizer(run / "export").eos_token_id is not None

    # `realjax export` of an earlier checkpoint, and `realjax plot` of the run
    from realjax.cli import main

    assert main(["export", "--run", str(run), "--step", "2", "--out", str(tmp_path / "step2")]) == 0
    params, _ = Checkpointer(run / "checkpoints").restore_params(2, nnx.state(exported, nnx.Param))
    chex.assert_trees_all_equal(nnx.state(from_pretrained(tmp_path / "step2"), nnx.Param), params)
    assert main(["export", "--run", str(run), "--step", "7", "--out", str(tmp_path / "x")]) == 2
    assert main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "dynamics.png").exists()


def _launch(cfg_args, log):
    cmd = [sys.executable, "-m", "realjax", "train", *cfg_args]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ))


def _wait_for(predicate, proc, timeout=240):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.2)


def _final_params(run_dir, like):
    ckpt = Checkpointer(Path(run_dir) / "checkpoints")
    params, meta = ckpt.restore_params(ckpt.latest_step(), like)
    ckpt.close()
    return params, meta


def test_sigkill_then_resume_is_bit_identical_and_sigterm_checkpoints(tmp_path):
    """Kill -9 after the step-2 checkpoint, restart, SIGTERM mid-run (checkpoint + exit 0), restart to the
    end: the parameters equal an uninterrupted run's bit for bit."""
    steps = ["trainer.steps=5", "data.eval=", "eval.before=false", "trainer.export=false"]
    reference = tiny_config(tmp_path, *steps, name="reference")
    Trainer(reference).run()

    args = ["--config", str(demo_config_path()), f"output_dir={tmp_path}", "name=interrupted", *TINY, *steps]
    run_dir = tmp_path / "interrupted"
    with open(tmp_path / "log.txt", "w") as log:
        proc = _launch(args, log)
        _wait_for(lambda: (run_dir / "checkpoints" / "2").exists(), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = _launch(args, log)
        _wait_for(lambda: any(r["step"] >= 3 for r in read_metrics(run_dir) if "loss" in r), proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "log.txt").read_text()[-3000:]
        stopped_at = Checkpointer(run_dir / "checkpoints").latest_step()
        assert stopped_at >= 3
        proc = _launch(args, log)
        assert proc.wait(timeout=240) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    assert "resumed" in (tmp_path / "log.txt").read_text()

    like = Trainer(reference).params
    want, _ = _final_params(reference.run_dir, like)
    got, meta = _final_params(run_dir, like)
    assert meta["step"] == 5
    chex.assert_trees_all_equal(got, want)
    ref_rows = [r for r in read_metrics(reference.run_dir) if "loss" in r]
    got_rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in got_rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in got_rows] == [r["loss"] for r in ref_rows]


def test_non_finite_update_is_skipped_and_leaves_params_unchanged():
    graphdef, params = nnx.split(toy_model())
    batch = jax.tree.map(lambda x: x[None], toy_batch(rows=8, group_size=4))  # one micro-batch
    opt = make_optimizer(1e-3, weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8, schedule="constant",
                         warmup_updates=0, total_updates=10)
    step = make_update_step(graphdef, opt, TERMS["real"], {}, group_size=4, temperature=1.0, chunk_tokens=64)
    before = jax.tree.map(np.asarray, params)
    state = TrainState(params, opt.init(params))
    old = np.array(batch.old_logp_BA)
    old[0, 2, 1] = np.nan
    state, m = step(state, batch.replace(old_logp_BA=old))
    assert float(m["skipped"].value) == 1.0
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.params), before)
    assert int(state.opt_state[1][0].count) == 0  # Adam's step count did not advance
    state, m = step(state, batch)
    assert float(m["skipped"].value) == 0.0 and np.isfinite(float(m["grad_norm"].value))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)))


def test_repeated_non_finite_updates_abort_with_params_unchanged(tmp_path):
    cfg = tiny_config(tmp_path, "loss.tau=0.0", "optim.max_bad_steps=2", "data.eval=", "eval.before=false")
    trainer = Trainer(cfg)
    before = jax.tree.map(np.asarray, trainer.params)
    with pytest.raises(TrainingDiverged, match="2 updates in a row had a non-finite loss"):
        trainer.run()
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, trainer.params), before)


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=1e-5"], "unknown config key optim.lrr; did you mean optim.lr?"),
    (["rollout.group_size=eight"], "rollout.group_size: expected int, got str 'eight'"),
    (["trainer=3"], "trainer: expected a mapping"),
    (["loss.name=reel"], "loss.name: unknown objective 'reel'; did you mean real?"),
    (["optim.mini_batches=3"], "optim.mini_batches=3 must divide rollout.prompts_per_step=16"),
    (["model.dtype=float33"], "model.dtype"),
    (["steps"], "override 'steps' is not key=value"),
    (["rollout.window_tokens=0"], "rollout.window_tokens must be >= 1, got 0"),
    (["rollout.compact_every=0"], "rollout.compact_every must be >= 1, got 0"),
    (["rollout.slots=-1"], "rollout.slots must be >= 0"),
    (["model.scan_layers=maybe"], "model.scan_layers: expected bool, got str 'maybe'"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(demo_config_path(), overrides)
    assert message in str(e.value)


def test_rollout_and_eval_samplers_take_the_config(tmp_path):
    from realjax import sharding as shd
    from realjax.rl.plan import make_plan

    cfg = load_config(demo_config_path(), ["rollout.window_tokens=64", "rollout.top_p=0.9", "eval.max_new_tokens=0",
                                           "eval.temperature=0.3"])
    params = nnx.split(toy_model())[1]
    plan = make_plan(cfg, shd.make_mesh(None), compute_dtype="float32", abstract_params=params, stop_ids=(7,))
    rollout, evaluation = plan.sampling, plan.eval_sampling
    assert (rollout.window_tokens, rollout.top_p, rollout.stop_ids) == (64, 0.9, (7,))
    assert (evaluation.window_tokens, evaluation.temperature) == (64, 0.3)
    assert evaluation.max_new_tokens == rollout.max_new_tokens == cfg.rollout.max_new_tokens


def test_cli_config_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "realjax", "train", "optim.lrr=1"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["realjax train: error: unknown config key optim.lrr; did you mean optim.lr?"]


# The default run trains REAL, GRPO (its reference policy) and DAPO (dynamic sampling, overlong filter);
# the other objectives differ only in their loss, which tests/test_learner.py checks for each one.
_DEFAULT_OBJECTIVES = ("real", "grpo", "dapo")


@pytest.mark.parametrize("name", [n if n in _DEFAULT_OBJECTIVES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(LOSSES)])
def test_every_objective_trains(tmp_path, name):
    extra = ["data.eval=", "eval.before=false", "trainer.export=false", "trainer.steps=2", "trainer.save_every=100"]
    extra += [f"loss.name={name}"]  # one override switches the objective: the demo's loss.tau is ignored
    if name == "grpo":
        extra.append("loss.kl_coef=0.001")  # exercises the frozen reference policy
    if name == "dapo":
        extra += ["rollout.dynamic_sampling=true", "rollout.overlong_filter=true"]
    cfg = tiny_config(tmp_path, *extra)
    trainer = Trainer(cfg)
    before = jax.tree.map(np.asarray, trainer.params)
    trainer.run()
    rows = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(before))]
    assert any(changed), "the policy did not move"


def test_demo_config_is_shipped_and_runs_from_any_directory(tmp_path, monkeypatch):
    assert (REPO / "configs" / "demo.yaml").read_text() == demo_config_path().read_text()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(demo_config_path())
    from realjax.rl.setup import model_path

    assert (model_path(cfg) / "model.safetensors").exists()
    assert cfg.loss.name == "real" and cfg.loss.tau == 0.5


@pytest.mark.slow
def test_demo_improves_held_out_pass_at_1_by_15_points(tmp_path):
    """The README's main job, in full (about 3 minutes on 2 cores)."""
    summary = Trainer(load_config(demo_config_path(), [f"output_dir={tmp_path}", "logging.progress=false"])).run()
    assert summary["pass@1_after"] - summary["pass@1_before"] >= 0.15, summary


def test_rollout_view_in_compute_dtype_gives_the_same_logits():
    """Rollouts read weights cast once to the compute dtype (half the bytes of fp32 master weights); the
    model casts every weight to that dtype anyway, so the logits (and the sampler's logprobs) are
    bit-identical to the trainer's."""
    from realjax import sharding as shd
    from realjax.rl.plan import make_plan

    from realjax.models import ModelConfig, init_model

    model_cfg = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            head_dim=8, intermediate_size=64, tie_word_embeddings=False,
                            param_dtype="float32", dtype="bfloat16")
    graphdef, params = nnx.split(init_model(model_cfg, seed=0))
    cfg = load_config(demo_config_path())  # fsdp over the 8 devices, no tensor axis
    plan = make_plan(cfg, shd.make_mesh(cfg.mesh), compute_dtype="bfloat16", abstract_params=params, stop_ids=(0,))
    view = plan.rollout_view(params)
    assert {x.dtype for x in jax.tree.leaves(view)} == {np.dtype("bfloat16")}
    ids = np.arange(24, dtype=np.int32).reshape(2, 12) % 64
    want = nnx.merge(graphdef, params)(ids)
    got = nnx.merge(graphdef, view)(ids)
    chex.assert_trees_all_equal(want, got)
