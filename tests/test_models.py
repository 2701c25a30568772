"""The NNX decoder against transformers, HF round trips, sharding, chunked log-probs, presets."""

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import assert_sharded_forward_equals, make_hf_model, torch_logits
from flax import nnx

from realjax import sharding as shd
from realjax.models import (PRESETS, abstract_model, from_pretrained, init_model, load_hf_config,
                            save_pretrained, token_logprobs)

FAMILIES = ["qwen2", "qwen3", "llama"]


@pytest.fixture(scope="module", params=FAMILIES)
def hf_pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    torch_model = make_hf_model(request.param, d)
    return request.param, d, torch_model


def _ids(shape, seed=0, vocab=101):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def test_logits_equal_transformers(hf_pair):
    family, d, tm = hf_pair
    model = from_pretrained(d)
    ids = _ids((2, 19))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), torch_logits(tm, ids), atol=1e-4)


def test_left_padded_logits_equal_transformers(hf_pair):
    family, d, tm = hf_pair
    model = from_pretrained(d)
    ids, mask = _ids((3, 16), 1), np.ones((3, 16), int)
    mask[0, :6], mask[2, :1] = 0, 0
    ours = np.asarray(model(jnp.asarray(ids), attention_mask_BT=jnp.asarray(mask)))
    np.testing.assert_allclose(ours[mask == 1], torch_logits(tm, ids, mask)[mask == 1], atol=1e-4)
    assert np.isfinite(ours).all()  # padded rows attend nowhere and still give finite numbers


def test_export_round_trip_through_transformers(hf_pair, tmp_path):
    import transformers

    family, d, tm = hf_pair
    model = from_pretrained(d)
    out = save_pretrained(model, tmp_path / "export")
    assert (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids = _ids((2, 11), 2)
    np.testing.assert_array_equal(torch_logits(back, ids), torch_logits(tm, ids))  # identical weights
    again = from_pretrained(out)
    chex.assert_trees_all_equal(nnx.state(again, nnx.Param), nnx.state(model, nnx.Param))


def test_sharded_safetensors_with_index_and_bf16(hf_pair, tmp_path):
    family, d, tm = hf_pair
    model = from_pretrained(d)
    out = save_pretrained(model, tmp_path / "sharded", dtype=jnp.bfloat16, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = from_pretrained(out)  # bf16 on disk -> fp32 parameters
    want = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), nnx.state(model, nnx.Param))
    chex.assert_trees_all_equal(nnx.state(back, nnx.Param), want)


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 2, 4), (1, 1, 8), (8, 1, 1)])
def test_sharded_equals_unsharded(hf_pair, mesh_shape):
    family, d, _ = hf_pair
    mesh = shd.make_mesh(shd.MeshConfig(*mesh_shape))
    plain = from_pretrained(d)
    sharded = from_pretrained(d, mesh=mesh)
    q = sharded.layers[0].attn.q[...]
    assert q.sharding.mesh.shape == mesh.shape
    assert_sharded_forward_equals(sharded, plain, mesh, _ids((8, 12), 3))


@pytest.mark.parametrize("chunk_tokens", [8, 4096])  # 2 positions per chunk; one chunk (logits kept)
def test_chunked_logprobs_equal_naive_in_value_and_gradient(chunk_tokens):
    from realjax.models import ModelConfig

    cfg = ModelConfig(family="qwen2", vocab_size=97, hidden_size=32, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8, intermediate_size=48, tie_word_embeddings=True)
    model = init_model(cfg, seed=1)
    ids = jnp.asarray(_ids((3, 13), 4, 97))
    graphdef, state = nnx.split(model)

    def chunked(state):
        m = nnx.merge(graphdef, state)
        h, _ = m.hidden_states(ids[:, :-1])
        lp, ent = token_logprobs(m, h, ids[:, 1:], temperature=0.7, chunk_tokens=chunk_tokens)
        return jnp.sum(lp), (lp, ent)

    def naive(state):
        m = nnx.merge(graphdef, state)
        z = m(ids[:, :-1]) / 0.7
        lp = jnp.take_along_axis(jax.nn.log_softmax(z), ids[:, 1:, None], -1)[..., 0]
        p = jax.nn.softmax(z)
        return jnp.sum(lp), (lp, -jnp.sum(p * jax.nn.log_softmax(z), -1))

    (v1, aux1), g1 = jax.value_and_grad(chunked, has_aux=True)(state)
    (v2, aux2), g2 = jax.value_and_grad(naive, has_aux=True)(state)
    chex.assert_trees_all_close(aux1, aux2, atol=1e-5)
    chex.assert_trees_all_close(g1, g2, atol=1e-5)


def test_causal_by_gradient():
    from realjax.models import ModelConfig

    cfg = ModelConfig(family="qwen3", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, intermediate_size=48)
    model = init_model(cfg, seed=2)
    ids = jnp.asarray(_ids((1, 9), 5, 50))
    emb = jnp.take(model.embed[...], ids, axis=0)
    t = 4

    def out_at_t(e):
        h, _ = model.hidden_states(ids, embeds_BTD=e)
        return jnp.sum(model.logits(h)[:, t])

    g = np.abs(np.asarray(jax.grad(out_at_t)(emb))).sum(-1)[0]
    assert np.all(g[t + 1:] == 0) and np.all(g[: t + 1] > 0)


# Published parameter counts of the checkpoints (safetensors totals on the HF hub).
PUBLISHED = {
    "deepseek-r1-distill-qwen-1.5b": 1_777_088_000, "deepseek-r1-distill-qwen-7b": 7_615_616_512,
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920, "qwen3-1.7b": 1_720_574_976, "qwen3-4b": 4_022_468_096,
    "qwen3-8b": 8_190_735_360, "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts(name):
    _, abstract = abstract_model(PRESETS[name])  # jax.eval_shape: nothing allocated
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    assert n == PRESETS[name].num_params() == PUBLISHED[name]


def test_old_and_new_config_forms_parse_the_same(hf_pair, tmp_path):
    family, d, _ = hf_pair
    new = json.loads((d / "config.json").read_text())
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "dtype")}
    rp = dict(new["rope_parameters"])
    old["rope_theta"] = rp.pop("rope_theta")
    old["torch_dtype"] = "float32"
    if rp.get("rope_type") != "default":
        old["rope_scaling"] = rp
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert load_hf_config(tmp_path) == load_hf_config(d)


def test_errors_name_the_tensor_and_the_file(tmp_path):
    from realjax.models.hf import SafetensorsFile, write_safetensors

    d = tmp_path / "m"
    make_hf_model("qwen2", d, tokenizer=False)
    cfg = json.loads((d / "config.json").read_text())
    bad = tmp_path / "bad_arch"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: unsupported architecture model_type='gpt2'"):
        from_pretrained(bad)

    st = SafetensorsFile(d / "model.safetensors")
    names = [n for n in st.keys() if n != "model.layers.1.mlp.up_proj.weight"]

    def rewrite(dst, names, edit=lambda n, a: a):
        dst.mkdir()
        shutil.copy(d / "config.json", dst / "config.json")
        arrays = {n: edit(n, np.asarray(st.array(n))) for n in names}
        write_safetensors(dst / "model.safetensors", [(n, a.shape, a.dtype, lambda a=a: a) for n, a in arrays.items()])

    rewrite(tmp_path / "missing", names)
    with pytest.raises(KeyError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        from_pretrained(tmp_path / "missing")
    rewrite(tmp_path / "shape", list(st.keys()),
            lambda n, a: a[:-1] if n == "model.layers.0.self_attn.k_proj.weight" else a)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has shape"):
        from_pretrained(tmp_path / "shape")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_values_and_gradients(remat):
    from realjax.models import ModelConfig

    base = ModelConfig(family="qwen2", vocab_size=60, hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, intermediate_size=48)
    graphdef, state = nnx.split(init_model(base, seed=3))
    graphdef_r, _ = nnx.split(init_model(base.replace(remat=remat), seed=3))
    ids = jnp.asarray(_ids((2, 7), 6, 60))

    def loss(gd):
        return lambda st: jnp.sum(jax.nn.log_softmax(nnx.merge(gd, st)(ids))[..., 0])

    chex.assert_trees_all_close(jax.jit(jax.value_and_grad(loss(graphdef_r)))(state),
                                jax.jit(jax.value_and_grad(loss(graphdef)))(state), atol=1e-5)
