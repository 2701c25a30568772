"""Evaluation: the Pass@k estimator against enumeration, maj@k on hand-built votes and against a second
implementation, aggregation against a recomputation from the samples, and `realjax eval` end to end on a
tiny random model over the paper's AIME file."""

import collections
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from _tiny import make_hf_model

from realjax import cli, data
from realjax.evaluate import evaluate, format_table, maj_at_k, majority_vote, metrics_row, pass_at_k
from realjax.rewards import answer_key
from realjax.sampling import Sampler, SamplingConfig, sample_ids

REPO = Path(__file__).resolve().parents[1]
PAPER_DATA = Path(os.environ.get("REALJAX_PAPER_DATA", REPO / ".." / "shared" / "data" / "paper"))
needs_paper_data = pytest.mark.skipif(
    not (PAPER_DATA / "aime.parquet").is_file(),
    reason=f"paper data not found at {PAPER_DATA} (set REALJAX_PAPER_DATA)")


# ----------------------------------------------------------------------------------------------------
# pass@k
# ----------------------------------------------------------------------------------------------------
def _brute_pass_at_k(n, c, k):
    """The fraction of k-subsets of n samples (c correct) that hold at least one correct sample."""
    labels = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(labels, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (4, 1, 2), (5, 2, 3), (8, 3, 1), (8, 3, 4),
                                   (10, 1, 5), (12, 0, 6), (12, 12, 6), (6, 5, 6), (6, 0, 6), (16, 7, 16)])
def test_pass_at_k_equals_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 1, 16) == 1.0  # k = n: any correct sample is drawn
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)  # k = 1 is the fraction correct
    assert 0.0 <= pass_at_k(10_000, 3, 5000) <= 1.0  # no overflow for large n
    for bad in [(4, 1, 0), (4, 1, 5), (4, 5, 1), (0, 0, 1), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# ----------------------------------------------------------------------------------------------------
# maj@k
# ----------------------------------------------------------------------------------------------------
def _reference_maj_at_k(keys, scores, k):
    """maj@k written another way: per block, rank the answers by (-count, first position)."""
    values = []
    for start in range(0, len(keys) - k + 1, k):
        block = keys[start:start + k]
        counts = collections.Counter(key for key in block if key is not None)
        if not counts:
            values.append(0.0)
            continue
        winner = min(counts, key=lambda key: (-counts[key], block.index(key)))
        values.append(float(scores[start + block.index(winner)]))
    return sum(values) / len(values)


@pytest.mark.parametrize("keys,expected", [
    (["a", "b", "b", "a"], 0),  # a 2-2 tie: the answer seen first wins
    (["b", "a", "a", "b"], 0),
    (["c", "a", "b", "b", "a"], 1),  # a and b tie above c: a was seen first (at 1, before b at 2)
    ([None, "b", "a", "a"], 2),  # a majority; its first occurrence carries it
    ([None, None, "x"], 2),  # unanswered samples abstain, they do not win as "no answer"
    (["b", None, "a"], 0),
    ([None, None, None], None),  # nobody answered: no vote
    ([], None),
])
def test_majority_vote(keys, expected):
    assert majority_vote(keys) == expected


def test_maj_at_k_hand_built():
    # Equivalent spellings vote together: 1/2 three times against 1/3 twice; the vote is 1/2.
    texts = [r"\boxed{1/3}", r"\boxed{0.5}", r"\boxed{\frac{1}{2}}", r"\boxed{\frac13}", r"\boxed{\dfrac12}"]
    keys = [answer_key(t) for t in texts]
    assert keys == ["1/3", "1/2", "1/2", "1/3", "1/2"]
    assert maj_at_k(keys, [0, 1, 1, 0, 1], 5) == 1.0  # ground truth 1/2
    assert maj_at_k(keys, [1, 0, 0, 1, 0], 5) == 0.0  # ground truth 1/3: the majority was wrong
    # Blocks of k: [1/3, 1/2] ties -> 1/3 (first); [1/2, 1/3] -> 1/2; the fifth sample sits out.
    assert maj_at_k(keys, [0, 1, 1, 0, 1], 2) == 0.5
    # The voted answer is scored by the sample that carries it: its first occurrence in the block.
    assert maj_at_k(["a", "a"], [0.0, 1.0], 2) == 0.0
    # All samples unanswered: every block scores 0, whatever the scores say.
    assert maj_at_k([None] * 4, [0, 0, 0, 0], 2) == 0.0
    assert maj_at_k([None, None, "5", None], [0, 0, 1, 0], 4) == 1.0  # one answer among abstentions wins
    # k = 1 is pass@1 when unanswered samples score 0.
    assert maj_at_k(["a", None, "b", "a"], [1, 0, 0, 1], 1) == 0.5
    for bad in [0, 5]:
        with pytest.raises(ValueError, match="1 <= k <= n"):
            maj_at_k(["a"] * 4, [0] * 4, bad)
    with pytest.raises(ValueError, match="4 scores"):
        maj_at_k(["a"] * 4, [0] * 3, 2)


def test_maj_at_k_matches_the_reference():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 13))
        keys = [None if x == 0 else "abc"[x - 1] for x in rng.integers(0, 4, n)]
        right = rng.choice(["a", "b", "c"])
        scores = [float(key == right) for key in keys]
        k = int(rng.integers(1, n + 1))
        assert maj_at_k(keys, scores, k) == pytest.approx(_reference_maj_at_k(keys, scores, k), abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen2")
    make_hf_model("qwen2", d, seed=5)
    return d


@pytest.fixture(scope="module")
def policy(model_dir):
    from realjax.models import from_pretrained, load_tokenizer, stop_token_ids

    tok = load_tokenizer(model_dir)
    return from_pretrained(model_dir), tok, stop_token_ids(model_dir, tok)


def _rendered(tok, count, offset):
    rows = [{"messages": [{"role": "user", "content": f"What is {i}+1?"}], "ground_truth": str(i + 1)}
            for i in range(offset, offset + count)]
    return data.render_prompts(rows, tok, max_prompt_tokens=64)[0]


def _hash_rule(text):
    """A deterministic 'verifier' that marks about a third of the completions correct."""
    return 1.0 if sum(map(ord, text)) % 3 == 0 else 0.0


def test_evaluate_aggregates_per_problem_counts(policy):
    model, tok, stops = policy
    datasets = {"a": _rendered(tok, 5, 0), "b": _rendered(tok, 3, 10)}
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, stop_ids=stops)
    calls = []

    def verifier(completions, ground_truths):
        calls.append((list(completions), list(ground_truths)))
        return [_hash_rule(t) for t in completions]

    def vote(text):  # a deterministic 'answer': few distinct values, so votes tie and win
        return None if len(text) % 4 == 0 else str(len(text) % 3)

    n, seed = 4, 7
    result = evaluate(model, tok, datasets, sampling=cfg, n=n, seed=seed, prompts_per_batch=4,
                      verifier=verifier, ks=(2, 4), answer_key=vote)
    assert result["settings"] == dict(n=4, ks=[1, 2, 4], temperature=1.0, top_p=1.0, top_k=0,
                                      max_new_tokens=6, seed=7)
    assert len(calls) == 2  # one verifier call per dataset, flat and problem-major
    sampler = Sampler(cfg, pad_id=tok.pad_token_id)
    for (name, rows), (texts, gts) in zip(datasets.items(), calls):
        assert gts == [r["ground_truth"] for r in rows for _ in range(n)]
        # The same seed gives the same samples: recompute every metric from them.
        samples = sample_ids(model, sampler, [r["prompt_ids"] for r in rows], n=n, seed=seed, prompts_per_batch=4)
        assert texts == [tok.decode(s["token_ids"], skip_special_tokens=True) for per in samples for s in per]
        correct = [int(sum(_hash_rule(tok.decode(s["token_ids"], skip_special_tokens=True)) for s in per))
                   for per in samples]
        got = result["datasets"][name]
        assert result["per_problem"][name]["correct"] == correct
        assert got["problems"] == len(rows) and got["samples"] == len(rows) * n
        assert got["pass@1"] == pytest.approx(np.mean(correct) / n)
        texts_PR = [[tok.decode(s["token_ids"], skip_special_tokens=True) for s in per] for per in samples]
        for k in (2, 4):
            assert got[f"pass@{k}"] == pytest.approx(np.mean([_brute_pass_at_k(n, c, k) for c in correct]))
            maj = [_reference_maj_at_k([vote(t) for t in texts], [_hash_rule(t) for t in texts], k)
                   for texts in texts_PR]
            assert result["per_problem"][name][f"maj@{k}"] == pytest.approx(maj)
            assert got[f"maj@{k}"] == pytest.approx(np.mean(maj))
        assert "maj@1" not in got  # it would be pass@1
        assert got["response_length"] == pytest.approx(np.mean([len(s["token_ids"]) for p in samples for s in p]))
        assert got["truncated"] == pytest.approx(np.mean([not s["finished"] for p in samples for s in p]))
    avg = result["average"]
    for key in ("pass@1", "pass@2", "pass@4", "maj@2", "maj@4", "response_length", "truncated"):
        assert avg[key] == pytest.approx((result["datasets"]["a"][key] + result["datasets"]["b"][key]) / 2)
    assert avg["problems"] == 8 and avg["samples"] == 32
    assert metrics_row(result)["eval/b/pass@1"] == result["datasets"]["b"]["pass@1"]
    assert metrics_row(result)["eval/avg/pass@4"] == avg["pass@4"]
    table = format_table(result)
    assert all(word in table for word in ("pass@1", "pass@4", "maj@2", "maj@4", "Avg.", " a ", " b "))
    assert "maj@1" not in table and f"{avg['maj@4']:.3f}" in table
    assert f"{avg['pass@1']:.3f}" in table


def test_evaluate_rejects_bad_inputs(policy):
    model, tok, stops = policy
    datasets = {"a": _rendered(tok, 2, 0)}
    cfg = SamplingConfig(max_new_tokens=2, stop_ids=stops)

    def no_key(text):
        raise AssertionError("pass@1 alone (the trainer's evaluation) must not extract answers")

    result = evaluate(model, tok, datasets, sampling=cfg, n=2, verifier=lambda c, g: [0.0] * len(c), answer_key=no_key)
    assert not any(key.startswith("maj@") for key in result["datasets"]["a"])
    assert result["per_problem"]["a"] == {"correct": [0, 0]}
    with pytest.raises(ValueError, match="1 <= k <= n"):
        evaluate(model, tok, datasets, sampling=cfg, n=2, ks=(4,), verifier=lambda c, g: [0.0] * len(c))
    with pytest.raises(ValueError, match="0.0 or 1.0"):
        evaluate(model, tok, datasets, sampling=cfg, n=2, verifier=lambda c, g: [0.5] * len(c))
    with pytest.raises(ValueError, match="non-empty"):
        evaluate(model, tok, {"a": []}, sampling=cfg, n=2)


# ----------------------------------------------------------------------------------------------------
# `realjax eval`
# ----------------------------------------------------------------------------------------------------
@needs_paper_data
def test_cli_eval_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = cli.main(["eval", "--model", str(model_dir), "--data", str(PAPER_DATA / "aime.parquet"), "--n", "2",
                   "--max-new-tokens", "8", "--limit", "3", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "aime" in printed.out and "pass@1" in printed.out and "pass@2" in printed.out and "maj@2" in printed.out
    assert "kept 30/30" in printed.err  # the DataReport summary
    result = json.loads(out.read_text())
    aime = result["datasets"]["aime"]
    assert 0.0 <= aime["pass@1"] <= aime["pass@2"] <= 1.0
    assert aime["problems"] == 3 and aime["samples"] == 6
    assert len(result["per_problem"]["aime"]["correct"]) == 3 and len(result["per_problem"]["aime"]["maj@2"]) == 3
    assert 0.0 <= aime["maj@2"] <= aime["pass@2"]  # a vote is right only if some sample is
    assert result["counts"]["aime"] == dict(source=str(PAPER_DATA / "aime.parquet"), total=30, kept=30,
                                            too_long=0, malformed={}, evaluated=3)
    assert result["settings"]["ks"] == [1, 2] and result["settings"]["temperature"] == 0.6
    assert result["settings"]["top_p"] == 0.95 and result["settings"]["max_prompt_tokens"] == 1536
    assert result["wall_time_s"] > 0 and result["average"]["pass@1"] == aime["pass@1"]


def test_cli_eval_errors_are_one_line(model_dir, tmp_path, capsys):
    cases = [
        (["--model", str(model_dir), "--data", str(tmp_path / "missing.parquet")], "missing.parquet"),
        (["--model", str(tmp_path / "no_model"), "--data", "x.parquet"], "does not exist"),
        (["--model", str(model_dir), "--data", "x.parquet", "--n", "2", "--k", "3"], "1 <= k <= n"),
        (["--model", str(model_dir), "--data", "x.parquet", "--output", str(tmp_path / "no" / "o.json")],
         "directory does not exist"),
    ]
    for argv, message in cases:
        assert cli.main(["eval", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("realjax eval: error:") and message in err and "\n" not in err, err
