"""LoRA policies: the base model's logits at init, adapters == merged weights (also on a stacked layer
axis), an optimizer state of adapters only, merged and PEFT exports through transformers, exact resume,
the base as KL reference, config errors, and the demo task trained with adapters only.

The default suite keeps the cheap ones (config, the merge, the optimizer state); the rest compile whole
update steps or load transformers and are marked slow (``pytest -m slow tests/test_lora.py``)."""

import functools
import re
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiny import make_hf_model, torch_logits
from _toy import toy_batch
from flax import nnx

from realjax import sharding as shd
from realjax.checkpoint import BaseMismatch, Checkpointer, abstract_like, check_base

from realjax.config import ConfigError, demo_config_path, load_config
from realjax.losses import TERMS
from realjax.models import ModelConfig, abstract_model, from_pretrained, init_model, save_pretrained
from realjax.models import lora
from realjax.models.config import LoraConfig
from realjax.rl import make_plan
from realjax.rl.batch import TrainState
from realjax.rl.update import make_update_step

LORA = LoraConfig(rank=4, alpha=8.0)


def _toy_cfg(**kw):
    return ModelConfig(family="qwen2", vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, intermediate_size=48, **kw)


def _ids(shape=(2, 9), seed=0, vocab=40):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape))


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, ids, *states):
    """One jitted forward (eager op-by-op dispatch of a whole model is slow on a shared CPU)."""
    return nnx.merge(graphdef, *states)(ids)


def _fresh(params, opt_state, frozen):
    """A train state of copies: the update step donates (and so deletes) its input state."""
    return TrainState(*jax.tree.map(jnp.copy, (params, opt_state)), None, jax.tree.map(jnp.copy, frozen))


def _perturbed(adapters, seed=1, size=0.05):
    """Adapters with non-zero B (a trained policy), so merging has something to merge."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + size * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    return d, make_hf_model("qwen2", d)


@pytest.mark.slow  # tens of seconds of compiles on a shared 2-core CPU
def test_init_logits_equal_the_base_model(hf_dir):
    d, _ = hf_dir
    base = from_pretrained(d)
    policy = from_pretrained(d, lora=LoraConfig(rank=4, alpha=16.0, targets=("q", "v", "o", "down")), seed=3)
    ids = _ids((2, 13), vocab=101)
    g_policy, s_policy = nnx.split(policy)
    g_base, s_base = nnx.split(base)
    np.testing.assert_array_equal(np.asarray(_logits(g_policy, ids, s_policy)),  # B = 0: exactly the base
                                  np.asarray(_logits(g_base, ids, s_base)))
    adapters, frozen = lora.split_policy(nnx.state(policy), policy.cfg.lora)
    assert {p[-2] for p, _ in nnx.to_flat_state(adapters)} == {"q_lora", "v_lora", "o_lora", "down_lora"}
    assert all(np.any(v.get_value()) for p, v in nnx.to_flat_state(adapters) if p[-1] == "a")  # A is drawn
    chex.assert_trees_all_equal(frozen, nnx.state(base))  # the frozen half is the base, untouched


def test_adapters_equal_merged_weights_and_survive_a_stacked_layer_axis():
    cfg = _toy_cfg(lora=LORA)
    graphdef, state = nnx.split(init_model(cfg, seed=0))
    adapters, frozen = lora.split_policy(state, cfg.lora)
    adapters = _perturbed(adapters)
    ids = _ids()
    learner = _logits(graphdef, ids, adapters, frozen)  # x W + scale (x A) B
    merged = lora.merge_adapters(frozen, adapters, cfg.lora.scale)
    plain = _logits(abstract_model(cfg.replace(lora=None))[0], ids, merged)  # x (W + scale A B)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(learner), atol=1e-5)
    assert float(jnp.abs(learner - _logits(graphdef, ids, state)).max()) > 1e-3

    # The merge reads leading axes off the ranks: layers stacked on a leading axis merge layer by layer.
    def stack(state):
        layers = state["layers"]
        return nnx.State({"layers": jax.tree.map(lambda *xs: jnp.stack(xs), layers[0], layers[1])})

    stacked = lora.merge_adapters(stack(frozen), stack(adapters), cfg.lora.scale)
    assert stacked["layers"]["attn"]["q"].get_value().shape == (2, 32, 4, 8)
    chex.assert_trees_all_close(nnx.to_pure_dict(stacked), nnx.to_pure_dict(stack(merged)), atol=1e-6)
    # A scanned model's adapters carry one layer axis, as its weights do: the same stacked layout.
    _, scanned = abstract_model(_toy_cfg(lora=LORA, scan_layers=True))
    want = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(stack(adapters)))
    assert jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(lora.split_policy(scanned, LORA)[0])) == want


def _plan(tmp_path, *extra, lora_on=True):
    cfg = load_config(demo_config_path(), [f"output_dir={tmp_path}", "rollout.prompts_per_step=4",
                                           "rollout.group_size=4", "optim.mini_batches=1", "mesh.fsdp=4",
                                           "mesh.tensor=2", *(["model.lora.rank=4"] if lora_on else []), *extra])
    mcfg = _toy_cfg(lora=cfg.model.lora.model_config())
    mesh = shd.make_mesh(cfg.mesh)
    graphdef, state = nnx.split(init_model(mcfg, seed=0, mesh=mesh))
    params, frozen = lora.split_policy(state, mcfg.lora)
    plan = make_plan(cfg, mesh, compute_dtype="float32", abstract_params=params, stop_ids=(0,), abstract_frozen=frozen)
    return plan, graphdef, params, frozen


def test_optimizer_state_holds_only_adapters_and_the_base_stays_frozen(tmp_path):
    plan, graphdef, params, frozen = _plan(tmp_path)
    state = plan.init_state(params, frozen)
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(params))
    mu = state.opt_state[1][0].mu  # clip, then AdamW's moments: they mirror the adapters, nothing else
    assert sorted(x.shape for x in jax.tree.leaves(mu)) == adapter_shapes
    # r x (fan in + fan out) per projection: q, k, v, o, gate, up, down; 2 layers
    assert sum(x.size for x in jax.tree.leaves(params)) == 2 * 4 * (64 + 48 + 48 + 64 + 3 * 80)
    # The adapters shard like their weights on the mesh (A's input axis over fsdp, B's heads over tensor).
    q_lora = state.params["layers"][0]["attn"]["q_lora"]
    assert q_lora["a"].get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert q_lora["b"].get_value().sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
    base_before, before = jax.tree.map(np.asarray, frozen), jax.tree.map(np.asarray, params)  # (donated)
    batch = shd.put_batch(jax.tree.map(lambda x: x[None], toy_batch(rows=16, group_size=4)), plan.mesh, axis=1)
    new, metrics = plan.update_step(graphdef)(state, batch)
    assert float(metrics["grad_norm"].total) > 0 and not float(metrics["skipped"].total)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, new.frozen), base_before)
    # B leaves leave zero (A's gradient is zero while B is: only weight decay moves it in this first step)
    for (path, new_b), (_, old_b) in zip(nnx.to_flat_state(new.params), nnx.to_flat_state(before)):
        if path[-1] == "b":
            assert not np.any(old_b.get_value()) and np.any(np.asarray(new_b.get_value())), path
    assert new.ref_params is None


@pytest.mark.slow  # tens of seconds of compiles on a shared 2-core CPU
def test_update_is_the_adapters_gradient_step():
    """One update = the optimizer over the adapters of loss(base + adapters): with plain SGD, exactly
    ``adapters - lr * d loss / d adapters`` of the merged module, differentiated here by hand."""
    cfg = _toy_cfg(lora=LORA)
    graphdef, state = nnx.split(init_model(cfg, seed=0))
    params, frozen = lora.split_policy(state, cfg.lora)
    params = _perturbed(params)
    from realjax.rl.update import batch_terms

    batch = toy_batch(rows=8, group_size=4)
    opt = optax.sgd(0.1)
    step = make_update_step(graphdef, opt, TERMS["real"], {}, group_size=4, temperature=1.0, chunk_tokens=64)
    got, _ = step(_fresh(params, opt.init(params), frozen), jax.tree.map(lambda x: x[None], batch))

    def loss(p):
        terms, _ = batch_terms(lora.merge_policy(graphdef, p, frozen), batch, TERMS["real"], {}, group_size=4,
                               temperature=1.0, chunk_tokens=64)
        return terms.loss_sum.total / terms.loss_sum.weight

    grads = jax.grad(loss)(params)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4
    chex.assert_trees_all_close(got.params, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), atol=1e-6)


@pytest.mark.slow  # tens of seconds of compiles on a shared 2-core CPU
def test_dropout_changes_the_update_only_with_a_key():
    cfg = _toy_cfg(lora=LoraConfig(rank=4, alpha=8.0, dropout=0.5))
    graphdef, state = nnx.split(init_model(cfg, seed=0))
    params, frozen = lora.split_policy(state, cfg.lora)
    params = _perturbed(params)
    opt = optax.sgd(1.0)

    step = make_update_step(graphdef, opt, TERMS["real"], {}, group_size=4, temperature=1.0, chunk_tokens=64)
    batch = jax.tree.map(lambda x: x.reshape(2, -1, *x.shape[1:]), toy_batch(rows=16, group_size=4))

    def run(key):
        return step(_fresh(params, opt.init(params), frozen), batch, key)[0].params

    plain, a, b, c = run(None), run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    chex.assert_trees_all_equal(a, b)  # the same key, the same masks
    for other in (plain, c):
        assert max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(other))) > 1e-6


@pytest.mark.slow  # tens of seconds of compiles on a shared 2-core CPU
def test_rollout_view_is_the_merged_plain_model(tmp_path):
    plan, graphdef, params, frozen = _plan(tmp_path)
    params = _perturbed(params)
    view = plan.rollout_view(params, frozen)
    assert not any(isinstance(v, lora.LoraParam) for _, v in nnx.to_flat_state(view))
    ids = _ids()
    np.testing.assert_allclose(np.asarray(_logits(abstract_model(_toy_cfg())[0], ids, view)),
                               np.asarray(_logits(graphdef, ids, params, frozen)), atol=1e-5)
    # GRPO's KL reference is the base itself: no reference copy in the state
    plan, graphdef, params, frozen = _plan(tmp_path, "loss.name=grpo", "loss.kl_coef=0.001")
    assert plan.use_ref and plan.ref_is_base and plan.init_state(params, frozen).ref_params is None


@pytest.mark.slow  # tens of seconds of compiles on a shared 2-core CPU
def test_merged_export_reloads_in_transformers_and_peft_layout(hf_dir, tmp_path):
    import torch
    import transformers
    from safetensors.numpy import load_file

    from realjax.models.peft import save_peft_adapters

    d, _ = hf_dir
    policy = from_pretrained(d, lora=LoraConfig(rank=4, alpha=8.0), seed=1)
    graphdef, state = nnx.split(policy)
    params, frozen = lora.split_policy(state, policy.cfg.lora)
    params = _perturbed(params, size=0.2)
    policy = lora.merge_policy(graphdef, params, frozen)
    ids = _ids((2, 11), 2, vocab=101)
    ours = np.asarray(_logits(graphdef, ids, params, frozen))
    out = save_pretrained(policy, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    np.testing.assert_allclose(torch_logits(merged, ids), ours, atol=1e-4)
    base_torch = transformers.AutoModelForCausalLM.from_pretrained(d).float().eval()
    assert float(np.abs(ours - torch_logits(base_torch, ids)).max()) > 1e-2  # the adapters do matter

    # PEFT: lora_A [r, in], lora_B [out, r], W' = W + (alpha / r) B A, on the base's HF names.
    peft_dir = save_peft_adapters(policy, tmp_path / "peft", base_model=str(d))
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    base_sd = base_torch.state_dict()
    merged_sd = merged.state_dict()
    names = [n for n in merged_sd if n.endswith("proj.weight")]
    assert len(tensors) == 2 * len(names) == 2 * 7 * 2
    for n in names:
        stem = "base_model.model." + n.removesuffix(".weight")
        delta = tensors[stem + ".lora_B.weight"] @ tensors[stem + ".lora_A.weight"] * (8.0 / 4)
        np.testing.assert_allclose(merged_sd[n].numpy(), base_sd[n].numpy() + delta, atol=1e-5, err_msg=n)
    try:
        import peft
    except ImportError:
        return
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(d).float(),
                                                str(peft_dir)).eval()
    np.testing.assert_allclose(torch_logits(loaded, ids), ours, atol=1e-4)


@pytest.mark.slow  # tens of seconds of compiles on a shared 2-core CPU
def test_checkpoint_holds_adapters_and_refuses_another_base(tmp_path):
    plan, graphdef, params, frozen = _plan(tmp_path)
    state = plan.init_state(params, frozen)
    like = abstract_like((state.params, state.opt_state))  # restore targets (the update donates its input)
    batch = shd.put_batch(jax.tree.map(lambda x: x[None], toy_batch(rows=16, group_size=4)), plan.mesh, axis=1)
    step = plan.update_step(graphdef)
    state, _ = step(state, batch)
    base = {"path": "/m", "sha256": "abc"}
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, state.params, state.opt_state, {"step": 1, "base": base})
    resumed_base = jax.tree.map(jnp.copy, state.frozen)  # a resumed run reloads the base from its files
    want, _ = step(state, batch)  # the uninterrupted run's next update
    params2, opt2, meta = ckpt.restore(1, *like)
    check_base(meta, dict(base, path="/moved"), 1)  # the same files elsewhere: accepted
    got, _ = step(TrainState(params2, opt2, None, resumed_base), batch)
    chex.assert_trees_all_equal(got.params, want.params)
    chex.assert_trees_all_equal(got.opt_state, want.opt_state)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "ckpt" / "1" / "params").rglob("*") if p.is_file())
    assert on_disk < 100_000  # the adapters, not the base model
    with pytest.raises(BaseMismatch, match="not for this run's base"):
        check_base(meta, {"path": "/m", "sha256": "other"}, 1)
    with pytest.raises(BaseMismatch, match="model.lora is off"):
        check_base(meta, None, 1)


@pytest.mark.parametrize("override, message", [
    ("model.lora.rank=-1", "model.lora: rank must be >= 1 (0 turns LoRA off), got -1"),
    ("model.lora.targets=q,x", "model.lora: targets: unknown projection 'x'"),
    ("model.lora.targets=q,q", "a name repeats"),
    ("model.lora.alpha=0", "model.lora: alpha must be > 0"),
    ("model.lora.dropout=1.0", "model.lora: dropout must be in [0, 1)"),
    ("model.lora.base_dtype=float12", "model.lora: base_dtype: unknown dtype"),
    ("model.lora.rnak=4", "did you mean model.lora.rank"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_config(demo_config_path(), ["model.lora.rank=8", override])
    assert "\n" not in str(e.value)


def test_config_maps_to_the_model_and_bf16_base(tmp_path):
    cfg = load_config(demo_config_path(), ["model.lora.rank=8", "model.lora.targets=q, v", "model.lora.alpha=16",
                                           "model.lora.base_dtype=bfloat16"])
    assert cfg.model.lora.model_config() == LoraConfig(rank=8, alpha=16.0, targets=("q", "v"), base_dtype="bfloat16")
    assert load_config(demo_config_path()).model.lora.model_config() is None  # off by default (the paper)
    model = init_model(_toy_cfg(lora=cfg.model.lora.model_config()))
    params, frozen = lora.split_policy(nnx.state(model), model.cfg.lora)
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}


@pytest.mark.slow
def test_lora_trainer_resumes_exactly(tmp_path):
    from test_trainer import TINY

    from realjax.rl import Trainer

    common = [f"output_dir={tmp_path}", *TINY, "model.lora.rank=4", "model.lora.dropout=0.1", "data.eval=",
              "eval.before=false", "trainer.export=false"]
    straight = load_config(demo_config_path(), [*common, "name=straight", "trainer.steps=3"])
    Trainer(straight).run()
    Trainer(load_config(demo_config_path(), [*common, "name=cut", "trainer.steps=2"])).run()
    cut = load_config(demo_config_path(), [*common, "name=cut", "trainer.steps=3"])
    resumed = Trainer(cut)
    assert resumed.run()["resumed_at"] == 2
    like = Trainer(straight)
    want = Checkpointer(straight.run_dir / "checkpoints").restore(3, like.params, like.opt_state)
    got = Checkpointer(cut.run_dir / "checkpoints").restore(3, like.params, like.opt_state)
    chex.assert_trees_all_equal(got[:2], want[:2])
    assert got[2]["base"] == want[2]["base"] and got[2]["base"]["sha256"]


@pytest.mark.slow
def test_demo_reward_rises_with_adapters_only(tmp_path):
    """The demo config with rank-8 adapters on every projection and a 5x higher lr (5e-4; 2e-3 moved the
    policy 10x more per step than full fine-tuning and did not learn): over 40 steps the training reward
    of the last 10 beats that of the first 10 (measured: 0.50 -> 0.59; full fine-tuning, docs/
    demo_dynamics.png, goes about 0.48 -> 0.60 over the same steps)."""
    from realjax.rl import Trainer

    cfg = load_config(demo_config_path(), [f"output_dir={tmp_path}", "name=lora", "model.lora.rank=8",
                                           "model.lora.alpha=16", "optim.lr=5e-4", "trainer.steps=40",
                                           "trainer.eval_every=0", "eval.before=false", "data.eval=",
                                           "trainer.export=false", "logging.progress=false", "trainer.save_every=100"])
    Trainer(cfg).run()
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(rewards) == 40
    first, last = np.mean(rewards[:10]), np.mean(rewards[-10:])
    assert last > first + 0.05, (first, last, rewards)


def test_7b_lora_config_is_the_paper_config_but_for_its_stated_departures():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    lora_cfg = load_config(configs / "r1_distill_qwen_7b_real_lora.yaml")
    full = load_config(configs / "r1_distill_qwen_7b_real.yaml")
    assert lora_cfg.model.lora.model_config() == LoraConfig(rank=32, alpha=64.0, base_dtype="bfloat16")
    departures = {"rollout": {"max_new_tokens", "prompts_per_call"}, "optim": {"lr", "micro_batches"},
                  "eval": {"max_new_tokens", "prompts_per_call"}, "mesh": {"tensor"}, "model": {"lora"}}
    for section, keys in departures.items():
        a, b = getattr(lora_cfg, section), getattr(full, section)
        same = {k: v for k, v in vars(a).items() if k not in keys}
        assert same == {k: v for k, v in vars(b).items() if k not in keys}, section
    assert (lora_cfg.loss, lora_cfg.data, lora_cfg.reward) == (full.loss, full.data, full.reward)
