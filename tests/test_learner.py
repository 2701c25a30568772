"""The learner core: micro-batching never changes an update, the overlong filter removes rows whole, and
the run plan checks settings before any step."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _toy import toy_batch, toy_model
from realjax import sharding as shd
from realjax.losses import LOSSES, TERMS, Mean
from realjax.rl.batch import TrainState
from realjax.rl.update import make_update_step

R = 4
# Exact metrics (up to float32 summation order); counters are per update.
EXACT_METRICS = ("loss", "entropy", "score_mean", "kl_old_k1", "kl_old_k3", "valid_groups", "clip_frac", "kl_ref",
                 "thresholds", *(f"grad_weight/{lab}_{k}" for lab in ("pos", "neg") for k in ("mean", "max", "t1", "t2", "t3")))


@functools.lru_cache(maxsize=1)
def _toy_split():
    return nnx.split(toy_model(0))


def _batch(name, mode="none"):
    batch = toy_batch(rows=16, group_size=R, degenerate_first=2, graded=name == "real_ordinal", dropped=(5, 14))
    if name == "grpo":
        batch = batch.replace(ref_logp_BA=(batch.old_logp_BA - 0.1 * batch.resp_mask_BA).astype(np.float32))
    if mode != "none":  # a behaviour policy off the old one by about +-0.4 nats a token
        noise = np.random.default_rng(7).standard_normal(batch.old_logp_BA.shape) * 0.4 * batch.resp_mask_BA
        batch = batch.replace(sampler_logp_BA=(batch.old_logp_BA + noise).astype(np.float32))
    return batch


@functools.lru_cache(maxsize=None)
def _one_update(name, micro, mode="none"):
    """Parameters and metrics after one update of the toy policy over the test batch cut into ``micro``
    parts.

    Plain SGD: Adam's first step is about lr * sign(g) and would hide a gradient off by a constant factor.
    """
    graphdef, params = _toy_split()
    batch = _batch(name, mode)
    hparams = {"kl_coef": 0.05} if name == "grpo" else {}
    step = make_update_step(graphdef, optax.sgd(0.5), TERMS[name], hparams, group_size=R, temperature=0.9,
                            chunk_tokens=64, is_correction=(mode, 1.5))
    params = jax.tree.map(jnp.copy, params)  # the step donates its state
    state, metrics = step(TrainState(params, optax.sgd(0.5).init(params)), batch.cut(micro))
    return jax.tree.map(np.asarray, state.params), {k: float(m.value) for k, m in metrics.items()}


@pytest.mark.parametrize("k", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_micro_batches_never_change_the_update(name, k):
    """k micro-batches give the parameters and metrics of one. The first two groups are degenerate, so
    with k = 2 one micro-batch holds only them (REAL-BCE's gradient was halved before the exact sums);
    two rows are dropped by the overlong filter; GRPO carries its reference-KL term."""
    whole, m1 = _one_update(name, 1)
    start = jax.tree.map(np.asarray, _toy_split()[1])
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(start)))
    assert moved > 1e-4, "the update must move the parameters for this test to mean anything"
    params, mk = _one_update(name, k)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(params)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6, err_msg=f"{name}, {k} micro-batches")
    for key in EXACT_METRICS:
        if key in m1:
            np.testing.assert_allclose(mk[key], m1[key], rtol=1e-4, atol=1e-6, err_msg=f"{key}, k={k}")
    assert m1["grad_weight/pos_max"] + m1["grad_weight/neg_max"] > 0, "the gradient weights must be measured"


@pytest.mark.parametrize("name,mode", [("real", "seq_mis"), pytest.param("dapo", "token_tis", marks=pytest.mark.slow),
                                       pytest.param("real_bce", "seq_tis", marks=pytest.mark.slow),
                                       pytest.param("grpo", "token_mis", marks=pytest.mark.slow)])
def test_micro_batches_with_importance_weights_stay_exact(name, mode):
    """The mismatch correction's weights are constants of the batch multiplying terms of the sums, so the
    cut still never changes the update; and they do change it (the test would mean nothing otherwise)."""
    whole, m1 = _one_update(name, 1, mode)
    plain, _ = _one_update(name, 1)
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(plain))) > 1e-5
    params, mk = _one_update(name, 2, mode)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(params)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-6, err_msg=f"{name}, {mode}")
    for key in EXACT_METRICS:
        if key in m1:
            np.testing.assert_allclose(mk[key], m1[key], rtol=1e-4, atol=1e-6, err_msg=key)


def _grads(name, b, group_size):
    fn = LOSSES[name]

    def loss(logp):
        return fn(logp, b["old_logp"], b["mask"], b["rewards"], group_size=group_size, row_mask=b.get("row_mask"))[0]

    return jax.value_and_grad(loss)(b["logp"])


def _random_rows(rows, seed):
    rng = np.random.default_rng(seed)
    old = -rng.gamma(2.0, 0.7, (rows, 6))
    mask = (np.arange(6)[None] < rng.integers(1, 7, rows)[:, None]).astype(np.float32)
    r = rng.integers(0, 2, rows).astype(np.float32)
    r[::R], r[1::R] = 1.0, 0.0  # every group mixed whatever is dropped below
    return {"logp": (old + 0.4 * rng.standard_normal((rows, 6))).astype(np.float32),
            "old_logp": old.astype(np.float32), "mask": mask, "rewards": r}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_dropped_rows_take_no_part(name):
    """Dropping one row per group (``row_mask``) gives the loss and the kept rows' gradients of the same
    batch with those rows removed (groups of R - 1): the row is neither a label, nor a token, nor a row of
    any count (a truncated row with s = 0 would otherwise act as a second anchor)."""
    b = _random_rows(5 * R, seed=1)
    drop = np.array([2, 3, 2, 3, 2]) + R * np.arange(5)
    keep = np.setdiff1d(np.arange(5 * R), drop)
    loss, g = _grads(name, dict(b, row_mask=np.isin(np.arange(5 * R), keep).astype(np.float32)), R)
    want_loss, want_g = _grads(name, {k: v[keep] for k, v in b.items()}, R - 1)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g)[keep], np.asarray(want_g), rtol=1e-5, atol=1e-8)
    assert not np.any(np.asarray(g)[drop])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_a_group_dropped_whole_is_not_counted(name):
    b = _random_rows(3 * R, seed=2)
    row_mask = np.ones(3 * R, np.float32)
    row_mask[R:2 * R] = 0.0
    loss, g = _grads(name, dict(b, row_mask=row_mask), R)
    kept = np.flatnonzero(row_mask)
    want_loss, want_g = _grads(name, {k: v[kept] for k, v in b.items()}, R)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g)[kept], np.asarray(want_g), rtol=1e-5, atol=1e-8)


def test_mean_adds_parts_and_divides_once():
    parts = [Mean(np.float32(3.0), np.float32(1.0)), Mean(np.float32(1.0), np.float32(3.0))]
    assert float((parts[0] + parts[1]).value) == 1.0  # not the mean of means (2.0)
    assert float(Mean(np.float32(0.0), np.float32(0.0)).value) == 0.0  # empty: 0, never NaN


# ----------------------------------------------------------------------------------------------------
# Multi-host placement: rows follow process order whatever order the devices come in
# ----------------------------------------------------------------------------------------------------
class _Dev:
    def __init__(self, i, p):
        self.id, self.process_index = i, p

    def __repr__(self):
        return f"d{self.id}@p{self.process_index}"


def test_mesh_rows_follow_process_order():
    # A topology-aware order that lists process 1's devices first, tensor pairs within one process.
    devs = [_Dev(i, 1 - i // 4) for i in range(8)]
    arr = shd._rows_in_process_order(np.array(devs, dtype=object).reshape(2, 2, 2))
    procs = [d.process_index for d in arr.reshape(-1)]
    assert procs == sorted(procs)
    with pytest.raises(shd.ShardingError, match="spans devices of several processes"):
        shd._rows_in_process_order(np.array([_Dev(i, i % 2) for i in range(8)], dtype=object).reshape(1, 4, 2))


def test_a_batch_that_does_not_divide_the_mesh_is_an_error():
    mesh = shd.make_mesh(None)  # 8 devices on fsdp
    with pytest.raises(shd.ShardingError, match="batch of 12 rows does not split evenly over the 8"):
        shd.batch_sharding(mesh, (12, 3))
    assert shd.process_row_blocks(mesh, 16) == {0: (0, 16)}


# ----------------------------------------------------------------------------------------------------
# Settings: every bad one fails at load with one line naming the key; one override switches the objective
# ----------------------------------------------------------------------------------------------------
SHIPPED = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("override,message", [
    ("trainer.save_every=0", "trainer.save_every must be >= 1, got 0"),
    ("trainer.log_every=0", "trainer.log_every must be >= 1, got 0"),
    ("trainer.eval_every=-1", "trainer.eval_every must be >= 0, got -1"),
    ("rollout.temperature=0", "rollout.temperature must be > 0"),
    ("eval.temperature=-0.5", "eval.temperature must be >= 0"),
    ("rollout.top_p=0", "rollout.top_p must be in (0, 1], got 0"),
    ("eval.top_p=1.5", "eval.top_p must be in (0, 1], got 1.5"),
    ("rollout.group_size=1", "rollout.group_size must be >= 2, got 1"),
    ("optim.micro_batches=3", "optim.micro_batches=3 must divide the 8 prompts of a mini-batch"),
    # the demo's 16 prompts x 2 rollouts over 2 mini-batches x 4 micro-batches: 4 rows on 8 fake devices
    ("optim.micro_batches=4 rollout.group_size=2", "leaves 4 rows per micro-batch, not a multiple of the 8"),
    ("rollout.prompts_per_call=4", "rollout.prompts_per_call=4 prompts per sampler call is not a multiple of the 8"),
    ("rollout.is_correction=tis", "rollout.is_correction must be one of none, token_tis"),
    ("rollout.is_correction=seq_tis rollout.is_cap=1", "rollout.is_cap must be > 1"),
    ("rollout.is_correction=seq_mis rollout.old_logp=sampler", "rollout.is_correction=seq_mis needs the learner's own "
     "old log-probs: set rollout.old_logp"),
    ("rollout.is_correction=token_tis", "loss.name=real weighs whole rollouts; use seq_tis"),
])
def test_bad_settings_fail_at_load_with_one_line(tmp_path, capsys, override, message):
    from realjax.cli import main

    out = tmp_path / "runs"
    # (a check that does not fire costs one short step, not the demo)
    code = main(["train", f"output_dir={out}", "logging.progress=false", "trainer.steps=1", "eval.before=false",
                 "trainer.export=false", *override.split()])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists(), "nothing may be written"


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.stem)
def test_one_override_switches_the_objective_of_every_shipped_config(config):
    from realjax.config import load_config
    from realjax.losses import hparams_of

    for name in LOSSES:
        cfg = load_config(config, [f"loss.name={name}"])
        hp = cfg.loss.hparams()
        assert set(hp) <= set(hparams_of(name)) and set(cfg.loss.ignored()).isdisjoint(hparams_of(name))
        b = _random_rows(2 * cfg.rollout.group_size, seed=3)
        if name == "grpo" and hp.get("kl_coef"):
            hp = dict(hp, ref_logp=b["old_logp"])
        loss, _ = LOSSES[name](b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=cfg.rollout.group_size,
                               **hp)
        assert np.isfinite(float(loss))


def test_every_loss_key_is_some_objectives_and_typos_still_fail():
    from realjax.config import ConfigError, load_config
    from realjax.losses import hparam_types, hparams_of

    taken = set().union(*(hparams_of(n) for n in LOSSES))
    assert set(hparam_types()) == taken  # the loss section's keys are exactly what the objectives declare
    everything = load_config(SHIPPED[0], [f"loss.{k}={'k1' if k == 'kl_estimator' else 3}" for k in taken])
    assert {k for k, _ in everything.loss.values} == taken
    with pytest.raises(ConfigError, match="unknown config key loss.tua; did you mean loss.tau"):
        load_config(SHIPPED[0], ["loss.tua=0.5"])


@pytest.mark.slow
def test_trainer_keeps_the_sampler_logp_and_logs_weights_and_gradient_weights(tmp_path):
    """Wiring through a real (tiny) run: with the recompute pass and seq_tis the step logs the importance
    weights (about 1 here: fp32 sampler and learner compute the same numbers) and the gradient weights
    (REAL's below 1/tau = 2)."""
    import json

    from realjax.config import demo_config_path
    from realjax.config import load_config
    from realjax.rl import Trainer

    cfg = load_config(demo_config_path(), [f"output_dir={tmp_path}", "rollout.prompts_per_step=4",
                                           "rollout.group_size=4", "trainer.steps=2",
                                           "trainer.eval_every=0", "eval.before=false", "trainer.export=false",
                                           "logging.progress=false", "mesh.fsdp=4", "mesh.tensor=2", "rollout.old_logp=recompute",
                                           "rollout.is_correction=seq_tis", "rollout.is_cap=1.5"])
    Trainer(cfg).run()
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 2
    for r in rows:
        assert abs(r["is/ratio_mean"] - 1.0) < 1e-3 and r["is/cut_frac"] == 0.0
        assert 0.0 <= r["grad_weight/pos_max"] < 2.0 and 0.0 <= r["grad_weight/neg_max"] < 2.0
        # only rollouts of mixed groups carry a signal
        assert (r["grad_weight/pos_mean"] + r["grad_weight/neg_mean"] > 0) == (r["valid_groups"] > 0)
    assert any(r["valid_groups"] > 0 for r in rows), "the test run must have a mixed group"
