"""Scanned layers (``ModelConfig.scan_layers``): one stacked block module under ``jax.lax.scan`` computes
what the unrolled blocks compute, loads and saves the same HF tensors (per shard on a mesh), and serves
the sampler, the engine and the trainer unchanged. The default run keeps the cheap checks (one family,
one mesh); gradients under each remat policy, the sampler and engine, and a training run are -m slow
(minutes on a loaded 2-core host)."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import assert_sharded_forward_equals, make_hf_model, torch_logits
from flax import nnx

from realjax import sharding as shd
from realjax.cli import main
from realjax.config import demo_config_path, load_config
from realjax.data import batch_prompts
from realjax.models import (PRESETS, KVCache, ModelConfig, abstract_model, from_pretrained, init_model, preset,
                            save_pretrained)
from realjax.models.config import SCAN_MIN_LAYERS
from realjax.rl import Trainer
from realjax.sampling import Engine, Sampler, SamplingConfig

LAYERS = 3  # more than one scan step, and a count where the layer order shows


# qwen2 (q/k/v biases, untied head) runs by default; the other families with -m slow.
@pytest.fixture(scope="module", params=["qwen2", pytest.param("qwen3", marks=pytest.mark.slow),
                                        pytest.param("llama", marks=pytest.mark.slow)])
def hf_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return d, make_hf_model(request.param, d, seed=5, num_hidden_layers=LAYERS)


def _ids(shape, seed=0, vocab=101):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def _stacked(unrolled_state):
    """The unrolled model's per-block weights stacked into the scanned layout ([L, ...] per weight)."""
    flat = dict(nnx.to_flat_state(unrolled_state))
    out = {}
    for path, var in flat.items():
        if path[0] == "layers":
            out.setdefault(("layers",) + path[2:], []).append((path[1], var.get_value()))
        else:
            out[path] = var.get_value()
    return {p: (jnp.stack([v for _, v in sorted(vs, key=lambda t: t[0])]) if isinstance(vs, list) else vs)
            for p, vs in out.items()}


def _values(state):
    return {p: v.get_value() for p, v in nnx.to_flat_state(state)}


def test_the_layer_count_rule_and_validation():
    assert PRESETS["deepseek-r1-distill-qwen-1.5b"].scanned  # 28 layers
    assert not preset("qwen2.5-0.5b", num_layers=SCAN_MIN_LAYERS - 1).scanned
    assert preset("qwen2.5-0.5b", num_layers=SCAN_MIN_LAYERS).scanned
    assert not preset("qwen2.5-0.5b", scan_layers=False).scanned
    assert preset("qwen2.5-0.5b", num_layers=2, scan_layers=True).scanned
    with pytest.raises(ValueError, match="scan_layers"):
        preset("qwen2.5-0.5b", scan_layers="yes")


def test_stacked_weights_carry_the_layers_axis_and_count_the_same():
    cfg = PRESETS["deepseek-r1-distill-qwen-1.5b"]
    _, scanned = abstract_model(cfg)
    _, unrolled = abstract_model(cfg.replace(scan_layers=False))
    q = dict(nnx.to_flat_state(scanned))[("layers", "attn", "q")]
    assert q.get_value().shape == (28, 1536, 12, 128) and q.get_metadata()["axes"][0] == "layers"
    count = lambda s: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s))
    assert count(scanned) == count(unrolled) == cfg.num_params()


def test_scanned_logits_equal_transformers_and_the_unrolled_model(hf_dir):
    d, tm = hf_dir
    scanned, unrolled = from_pretrained(d, scan_layers=True), from_pretrained(d, scan_layers=False)
    assert scanned.cfg.scanned and not unrolled.cfg.scanned
    chex.assert_trees_all_equal(_values(nnx.state(scanned, nnx.Param)), _stacked(nnx.state(unrolled, nnx.Param)))
    ids, mask = _ids((3, 16), 1), np.ones((3, 16), int)
    mask[0, :6] = 0
    got = np.asarray(jax.jit(lambda i, m: scanned(i, attention_mask_BT=m))(ids, mask))
    np.testing.assert_allclose(got[mask == 1], torch_logits(tm, ids, mask)[mask == 1], atol=1e-4)
    np.testing.assert_allclose(got, np.asarray(unrolled(jnp.asarray(ids), attention_mask_BT=jnp.asarray(mask))),
                               atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_gradients_equal_unrolled_under_each_remat_policy(remat):
    base = ModelConfig(family="qwen2", vocab_size=60, hidden_size=32, num_layers=LAYERS, num_heads=4,
                       num_kv_heads=2, head_dim=8, intermediate_size=48, remat=remat)
    graphdef_u, state_u = nnx.split(init_model(base.replace(scan_layers=False), seed=3))
    graphdef_s, state_s = nnx.split(init_model(base.replace(scan_layers=True), seed=3))
    state_s = nnx.from_flat_state([(p, v.replace(_stacked(state_u)[p])) for p, v in nnx.to_flat_state(state_s)])
    ids = jnp.asarray(_ids((2, 7), 6, 60))

    def loss(gd):
        return lambda st: jnp.sum(jax.nn.log_softmax(nnx.merge(gd, st)(ids))[..., 0])

    v_s, g_s = jax.jit(jax.value_and_grad(loss(graphdef_s)))(state_s)
    v_u, g_u = jax.jit(jax.value_and_grad(loss(graphdef_u)))(state_u)
    np.testing.assert_allclose(v_s, v_u, rtol=1e-6)
    chex.assert_trees_all_close(_values(g_s), _stacked(g_u), atol=1e-5)


def test_scanned_save_writes_the_unrolled_tensors_and_loads_back(hf_dir, tmp_path):
    import transformers

    d, tm = hf_dir
    scanned = from_pretrained(d, scan_layers=True)
    out = save_pretrained(scanned, tmp_path / "export", max_shard_bytes=30_000)  # several files and an index
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids = _ids((2, 11), 2)
    np.testing.assert_array_equal(torch_logits(back, ids), torch_logits(tm, ids))  # identical weights
    chex.assert_trees_all_equal(_values(nnx.state(from_pretrained(out, scan_layers=True), nnx.Param)),
                                _values(nnx.state(scanned, nnx.Param)))


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4), pytest.param((2, 4, 1), marks=pytest.mark.slow)])
def test_scanned_load_onto_a_mesh_per_shard_equals_unsharded(hf_dir, mesh_shape):
    d, _ = hf_dir
    mesh = shd.make_mesh(shd.MeshConfig(*mesh_shape))
    plain = from_pretrained(d, scan_layers=True)
    sharded = from_pretrained(d, mesh=mesh, scan_layers=True)
    q = sharded.layers.attn.q[...]  # [L, D, N, H]: layers replicated, the rest as an unstacked weight
    assert q.sharding.spec[0] is None
    assert tuple(q.sharding.spec[1:]) == tuple(shd.logical_to_spec(("embed", "heads", "head_dim"), q.shape[1:], mesh,
                                                                   shd.TRAIN_RULES))
    chex.assert_trees_all_equal(_values(nnx.state(sharded, nnx.Param)), _values(nnx.state(plain, nnx.Param)))
    assert_sharded_forward_equals(sharded, plain, mesh, _ids((8, 12), 3))


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2_decode")
    make_hf_model("qwen2", d, seed=3, num_hidden_layers=LAYERS)
    return from_pretrained(d, scan_layers=True), from_pretrained(d, scan_layers=False)


def test_scanned_cached_decode_equals_full_forward(models):
    model, _ = models
    ids, mask = batch_prompts(PROMPTS, 0, buckets=(8,))
    rest = np.random.default_rng(0).integers(3, 100, (3, 6))
    full_ids, full_mask = np.concatenate([ids, rest], 1), np.concatenate([mask, np.ones_like(rest)], 1)
    want = np.asarray(model(jnp.asarray(full_ids), attention_mask_BT=jnp.asarray(full_mask)))
    step = jax.jit(lambda ids, pos, m, cache: model.hidden_states(ids, pos, m, cache=cache))
    h, cache = step(jnp.asarray(ids), None, jnp.asarray(mask), KVCache.zeros(model.cfg, 3, 14))
    assert cache.k.shape == (LAYERS, 3, model.cfg.num_kv_heads, 14, model.cfg.head_dim)
    got, plen = [np.asarray(model.logits(h))], mask.sum(1)
    for t in range(rest.shape[1]):
        h, cache = step(jnp.asarray(rest[:, t:t + 1]), jnp.asarray(plen + t)[:, None], jnp.ones((3, 1), bool), cache)
        got.append(np.asarray(model.logits(h)))
    got = np.concatenate(got, 1)
    np.testing.assert_allclose(got[full_mask == 1], want[full_mask == 1], atol=1e-5)


def test_scanned_decode_on_a_tensor_parallel_mesh_keeps_each_chips_cache(tmp_path):
    """fsdp=2 x tensor=4 (the 7B LoRA config's mesh): the scanned sampler draws the unsharded unrolled
    samples, and its decode program moves no cache between chips. The scan body pins the carried cache's
    memory layout; pinned on the global array, XLA's partitioner all-gathered the cache around the pin
    (on a TPU v5e-8, 27 GiB of temp for the 7B's decode), so the pin runs per shard."""
    make_hf_model("qwen2", tmp_path, seed=3, num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=4)
    mesh = shd.make_mesh(shd.MeshConfig(1, 2, 4))
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0)
    ids, mask = batch_prompts(PROMPTS + [[18]], 0, buckets=(8,))

    def run(model, mesh):
        sampler, graphdef, state = Sampler(cfg, pad_id=0, mesh=mesh), *nnx.split(model)
        batch = (ids, mask) if mesh is None else shd.put_batch((ids, mask), mesh, sampler.rules)
        ds = sampler.prefill_program(graphdef, state, *batch, jax.random.key(2), 2)
        (window,) = sampler.windows(ds)
        decode = sampler.decode_program.lower(graphdef, state, sampler.with_window(ds, window)).compile()
        out = sampler.finish(decode(state, sampler.with_window(ds, window)))
        return jax.tree.map(np.asarray, out), decode.as_text()

    want, _ = run(from_pretrained(tmp_path, scan_layers=False), None)
    got, hlo = run(from_pretrained(tmp_path, mesh=mesh, rules=shd.ROLLOUT_RULES, scan_layers=True), mesh)
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


@pytest.mark.slow
def test_scanned_sampler_and_engine_draw_the_unrolled_samples(models):
    scanned, unrolled = models
    cfg = SamplingConfig(max_new_tokens=9, temperature=1.0, window_tokens=4)
    ids, mask = batch_prompts(PROMPTS, 0, buckets=(8,))
    budgets = np.random.default_rng(1).integers(1, 10, len(PROMPTS) * 2)

    def run(sampler, model):
        graphdef, state = nnx.split(model)
        out = sampler(graphdef, state, ids, mask, jax.random.key(4), group_size=2, budgets=budgets)
        return jax.tree.map(np.asarray, out)

    want = run(Sampler(cfg, pad_id=0), unrolled)
    for got in (run(Sampler(cfg, pad_id=0), scanned), run(Engine(cfg, pad_id=0, slots=4, compact_every=2), scanned)):
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


@pytest.mark.slow
def test_a_scanned_run_trains_checkpoints_and_exports_as_the_unrolled_one(tmp_path):
    """The demo model (4 blocks) trained one RL step with and without ``model.scan_layers`` on the
    8-device mesh: the same loss, and ``realjax export`` of each checkpoint writes the same HF weights."""
    base = ["rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=12", "optim.mini_batches=2",
            "trainer.steps=1", "trainer.save_every=1", "data.eval=",
            "logging.progress=false", "logging.tensorboard=false", "trainer.export=false", "mesh.fsdp=4", "mesh.tensor=2"]
    losses, exported = [], []
    for scan in ("true", "false"):
        cfg = load_config(demo_config_path(), [f"output_dir={tmp_path}", f"name=s{scan}", *base, f"model.scan_layers={scan}"])
        summary = Trainer(cfg).run()
        rows = [r for r in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        losses.append(rows[-1]["loss"])
        assert main(["export", "--run", str(summary["run_dir"]), "--out", str(tmp_path / f"export_{scan}")]) == 0
        exported.append(_values(nnx.state(from_pretrained(tmp_path / f"export_{scan}"), nnx.Param)))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    chex.assert_trees_all_close(exported[0], exported[1], atol=1e-6)
