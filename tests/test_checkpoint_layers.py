"""Checkpoints across the blocks' layouts: one saved with the blocks as a list restores into the scanned
(stacked) model and the reverse, parameters and Adam's moments equal to the saved ones and the next update
equal to the uninterrupted run's; a checkpoint of another model is refused by name, not taken for damage."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from realjax import sharding as shd
from realjax.checkpoint import Checkpointer, LayoutMismatch
from realjax.checkpoint_layers import leaf_paths
from realjax.models import ModelConfig, init_model
from realjax.rl.batch import TrainState
from realjax.rl.plan import opt_state_shardings

OPT = optax.adamw(1e-2)


def _cfg(scanned: bool, layers: int = 2) -> ModelConfig:
    return ModelConfig(family="qwen2", vocab_size=40, hidden_size=32, num_layers=layers, num_heads=4, num_kv_heads=2,
                       head_dim=8, intermediate_size=48, param_dtype="float32", dtype="float32", scan_layers=scanned)


def _model(scanned: bool, mesh=None, layers: int = 2):
    model = init_model(_cfg(scanned, layers), seed=0)
    graphdef, params = nnx.split(model)
    if mesh is not None:
        params = jax.device_put(params, shd.state_shardings(params, mesh, shd.TRAIN_RULES))
    return graphdef, params


def _step(graphdef):
    """One AdamW step on the next-token loss of a fixed batch (jitted; the state is donated)."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (4, 12)), jnp.int32)

    def loss(params):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, params)(ids[:, :-1]))
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    def step(state: TrainState):
        updates, opt_state = OPT.update(jax.grad(loss)(state.params), state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)

    return jax.jit(step, donate_argnums=0)


def _layout_of(tree, scanned: bool):
    """``tree`` (a list-layout state's leaves by path) as numpy in the ``scanned`` layout, by hand: block i's
    ``layers/<i>/rest`` is row i of ``layers/rest``."""
    flat = {p: np.asarray(x) for p, x in leaf_paths(tree).items()}
    if not scanned:
        return flat
    out, stacks = {}, {}
    for p, x in flat.items():
        if "layers" in p:
            j = p.index("layers")
            stacks.setdefault(p[:j + 1] + p[j + 2:], {})[int(p[j + 1])] = x
        else:
            out[p] = x
    out.update({p: np.stack([blocks[i] for i in sorted(blocks)]) for p, blocks in stacks.items()})
    return out


def _assert_same(got_tree, want: dict):
    got = {p: np.asarray(x) for p, x in leaf_paths(got_tree).items()}
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg="/".join(p))


def _in_layout(tree, scanned: bool) -> dict:
    """Any-layout ``tree``'s leaves by path in the ``scanned`` layout (numpy), by hand."""
    stacked = any("layers" in p and not p[p.index("layers") + 1].isdigit() for p in leaf_paths(tree))
    if stacked == scanned:
        return {p: np.asarray(x) for p, x in leaf_paths(tree).items()}
    return _layout_of(tree, True) if scanned else _unstacked(tree)


def _like(target, values: dict):
    """``target``'s tree holding ``values`` (by path)."""
    treedef = jax.tree.structure(target)
    return jax.tree.unflatten(treedef, [jnp.asarray(values[p]) for p in leaf_paths(target)])


@pytest.mark.parametrize("saved_scanned", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_checkpoint_restores_into_the_other_block_layout(tmp_path, saved_scanned):
    """Train one update in one layout, save; restore into the other (on an 8-device mesh): the numbers are
    the saved ones, and the next update equals the run that never stopped."""
    mesh = shd.make_mesh(None)
    g_list, p_list = _model(False)
    g_scan, p_scan = _model(True)
    p_scan = _like(p_scan, _in_layout(p_list, True))  # the same weights in both layouts
    g_save, p_save = (g_scan, p_scan) if saved_scanned else (g_list, p_list)
    g_load, p_load = (g_list, p_list) if saved_scanned else (g_scan, p_scan)
    state = _step(g_save)(TrainState(jax.tree.map(jnp.copy, p_save), OPT.init(p_save)))
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, state.params, state.opt_state, {"step": 1})

    load_sh = shd.state_shardings(p_load, mesh, shd.TRAIN_RULES)
    target = jax.device_put(p_load, load_sh)
    target_opt = jax.device_put(OPT.init(target), opt_state_shardings(jax.eval_shape(OPT.init, target), load_sh, mesh))
    params, opt_state, meta = ckpt.restore(1, target, target_opt)
    assert meta["step"] == 1
    # the target's own pytree (an nnx.State holds plain dicts inside: a jit's out_shardings must match it)
    assert jax.tree.structure(params) == jax.tree.structure(target)
    assert jax.tree.structure(opt_state) == jax.tree.structure(target_opt)
    # exactly the saved numbers, in the target's layout and shardings (Adam's moments included)
    _assert_same(params, _in_layout(state.params, not saved_scanned))
    _assert_same(opt_state, _in_layout(state.opt_state, not saved_scanned))
    for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(load_sh)):
        assert x.sharding.is_equivalent_to(sh, x.ndim)
    # the next update from the restored state against the uninterrupted run's (compared in one layout)
    want_params = _in_layout(_step(g_save)(state).params, not saved_scanned)
    before = {p: np.asarray(x) for p, x in leaf_paths(params).items()}
    got = _step(g_load)(TrainState(params, opt_state))
    moved = max(np.abs(before[p] - want_params[p]).max() for p in before)
    assert moved > 1e-3, "the second update must move the weights for the comparison to mean anything"
    for p, x in leaf_paths(got.params).items():
        # Adam's step is about lr per weight wherever the gradient is not tiny; a loop and a scan on other
        # meshes add gradients in other orders, which moves a near-zero gradient's step by up to ~1e-5
        np.testing.assert_allclose(np.asarray(x), want_params[p], atol=2e-5, err_msg="/".join(p))


def _unstacked(tree) -> dict:
    """A stacked-layout tree's leaves by path in the list layout, by hand."""
    out = {}
    for p, x in leaf_paths(tree).items():
        x = np.asarray(x)
        if "layers" in p:
            j = p.index("layers")
            out.update({p[:j + 1] + (str(i),) + p[j + 1:]: x[i] for i in range(x.shape[0])})
        else:
            out[p] = x
    return out


def test_a_checkpoint_of_another_model_is_refused_by_name_and_kept(tmp_path):
    g, p = _model(False)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, p, OPT.init(p), {"step": 1})
    ckpt.save(2, p, OPT.init(p), {"step": 2})
    _, other = _model(True, layers=3)
    with pytest.raises(LayoutMismatch, match="neither the model's .* nor the model's with its blocks unstacked"):
        ckpt.restore(2, other, OPT.init(other))
    with pytest.raises(LayoutMismatch):
        ckpt.restore_latest(other, OPT.init(other))
    assert ckpt.all_steps() == [1, 2], "a checkpoint of another model is not damage: nothing set aside"
    assert not list((tmp_path / "ckpt").glob("*.damaged"))
