"""Losses against float64 numpy transcriptions of the paper's formulas, and the paper's gradient analysis."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from realjax import losses, testing
from realjax.losses import LOSSES

TAU = 0.5


# ----------------------------------------------------------------------------------------------------
# float64 references, written from the formulas in shared/PAPER.md (one loop per group, no masks)
# ----------------------------------------------------------------------------------------------------
def np_scores(b):
    lp, old, m = (np.asarray(b[k], np.float64) for k in ("logp", "old_logp", "mask"))
    return (m * (lp - old)).sum(-1) / np.maximum(m.sum(-1), 1)


def np_real(b, G, tau=TAU):
    s, r = np_scores(b).reshape(-1, G), np.asarray(b["rewards"], np.float64).reshape(-1, G)
    total = 0.0
    for sg, rg in zip(s, r):
        pos, neg = sg[rg == 1], sg[rg == 0]
        if len(pos) and len(neg):
            total += np.log1p(np.exp(-pos / tau).sum()) + np.log1p(np.exp(neg / tau).sum())
    return total / len(s)


def np_real_bce(b, G, tau=TAU):
    s, r = np_scores(b).reshape(-1, G), np.asarray(b["rewards"], np.float64).reshape(-1, G)
    terms = []
    for sg, rg in zip(s, r):
        if (rg == 1).any() and (rg == 0).any():
            for z, y in zip(sg / tau, rg):
                if y in (0.0, 1.0):
                    p = 1 / (1 + np.exp(-z))
                    terms.append(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return np.mean(terms) if terms else 0.0


def np_real_product(b, G, tau=TAU):
    s, r = np_scores(b).reshape(-1, G), np.asarray(b["rewards"], np.float64).reshape(-1, G)
    total = 0.0
    for sg, rg in zip(s, r):
        pos, neg = sg[rg == 1], sg[rg == 0]
        if len(pos) and len(neg):
            total += np.log1p(sum(np.exp((j - i) / tau) for i in pos for j in neg))
    return total / len(s)


def np_real_ordinal(b, G, tau=TAU):
    s, r = np_scores(b).reshape(-1, G), np.asarray(b["rewards"], np.float64).reshape(-1, G)
    total = 0.0
    for sg, rg in zip(s, r):
        for level in np.unique(rg)[:-1]:
            pos, neg = sg[rg > level], sg[rg <= level]
            total += np.log1p(np.exp(-pos / tau).sum()) + np.log1p(np.exp(neg / tau).sum())
    return total / len(s)


def np_adv(r, G, scale=True):
    r = np.asarray(r, np.float64).reshape(-1, G)
    a = r - r.mean(-1, keepdims=True)
    if scale:
        a = a / (r.std(-1, ddof=1, keepdims=True) + 1e-6)
    return a.reshape(-1)


def np_ppo_tokens(b, adv, lo, hi):
    lp, old = (np.asarray(b[k], np.float64) for k in ("logp", "old_logp"))
    rho = np.exp(lp - old)
    return np.maximum(-adv[:, None] * rho, -adv[:, None] * np.clip(rho, 1 - lo, 1 + hi))


def np_seq_then_batch(x, m):
    return np.mean((m * x).sum(-1) / np.maximum(m.sum(-1), 1))


def np_grpo(b, G, eps=0.2, ref=None, coef=0.0):
    m = np.asarray(b["mask"], np.float64)
    loss = np_seq_then_batch(np_ppo_tokens(b, np_adv(b["rewards"], G), eps, eps), m)
    if ref is not None:
        d = np.asarray(ref, np.float64) - np.asarray(b["logp"], np.float64)
        loss += coef * np_seq_then_batch(np.exp(d) - d - 1, m)
    return loss


def np_dapo(b, G):
    m = np.asarray(b["mask"], np.float64)
    return (m * np_ppo_tokens(b, np_adv(b["rewards"], G), 0.2, 0.28)).sum() / m.sum()


def np_gspo(b, G):
    m = np.asarray(b["mask"], np.float64)
    rho = np.exp(np.minimum(np_scores(b), 10.0))
    a = np_adv(b["rewards"], G)
    per_seq = np.maximum(-a * rho, -a * np.clip(rho, 1 - 3e-4, 1 + 4e-4))
    return np.mean(per_seq) if m.size else 0.0


def np_dr_grpo(b, G):
    m = np.asarray(b["mask"], np.float64)
    tok = np_ppo_tokens(b, np_adv(b["rewards"], G, scale=False), 0.2, 0.2)
    return (m * tok).sum() / (m.shape[0] * m.shape[1])


REFERENCES = {"real": np_real, "real_bce": np_real_bce, "real_product": np_real_product,
              "real_ordinal": np_real_ordinal, "grpo": np_grpo, "dapo": np_dapo, "gspo": np_gspo,
              "dr_grpo": np_dr_grpo}


def test_registry_has_every_objective():
    assert set(LOSSES) == {"real", "real_bce", "real_product", "real_ordinal", "grpo", "dapo", "gspo", "dr_grpo"}


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("G,seed", [(2, 0), (4, 1), (8, 2), (16, 3)])
def test_loss_equals_float64_formula(name, G, seed):
    b = testing.random_grouped_batch(seed, num_groups=5, group_size=G, length=9, score_scale=0.4)
    loss, metrics = LOSSES[name](b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=G)
    np.testing.assert_allclose(float(loss), REFERENCES[name](b, G), rtol=2e-5, atol=1e-6)
    for v in metrics.values():
        chex.assert_tree_all_finite(v)
    np.testing.assert_allclose(float(metrics["score_mean"]), np_scores(b).mean(), rtol=1e-5, atol=1e-6)


def test_grpo_kl_term_matches_k3_formula():
    b = testing.random_grouped_batch(4, num_groups=4, group_size=4)
    ref = b["old_logp"] - 0.1
    loss, m = losses.grpo_loss(b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=4,
                               ref_logp=ref, kl_coef=0.001)
    np.testing.assert_allclose(float(loss), np_grpo(b, 4, ref=ref, coef=0.001), rtol=2e-5)
    assert float(m["kl_ref"]) > 0


def test_kl_to_old_estimators():
    b = testing.random_grouped_batch(5)
    lp, old, m = (np.asarray(b[k], np.float64) for k in ("logp", "old_logp", "mask"))
    _, metrics = losses.real_loss(b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=8)
    d = lp - old
    np.testing.assert_allclose(float(metrics["kl_old_k1"]), (m * -d).sum() / m.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl_old_k3"]), (m * (np.exp(d) - d - 1)).sum() / m.sum(), rtol=1e-4)


@pytest.mark.parametrize("name", ["real", "real_bce", "real_product", "real_ordinal"])
def test_real_family_counts_valid_groups(name):
    b = testing.random_grouped_batch(6, num_groups=5, group_size=4)  # groups 0 and 1 are degenerate
    _, m = LOSSES[name](b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=4)
    assert float(m["valid_groups"]) == 3


def test_ordinal_equals_real_on_binary_rewards():
    b = testing.random_grouped_batch(7, num_groups=6, group_size=8)
    args = (b["logp"], b["old_logp"], b["mask"], b["rewards"])
    chex.assert_trees_all_close(losses.real_ordinal_loss(*args, group_size=8)[0],
                                losses.real_loss(*args, group_size=8)[0], rtol=1e-6)
    chex.assert_trees_all_close(testing.score_grads(losses.real_ordinal_loss, b, group_size=8),
                                testing.score_grads(losses.real_loss, b, group_size=8), atol=1e-7)


def test_ordinal_uses_every_threshold():
    b = testing.random_grouped_batch(8, num_groups=4, group_size=8, reward_levels=4, degenerate=False)
    _, m = losses.real_ordinal_loss(b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=8)
    r = np.asarray(b["rewards"]).reshape(-1, 8)
    assert float(m["thresholds"]) == sum(len(np.unique(g)) - 1 for g in r)


# ----------------------------------------------------------------------------------------------------
# The paper's gradient analysis (Fig. 1, section 2.4) as assertions
# ----------------------------------------------------------------------------------------------------
def real_closed_form(s, r, G, tau=TAU):
    """dL/ds_k from PAPER.md 2.4: -(1/tau)/(1 + C+ e^{s/tau}) for positives, +(1/tau)/(1 + C- e^{-s/tau})."""
    s, r = np.asarray(s, np.float64).reshape(-1, G), np.asarray(r).reshape(-1, G)
    out = np.zeros_like(s)
    for g in range(len(s)):
        pos, neg = r[g] == 1, r[g] == 0
        if not (pos.any() and neg.any()):
            continue
        for k in range(G):
            if pos[k]:
                c = 1 + np.exp(-s[g][pos] / tau).sum() - np.exp(-s[g, k] / tau)
                out[g, k] = -(1 / tau) / (1 + c * np.exp(s[g, k] / tau))
            elif neg[k]:
                c = 1 + np.exp(s[g][neg] / tau).sum() - np.exp(s[g, k] / tau)
                out[g, k] = (1 / tau) / (1 + c * np.exp(-s[g, k] / tau))
    return out.reshape(-1) / len(s)  # the loss averages over groups


@pytest.mark.parametrize("seed", range(4))
def test_real_gradient_equals_closed_form_and_is_bounded(seed):
    G = 8
    b = testing.random_grouped_batch(seed, num_groups=6, group_size=G, score_scale=1.5)
    g = testing.score_grads(losses.real_loss, b, group_size=G)
    np.testing.assert_allclose(np.asarray(g), real_closed_form(np_scores(b), b["rewards"], G), rtol=1e-4, atol=1e-7)
    testing.assert_bounded(g * 6, 1 / TAU)  # per group, i.e. before the mean over 6 groups
    testing.assert_signed_by_label(g, b["rewards"], group_size=G)
    testing.assert_zero_on_degenerate(g, b["rewards"], group_size=G)


@pytest.mark.parametrize("row", [16, 17, 20, 23])
def test_real_gradient_is_monotone_in_score(row):
    b = testing.random_grouped_batch(3, num_groups=4, group_size=8)
    testing.assert_monotone_in_score(losses.real_loss, b, group_size=8, row=row)


def test_real_on_policy_weights_match_paper_table():
    """At s = 0, each positive gets (1/tau)/(1+n+) and each negative (1/tau)/(1+n-) (PAPER.md 2.4)."""
    G = 8
    for n_pos in range(1, G):
        r = jnp.array([1.0] * n_pos + [0.0] * (G - n_pos))
        b = {"logp": jnp.zeros((G, 3)), "old_logp": jnp.zeros((G, 3)), "mask": jnp.ones((G, 3)), "rewards": r}
        g = np.asarray(testing.score_grads(losses.real_loss, b, group_size=G))
        np.testing.assert_allclose(g[:n_pos], -2 / (1 + n_pos), rtol=1e-6)
        np.testing.assert_allclose(g[n_pos:], 2 / (1 + G - n_pos), rtol=1e-6)


def test_bce_gradient_is_sigmoid_minus_label():
    b = testing.random_grouped_batch(9, num_groups=5, group_size=4, score_scale=1.0)
    g = np.asarray(testing.score_grads(losses.real_bce_loss, b, group_size=4))
    s, r = np_scores(b), np.asarray(b["rewards"])
    live = ~testing.degenerate_rows(r, 4)
    want = np.where(live, (1 / TAU) * (1 / (1 + np.exp(-s / TAU)) - r), 0.0) / live.sum()
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)


def test_grpo_token_weight_is_adv_times_ratio_inside_clip_and_zero_outside():
    """|W_GRPO| = |A e^{s_t}| where the token is not clipped, else 0 (paper section 1.1)."""
    G, T = 4, 1
    s_grid = np.linspace(-0.6, 0.6, 25)
    for label, k in ((1.0, 0), (0.0, 3)):
        r = jnp.array([1.0, 1.0, 0.0, 0.0])
        a = np_adv(r, G)[k]
        for s in s_grid:
            logp = jnp.zeros((G, T)).at[k, 0].set(s)
            b = {"logp": logp, "old_logp": jnp.zeros((G, T)), "mask": jnp.ones((G, T)), "rewards": r}
            w = float(testing.token_grads(losses.grpo_loss, b, group_size=G)[k, 0]) * G  # undo batch mean
            clipped = (a > 0 and s > np.log(1.2)) or (a < 0 and s < np.log(0.8))
            want = 0.0 if clipped else -a * np.exp(s)
            np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-7, err_msg=f"label {label}, s {s}")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_degenerate_groups_give_zero_loss_zero_grad_no_nan(name):
    G = 4
    for value in (0.0, 1.0):
        b = testing.random_grouped_batch(10, num_groups=3, group_size=G, degenerate=False)
        b["rewards"] = jnp.full_like(b["rewards"], value)
        loss, metrics = LOSSES[name](b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=G)
        assert float(loss) == 0.0
        g = testing.token_grads(LOSSES[name], b, group_size=G)
        chex.assert_tree_all_finite((g, metrics))
        assert not np.any(np.asarray(g))


@pytest.mark.parametrize("name", ["real", "real_bce", "real_product", "real_ordinal", "gspo"])
def test_invariant_to_permutation_within_group(name):
    G = 8
    b = testing.random_grouped_batch(11, num_groups=4, group_size=G)
    perm = np.concatenate([g * G + np.random.default_rng(g).permutation(G) for g in range(4)])
    pb = {k: v[perm] for k, v in b.items()}
    f = LOSSES[name]
    l0 = f(b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=G)[0]
    l1 = f(pb["logp"], pb["old_logp"], pb["mask"], pb["rewards"], group_size=G)[0]
    chex.assert_trees_all_close(l0, l1, rtol=1e-6)
    g0 = testing.score_grads(f, b, group_size=G)
    g1 = testing.score_grads(f, pb, group_size=G)
    chex.assert_trees_all_close(g0[perm], g1, rtol=1e-5, atol=1e-8)


def test_unknown_kl_estimator_and_bad_group_size_are_clear_errors():
    b = testing.random_grouped_batch(0, num_groups=2, group_size=4, degenerate=False)
    with pytest.raises(ValueError, match="KL estimator"):
        losses.grpo_loss(b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=4,
                         ref_logp=b["old_logp"], kl_estimator="k9")
    with pytest.raises(ValueError, match="whole number of groups"):
        losses.real_loss(b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=3)
    with pytest.raises(ValueError, match="unknown objective"):
        losses.get_loss("ppo")


# ----------------------------------------------------------------------------------------------------
# jit / no-jit, sharded inputs, no retrace
# ----------------------------------------------------------------------------------------------------
class JitVariantsTest(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*sorted(LOSSES))
    def test_same_with_and_without_jit(self, name):
        b = testing.random_grouped_batch(12, num_groups=4, group_size=4)
        fn = self.variant(lambda lp, old, m, r: LOSSES[name](lp, old, m, r, group_size=4))
        loss, metrics = fn(b["logp"], b["old_logp"], b["mask"], b["rewards"])
        want = LOSSES[name](b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=4)
        chex.assert_trees_all_close((loss, metrics), want, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_sharded_inputs_give_the_same_loss_and_grads(name):
    devices = np.array(jax.devices()[:8])
    assert len(devices) == 8, "conftest should fake 8 CPU devices"
    mesh = jax.sharding.Mesh(devices, ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    b = testing.random_grouped_batch(13, num_groups=8, group_size=4)
    sb = jax.device_put(b, rows)
    fn = jax.jit(jax.value_and_grad(lambda lp, old, m, r: LOSSES[name](lp, old, m, r, group_size=4)[0]))
    got = fn(sb["logp"], sb["old_logp"], sb["mask"], sb["rewards"])
    want = fn(b["logp"], b["old_logp"], b["mask"], b["rewards"])
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-8)


def test_no_retrace_on_repeated_calls():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(lp, old, m, r):
        return jax.value_and_grad(lambda x: losses.real_loss(x, old, m, r, group_size=8)[0])(lp)

    for seed in range(4):
        b = testing.random_grouped_batch(seed)
        step(b["logp"], b["old_logp"], b["mask"], b["rewards"])


# ----------------------------------------------------------------------------------------------------
# Rollout/learner mismatch correction (rollout.is_correction) against float64 references
# ----------------------------------------------------------------------------------------------------
from realjax.is_correction import ROLLOUT_OBJECTIVES, is_weights  # noqa: E402

CAP = 1.5
IS_CASES = [(n, m) for n in sorted(LOSSES) for m in ("token_tis", "token_mis", "seq_tis", "seq_mis")
            if not (n in ROLLOUT_OBJECTIVES and m.startswith("token"))]


def np_is_weights(b, mode, cap=CAP):
    """pi_old / mu per token, or its geometric mean per rollout; tis: min(w, C); mis: 0 outside [1/C, C]."""
    old, beh, m = (np.asarray(b[k], np.float64) for k in ("old_logp", "sampler_logp", "mask"))
    lr = m * (old - beh)
    if mode.startswith("seq"):
        lr = lr.sum(-1) / np.maximum(m.sum(-1), 1)
    w = np.exp(lr)
    return np.minimum(w, cap) if mode.endswith("tis") else np.where((w > cap) | (w < 1 / cap), 0.0, w)


def np_real_weighted(b, G, w, tau=TAU):
    """REAL (and ordinal, over each threshold) with each rollout's exp term multiplied by its weight."""
    s, r, w = (np.asarray(x, np.float64).reshape(-1, G) for x in (np_scores(b), b["rewards"], w))
    total = 0.0
    for sg, rg, wg in zip(s, r, w):
        for level in np.unique(rg)[:-1]:
            pos, neg = rg > level, rg <= level
            total += np.log1p((wg[pos] * np.exp(-sg[pos] / tau)).sum()) + np.log1p((wg[neg] * np.exp(sg[neg] / tau)).sum())
    return total / len(s)


def np_real_bce_weighted(b, G, w, tau=TAU):
    s, r, w = (np.asarray(x, np.float64).reshape(-1, G) for x in (np_scores(b), b["rewards"], w))
    terms = [wi * (np.log1p(np.exp(zi)) - y * zi) for sg, rg, wg in zip(s, r, w)
             if (rg == 1).any() and (rg == 0).any() for zi, y, wi in zip(sg / tau, rg, wg)]
    return np.sum(terms) / len(terms)


def np_real_product_weighted(b, G, w, tau=TAU):
    s, r, w = (np.asarray(x, np.float64).reshape(-1, G) for x in (np_scores(b), b["rewards"], w))
    total = 0.0
    for sg, rg, wg in zip(s, r, w):
        pos, neg = np.flatnonzero(rg == 1), np.flatnonzero(rg == 0)
        if len(pos) and len(neg):
            total += np.log1p(sum(wg[i] * wg[j] * np.exp((sg[j] - sg[i]) / tau) for i in pos for j in neg))
    return total / len(s)


def np_token_level_weighted(name, b, G, w):
    """Each token's clipped surrogate times its weight (a rollout's weight on each of its tokens)."""
    m = np.asarray(b["mask"], np.float64)
    W = w[:, None] if w.ndim == 1 else w
    if name == "gspo":
        rho, a = np.exp(np.minimum(np_scores(b), 10.0)), np_adv(b["rewards"], G)
        per_seq = np.maximum(-a * rho, -a * np.clip(rho, 1 - 3e-4, 1 + 4e-4))
        return np.mean(per_seq * (m * W).sum(-1) / np.maximum(m.sum(-1), 1))
    lo, hi, scale = {"grpo": (0.2, 0.2, True), "dapo": (0.2, 0.28, True), "dr_grpo": (0.2, 0.2, False)}[name]
    tok = np_ppo_tokens(b, np_adv(b["rewards"], G, scale=scale), lo, hi) * W
    if name == "grpo":
        return np_seq_then_batch(tok, m)
    return (m * tok).sum() / (m.sum() if name == "dapo" else m.size)


def _is_batch(seed, G, levels=2):
    b = testing.random_grouped_batch(seed, num_groups=5, group_size=G, length=9, score_scale=0.4,
                                     reward_levels=levels)
    rng = np.random.default_rng(seed + 100)
    b["sampler_logp"] = (b["old_logp"] + 0.35 * rng.standard_normal(b["old_logp"].shape)).astype(np.float32)
    return b


@pytest.mark.parametrize("mode", ["token_tis", "token_mis", "seq_tis", "seq_mis"])
def test_is_weights_equal_float64_formula(mode):
    b = _is_batch(0, 4)
    w = is_weights(b["old_logp"], b["sampler_logp"], b["mask"], mode=mode, cap=CAP)
    want = np_is_weights(b, mode)
    m = np.asarray(b["mask"]) if mode.startswith("token") else 1.0
    np.testing.assert_allclose(np.asarray(w.weight) * m, want * m, rtol=1e-5, atol=1e-7)
    cut = 0 < np.mean(np.asarray(w.cut)[np.asarray(w.unit_mask) > 0]) < 1
    assert cut, "the test batch must have weights on both sides of the cap"


@pytest.mark.parametrize("name,mode", IS_CASES)
def test_corrected_loss_equals_float64_formula(name, mode):
    G = 4
    b = _is_batch(1, G, levels=3 if name == "real_ordinal" else 2)
    w = is_weights(b["old_logp"], b["sampler_logp"], b["mask"], mode=mode, cap=CAP).weight
    loss, _ = LOSSES[name](b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=G, is_weight=w)
    w64 = np_is_weights(b, mode)
    if name in ("real", "real_ordinal"):
        want = np_real_weighted(b, G, w64)
    elif name == "real_bce":
        want = np_real_bce_weighted(b, G, w64)
    elif name == "real_product":
        want = np_real_product_weighted(b, G, w64)
    else:
        want = np_token_level_weighted(name, b, G, w64)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
    # The weights are constants of the batch: no gradient reaches them.
    gw = jax.grad(lambda x: LOSSES[name](b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=G,
                                         is_weight=x)[0])(w)
    assert not np.any(np.asarray(gw))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_unit_weights_change_nothing(name):
    b = _is_batch(2, 4)
    shape = b["rewards"].shape if name in ROLLOUT_OBJECTIVES else b["logp"].shape
    plain = LOSSES[name](b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=4)
    ones = LOSSES[name](b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=4, is_weight=jnp.ones(shape))
    chex.assert_trees_all_close(ones, plain, rtol=1e-6, atol=1e-7)


def test_real_weighted_gradient_stays_bounded_by_one_over_tau():
    """A weight shifts a rollout's logit inside the group softmax, so |dL/ds| stays below 1/tau (the anchor
    keeps every softmax share below 1) however large the weight; a weight of 0 takes the rollout out."""
    G = 8
    b = testing.random_grouped_batch(5, num_groups=4, group_size=G, score_scale=1.5)
    w = jnp.asarray(np.random.default_rng(5).choice([0.0, 0.5, 1.0, 4.0, 50.0], size=4 * G), jnp.float32)
    g = testing.score_grads(functools.partial(losses.real_loss, is_weight=w), b, group_size=G)
    testing.assert_bounded(g * 4, 1 / TAU)
    assert not np.any(np.asarray(g)[np.asarray(w) == 0])


# ----------------------------------------------------------------------------------------------------
# The gradient-weight mechanism as the learner measures it (realjax.grad_weights), against Fig. 1
# ----------------------------------------------------------------------------------------------------
from realjax.grad_weights import Max, RowGrads, grad_weight_metrics, row_grads  # noqa: E402


def _fig1_batch():
    """One group of 4 one-token rollouts, old policy at 0: positives at s = 0 and s = -0.15 (a hard
    positive, less likely than under the old policy), negatives at s = 0 and s = +0.15 (a confident one);
    inside GRPO's clip range, so no token is clipped."""
    s = np.array([0.0, -0.15, 0.0, 0.15], np.float32)
    return {"logp": s[:, None] - 1.0, "old_logp": np.full((4, 1), -1.0, np.float32), "mask": np.ones((4, 1), np.float32),
            "rewards": np.array([1.0, 1.0, 0.0, 0.0], np.float32)}, s


def _weights(name, b, G, **hp):
    rows = row_grads(losses.TERMS[name], b["logp"], b["old_logp"], b["mask"], b["rewards"], group_size=G, **hp)
    return np.asarray(rows.weight_B, np.float64), rows


def test_grpo_gradient_weight_shrinks_on_hard_positives_and_grows_on_confident_negatives():
    b, s = _fig1_batch()
    w, _ = _weights("grpo", b, 4)
    np.testing.assert_allclose(w, np.abs(np_adv(b["rewards"], 4)) * np.exp(s.astype(np.float64)), rtol=1e-5)
    assert w[1] < w[0] and w[3] > w[2]  # PAPER.md 1.2 misassignment, 1.3 domination


def test_real_gradient_weight_is_the_closed_form_and_bounded():
    b, s = _fig1_batch()
    w, _ = _weights("real", b, 4, tau=TAU)
    np.testing.assert_allclose(w, np.abs(real_closed_form(s, b["rewards"], 4)), rtol=1e-5)  # one group: S = L
    assert w[1] > w[0] and w[3] > w[2] and w.max() < 1 / TAU  # the hard positive gets more, all below 1/tau
    big = testing.random_grouped_batch(4, num_groups=6, group_size=8, score_scale=3.0)
    w, _ = _weights("real", big, 8, tau=TAU)
    assert 0 < w.max() < 1 / TAU
    np.testing.assert_allclose(w, np.abs(real_closed_form(np_scores(big), big["rewards"], 8)) * 6, rtol=1e-4, atol=1e-7)


def test_grad_weight_metrics_by_label_and_confidence_tercile():
    rng = np.random.default_rng(0)
    w, conf = rng.uniform(0, 2, 12).astype(np.float32), rng.normal(size=12).astype(np.float32)
    pos = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0], np.float32)
    neg = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0], np.float32)  # rows 9 and 11 carry no signal
    m = grad_weight_metrics(RowGrads(*(jnp.asarray(x).reshape(2, 6) for x in (w, conf, pos, neg))))
    signal = np.flatnonzero(pos + neg)
    tercile = np.empty(12, int)
    tercile[signal[np.argsort(conf[signal])]] = np.arange(len(signal)) * 3 // len(signal)
    for name, lab in (("pos", pos), ("neg", neg)):
        np.testing.assert_allclose(float(m[f"grad_weight/{name}_mean"].value), w[lab > 0].mean(), rtol=1e-6)
        assert float(m[f"grad_weight/{name}_max"].value) == w[lab > 0].max()
        for t in range(3):
            sel = (lab > 0) & (tercile == t)
            want = w[sel].mean() if sel.any() else 0.0
            np.testing.assert_allclose(float(m[f"grad_weight/{name}_t{t + 1}"].value), want, rtol=1e-6)
    assert float((Max(jnp.float32(1.0)) + Max(jnp.float32(3.0))).value) == 3.0


def test_gradient_weights_of_degenerate_groups_are_left_out():
    b = testing.random_grouped_batch(1, num_groups=4, group_size=4)  # groups 0 and 1 degenerate
    _, rows = _weights("grpo", b, 4)
    assert not np.any(np.asarray(rows.pos_B + rows.neg_B)[:8])
