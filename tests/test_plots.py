"""The paper's Fig. 1 from autodiff of the library's losses: the values the paper's analysis predicts."""

import numpy as np

from realjax import plots


def test_gradient_weights_follow_the_paper():
    s = np.array([-3.0, -1.0, 0.0, 0.1, 0.3, 1.0, 3.0])
    w = plots.gradient_weights(s)
    # REAL on-policy point with 4 of 8 positive: (1/tau) / (1 + 4) = 0.4 on both sides.
    np.testing.assert_allclose(w["real_pos"][2], 0.4, rtol=1e-5)
    np.testing.assert_allclose(w["real_neg"][2], 0.4, rtol=1e-5)
    assert np.all(np.diff(w["real_pos"]) < 0) and np.all(np.diff(w["real_neg"]) > 0)
    assert w["real_pos"].max() < 2.0 and w["real_neg"].max() < 2.0
    # GRPO positives: |A| e^s below the clip edge log(1.2) = 0.18, zero above; negatives grow unbounded.
    a = 0.9354134  # (1 - 0.5) / (unbiased std of four 1s and four 0s + 1e-6)
    np.testing.assert_allclose(w["grpo_pos"][:4], a * np.exp(s[:4]), rtol=1e-5)
    assert np.all(w["grpo_pos"][4:] == 0)
    assert w["grpo_neg"][0] == 0 and w["grpo_neg"][-1] > 10


def test_gradient_weight_figure_renders(tmp_path):
    out = plots.plot_gradient_weights(tmp_path / "gw.png", points=61)
    assert out.stat().st_size > 10_000


def test_run_plot_has_the_gradient_weight_panels(tmp_path):
    import json

    rows = [{"step": i, "loss": 1.0, "reward/mean": 0.5, **{f"grad_weight/{side}_{k}": 0.1 * i + (side == "neg")
                                                           for side in ("pos", "neg")
                                                           for k in ("mean", "max", "t1", "t2", "t3")}}
            for i in range(1, 13)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    x, y = plots.series(rows, "grad_weight/neg_t3")
    np.testing.assert_allclose(y, 0.1 * x + 1.0)
    out = plots.plot_run(tmp_path)
    assert out.stat().st_size > 10_000
