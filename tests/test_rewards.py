"""realjax.rewards: answer extraction, equivalence, the verifier pool under hostile input, the synthetic
arithmetic tasks and user reward functions."""

from __future__ import annotations

import ast
import operator
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from realjax import rewards
from realjax.models import char_tokenizer as tiny
from realjax.rewards import (
    VerifierPool,
    extract_answer,
    generate_rows,
    ground_truth_answers,
    load_reward_fn,
    score_math,
)
from realjax.rewards import equivalence


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2, timeout_s=5.0) as p:
        yield p


def boxed(answer: str) -> str:
    """A completion whose think block holds a decoy box and whose final answer is ``answer``."""
    return f"<think>scratch work \\boxed{{999}}</think> The answer is $\\boxed{{{answer}}}$."


# ------------------------------------------------------------------------------------------ extraction

EXTRACT_CASES = [
    # (text, require_think, expected)
    (r"\boxed{5}", False, "5"),
    (r"so \boxed{ 5 } ", False, "5"),
    (r"\boxed{1} then \boxed{2}", False, "2"),  # last box wins
    (r"\boxed{\frac{1}{2}}", False, r"\frac{1}{2}"),
    (r"\boxed{\{1,2\}}", False, r"\{1,2\}"),  # escaped braces are not structure
    (r"\fbox{7}", False, None),  # the official extract_answer never accepts \fbox
    (r"\boxed{1} \fbox{8}", False, "1"),  # ... nor lets it compete with \boxed
    (r"the answer is \boxed 5.", False, "5"),
    (r"$\boxed 42$", False, "42"),
    (r"<think>\boxed{1}</think> then \boxed{2}", False, "2"),
    (r"<think>\boxed{1}</think> no box after thinking", False, None),  # the think block is ignored
    (r"<think>\boxed{1} never closed", False, "1"),
    (r"<think>\boxed{1} never closed", True, None),
    (r"\boxed{5}", True, None),  # require_think: no </think>, no answer
    (r"<think>a</think>\boxed{3}", True, "3"),
    (r"x</think>\boxed{3}</think>\boxed{4}", False, "3"),  # official split("</think>")[1]
    (r"\boxed{12", False, None),  # unclosed last box
    (r"\boxed{3} and \boxed{12", False, None),
    (r"\boxed{}", False, None),
    (r"\boxedx", False, None),
    ("no box at all", False, None),
    (None, False, None),
]


@pytest.mark.parametrize("text,require_think,expected", EXTRACT_CASES)
def test_extract_answer(text, require_think, expected):
    assert extract_answer(text, require_think=require_think) == expected


def test_extract_answer_window_and_cap():
    far = r"\boxed{1}" + "x" * 10_000
    assert extract_answer(far) is None  # the box lies outside the last max_chars characters
    assert extract_answer(far, max_chars=None) == "1"
    long_answer = r"\boxed{" + "1" * 2000 + "}"
    assert extract_answer(long_answer) is None
    assert extract_answer(long_answer, max_answer_chars=None) == "1" * 2000


@pytest.mark.parametrize(
    "gt,expected",
    [
        ("142", ("142",)),
        (142.0, ("142",)),
        (142, ("142",)),
        (0.25, ("0.25",)),
        (np.float64(3.0), ("3",)),
        (np.int64(5), ("5",)),
        (np.array([1.5, 2.0]), ("1.5", "2")),
        (["$\\frac{1}{2 n+2}$"], ("\\frac{1}{2 n+2}",)),
        (("a", None, "", " "), ("a",)),
        ("The answer: \\boxed{\\frac{3}{4}}", ("\\frac{3}{4}",)),
        ([["1", "2"], "3"], ("1", "2", "3")),
    ],
)
def test_ground_truth_answers(gt, expected):
    assert ground_truth_answers(gt) == expected


# ------------------------------------------------------------------------------------------ equivalence

EQUIV_CASES = [
    # (boxed answer, ground truth, expected score)
    (r"\frac{1}{2}", "0.5", 1.0),
    ("0.5", r"\frac{1}{2}", 1.0),
    (r"\dfrac{1}{2}", r"\frac12", 1.0),
    (r"\tfrac{3}{4}", "0.75", 1.0),
    ("1/2", r"\frac{1}{2}", 1.0),
    (r"\frac{1}{3}", "0.33", 0.0),
    (r"2\sqrt{2}", r"\sqrt{8}", 1.0),
    (r"3\sqrt{2}", r"\sqrt{8}", 0.0),
    ("(1,2)", "(1, 2)", 1.0),
    ("(1,2)", "(2,1)", 0.0),
    ("[0,1)", "[0,1]", 0.0),
    ("[0, 1)", "[0,1)", 1.0),
    (r"\{1,2\}", r"\{2,1\}", 1.0),
    ("142", 142.0, 1.0),
    ("142.0", "142", 1.0),
    ("142", 143, 0.0),
    ("-6", -6, 1.0),
    ("007", "7", 1.0),
    (r"3\pi", r"\pi \cdot 3", 1.0),
    ("x=5", "5", 1.0),
    (r"\frac{1}{2(n+1)}", [r"$\frac{1}{2 n+2}$"], 1.0),  # Minerva-style list ground truth
    ("3", ["1", "3"], 1.0),
    ("4", ("1", "3"), 0.0),
    ("1/2", np.array(["2", "0.5"]), 1.0),
    ("2", "3", 0.0),
    ("a", "b", 0.0),
    (r"\text{(A)}", "A", 1.0),
    ("5", r"\boxed{5}", 1.0),  # ground truths holding a box are extracted first
    # Base subscripts (MATH500 writes six answers in a base): the base must match, a bare number never does.
    ("52_8", "52_8", 1.0),
    ("52_{8}", "52_8", 1.0),
    ("052_{(8)}", "52_8", 1.0),
    (r"\text{52}_{8}", "52_8", 1.0),
    ("52_{9}", "52_8", 0.0),  # math-verify drops the subscript: it said 1.0
    ("52", "52_8", 0.0),  # the digits without their base: math-verify said 1.0
    ("42", "52_8", 0.0),  # the value in base 10 answers another question (the official reward agrees)
    ("528", "52_8", 0.0),  # the official reward reads 52_8 as the Python literal 528; not copied
    ("4210_5", "4210_{5}", 1.0),
    ("4210_{5}", "4211_{5}", 0.0),
    ("59_8", "52_8", 0.0),  # 9 is no base-8 digit
    ("42_{10}", "42", 1.0),  # base 10 is the bare number
    ("42", ["52_8", "42"], 1.0),  # any element of a list ground truth
    ("x_1", "x_{1}", 1.0),  # a subscripted variable is no numeral: math-verify decides
    ("n=52_8", "52_8", 1.0),  # the short "n =" that plain answers may carry too
    # Small magnitudes compare relatively (math-verify's absolute tolerance said 1.0 to the 0.0 rows).
    (r"1.6 \times 10^{-18}", r"8.224 \times 10^{-19}", 0.0),
    (r"8.2 \times 10^{-19}", [r"8.224 \times 10^{-19}", "8.224 \\times 10^{-19}\n"], 0.0),
    (r"8.224 \cdot 10^{-19}", r"8.224 \times 10^{-19}", 1.0),
    (r"0.8224 \times 10^{-18}", r"8.224 \times 10^{-19}", 1.0),
    (r"8.22400 \times 10^{-19}", [r"8.224 \times 10^{-19}"], 1.0),
    (r"2.78 \times 10^{-6}", r"2.7778 \times 10^{-6}", 0.0),
    (r"10^{-3}", r"1 \times 10^{-3}", 1.0),
    ("0.0000001", "0.0000002", 0.0),
    ("0.0000001", r"10^{-7}", 1.0),
    ("0", r"10^{-20}", 0.0),
    # ... and nothing changes where math-verify's own rule is the tighter one.
    ("0.333333", r"\frac{1}{3}", 1.0),
    (r"\sqrt{2}", "1.414214", 1.0),
    (r"50\%", "50", 1.0),
    ("0.5", r"50\%", 1.0),
]


@pytest.fixture(scope="module")
def equiv_scores(pool):
    """The whole table in one call: it is also the mixed fast / worker ordering test."""
    return pool.score([boxed(a) for a, _, _ in EQUIV_CASES], [g for _, g, _ in EQUIV_CASES])


@pytest.mark.parametrize("i", range(len(EQUIV_CASES)), ids=[f"{a}~{g}" for a, g, _ in EQUIV_CASES])
def test_equivalence_table(equiv_scores, i):
    assert equiv_scores[i] == EQUIV_CASES[i][2]


def test_fast_path_decides_integers_in_the_parent():
    with VerifierPool(num_workers=1) as p:  # no worker may start for these
        assert p.score([boxed("12"), boxed("13"), "no box", boxed("1.0")], ["12", 12, "1", 1]) == [1, 0, 0, 1]
        assert p.stats["fast_path"] == 4 and p.stats["worker_items"] == 0 and p.stats["no_answer"] == 1
        assert p._workers == []


def test_fast_equal():
    assert equivalence.fast_equal(" 1 2 ", "12") is True
    assert equivalence.fast_equal("-0", "0") is True
    assert equivalence.fast_equal("1" * 5000, "1" * 5000 + "0") is False  # beyond int()'s digit limit
    assert equivalence.fast_equal("0.50", ".5") is True
    assert equivalence.fast_equal("0.333333", "0.3333333") is None  # math-verify's rounding decides
    assert equivalence.fast_equal(r"\frac{1}{2}", "0.5") is None
    # Based numerals are decided in the parent, both ways.
    assert equivalence.fast_equal("52_{8}", "52_8") is True
    assert equivalence.fast_equal("52", "52_8") is False and equivalence.fast_equal("52_8", "52") is False
    assert equivalence.fast_equal("4A_{16}", "74") is False and equivalence.fast_equal("4A_{16}", "74_{10}") is False
    assert equivalence.fast_equal("42_{10}", r"\frac{84}{2}") is None  # base 10 against a non-integer: math-verify


@pytest.mark.parametrize(
    "answer,expected",
    [("52_8", (42, 8)), ("52_{8}", (42, 8)), ("52_{(8)}", (42, 8)), ("(52)_8", (42, 8)), ("-52_8", (-42, 8)),
     (r"\text{4A}_{\text{16}}", (74, 16)), ("10001_2", (17, 2)), ("42_{10}", (42, 10)), ("52 _ { 8 }", (42, 8)),
     ("59_8", None), ("52_1", None), ("52_{37}", None), ("x_1", None), ("a_{12}", None), ("52", None),
     ("52_8+1", None), ("1" * 2000 + "_2", None), ("N = 52_8", (42, 8)), ("abc=52_8", None)],
)
def test_based_numeral(answer, expected):
    assert equivalence.based_numeral(answer) == expected


def test_small_magnitudes_in_process():
    # The same rule without the pool, where a failure points at equivalence.py directly.
    gold = [r"8.224 \times 10^{-19}"]
    assert equivalence.verify_equivalent(r"8.224 \times 10^{-19}", gold)
    assert not equivalence.verify_equivalent(r"1.6 \times 10^{-18}", gold)
    assert not equivalence.verify_equivalent(r"8.23 \times 10^{-19}", gold)
    assert equivalence.verify_equivalent(r"8.22401 \times 10^{-19}", gold)  # within REL_TOL (1.2e-6)


# ------------------------------------------------------------------------------------------ vote keys

VOTE_GROUPS = [
    # Each inner list votes together; no two lists share a key.
    ["0.5", "1/2", r"\frac{1}{2}", r"\dfrac12", r"\tfrac{1}{2}", " 1 / 2 ", "$0.50$"],
    ["7", "007", "7.0", "+7", r"7_{10}"],
    ["-3/4", r"-\frac{3}{4}", "-0.75"],
    ["52_8", "52_{8}", "052_{(8)}", r"\text{52}_8"],
    ["42"],  # 52_8's value, in another base: another answer
    ["52_{9}"],
    [r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", r"\left(3,\,\dfrac{\pi}{2}\right)"],
    [r"2\sqrt{2}"],  # equal in value to \sqrt{8}, but only rationals are grouped by value
    [r"\sqrt{8}"],
    [r"\leftarrow"],  # \left is dropped only as a whole command
    ["1/0"],
]


def test_vote_keys_group_equal_spellings():
    keys = [{rewards.vote_key(a) for a in group} for group in VOTE_GROUPS]
    assert all(len(k) == 1 and None not in k for k in keys), keys
    assert len(set.union(*keys)) == len(VOTE_GROUPS)


def test_vote_key_abstains_and_extracts_like_the_verifier():
    assert rewards.vote_key(None) is None and rewards.vote_key("  $ $ ") is None
    assert rewards.answer_key(boxed(r"\frac{1}{2}")) == rewards.answer_key(r"so \boxed{0.5}") == "1/2"
    assert rewards.answer_key("no box") is None and rewards.answer_key(r"\fbox{3}") is None
    assert rewards.answer_key(r"\boxed{3}") == "3" and rewards.answer_key(r"\boxed{3}", require_think=True) is None
    long = "1" * 2000
    assert rewards.vote_key(long) == long  # too long to read as a number: voted by spelling


def test_think_and_require_think(pool):
    completions = [r"<think>\boxed{5}</think> so four", r"\boxed{5}", r"<think>hm</think>\boxed{5}"]
    assert pool.score(completions, ["5"] * 3) == [0.0, 1.0, 1.0]
    assert pool.score(completions, ["5"] * 3, require_think=True) == [0.0, 0.0, 1.0]
    assert score_math(completions, ["5"] * 3, require_think=True, pool=pool) == [0.0, 0.0, 1.0]


def test_last_box_wins_and_missing_box(pool):
    text = r"first \boxed{4}, on reflection \boxed{\frac{10}{2}}"
    assert pool.score([text, text, "I give up", ""], ["5", "4", "5", "5"]) == [1.0, 0.0, 0.0, 0.0]


def test_lengths_must_match(pool):
    with pytest.raises(ValueError, match="2 completions but 1 ground truths"):
        pool.score(["a", "b"], ["1"])


def test_default_pool():
    assert score_math([boxed("7"), boxed("8")], ["7", 7]) == [1.0, 0.0]
    assert score_math([boxed(r"\frac{14}{2}")], ["7"]) == [1.0]  # starts a worker of the default pool
    assert rewards.default_pool() is rewards.pool._default_pool


def test_package_import_stays_light():
    # Workers import realjax.rewards; JAX or sympy at import time would cost every worker seconds.
    code = "import sys, realjax.rewards; assert not {'jax', 'sympy', 'math_verify'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------------------ paper eval sets

PAPER_DATA = Path(os.environ.get("REALJAX_PAPER_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "paper"))
EVAL_SETS = ("aime", "aime25", "amc", "math", "minerva", "olympiad_bench")


def _rewrites(gt: str):
    """(answer, expected score) built from one ground-truth string: the answer itself and spellings of it
    that must pass; near misses of base-b and small scientific-notation answers that must not."""
    s = gt.strip().strip("$").strip()
    yield s, 1.0
    if m := re.fullmatch(r"([\d.]+) *\\times *10\^\{(-?\d+)\}", s):
        mantissa, exponent = m.groups()
        yield rf"{mantissa} \cdot 10^{{{exponent}}}", 1.0
        yield rf"{mantissa} \times 10^{{{int(exponent) + 1}}}", 0.0
        yield rf"{float(mantissa) * 2:g} \times 10^{{{exponent}}}", 0.0
    if m := re.fullmatch(r"([0-9A-Z]+)_\{?(\d+)\}?", s):
        digits, base = m.groups()
        yield rf"{digits}_{{({base})}}", 1.0
        yield digits, 0.0
        yield rf"{digits}_{{{int(base) + 1}}}", 0.0
        yield str(int(digits, int(base))), 0.0
    if m := re.fullmatch(r"\\frac\{(\d+)\}\{(\d+)\}", s):
        yield f"{m[1]}/{m[2]}", 1.0
        yield rf"\dfrac{{{m[1]}}}{{{m[2]}}}", 1.0


@pytest.mark.slow
@pytest.mark.skipif(not (PAPER_DATA / "math.parquet").is_file(), reason=f"no paper data at {PAPER_DATA}")
def test_paper_ground_truths_pass_and_their_near_misses_fail(pool):
    """Every eval-set ground truth passes as its own answer and in other spellings, so a verifier change
    rejects no right answer of the paper's benchmarks; the base and small-magnitude near misses fail."""
    from realjax import data

    cases = []
    for name in EVAL_SETS:
        for row in data.load_rows(str(PAPER_DATA / f"{name}.parquet"))[0]:
            gt = row["ground_truth"]
            for element in ground_truth_answers(gt):
                cases += [(name, answer, gt, expected) for answer, expected in _rewrites(element)]
    scores = pool.score([boxed(answer) for _, answer, _, _ in cases], [gt for _, _, gt, _ in cases])
    wrong = [(name, answer, gt, expected) for (name, answer, gt, expected), score in zip(cases, scores)
             if score != expected]
    assert len(cases) > 1900 and not wrong, wrong[:20]


# ------------------------------------------------------------------------------------------ adversarial

TOWER = r"9^{9^{9^{9^{9}}}}"


def test_tower_of_exponents_is_bounded(pool):
    start = time.monotonic()
    scores = pool.score([boxed(TOWER), boxed(r"2^{2^{2^{2^{2^{2^{2}}}}}}"), boxed(r"\frac{2}{4}")], ["5", "7", "0.5"])
    assert scores == [0.0, 0.0, 1.0]
    assert time.monotonic() - start < 30
    assert pool.score([boxed(TOWER)], [TOWER]) == [1.0]  # identical strings: fast path, sympy never runs


def test_stuck_worker_is_killed_and_replaced():
    # timeout_s below math-verify's 1 s alarm: the parent's deadline has to kill the worker.
    with VerifierPool(num_workers=1, timeout_s=0.5) as p:
        start = time.monotonic()
        assert p.score([boxed(TOWER), boxed(r"\frac{1}{2}"), boxed(TOWER)], ["5", "0.5", "5"]) == [0.0, 1.0, 0.0]
        assert time.monotonic() - start < 30
        stats = p.stats
        assert stats["timeouts"] == 2 and stats["restarts"] == 2 and stats["worker_items"] == 3
        assert p.score([boxed(r"\sqrt{8}")], [r"2\sqrt{2}"]) == [1.0]  # the pool still works


def test_dead_workers_are_replaced_and_closed_pool_refuses():
    with VerifierPool(num_workers=1, timeout_s=10.0) as p:
        assert p.score([boxed(r"\frac{1}{2}")], ["0.5"]) == [1.0]
        p._workers[0].proc.kill()  # dies while idle: the next chunk finds a broken pipe
        p._workers[0].proc.wait()
        assert p.score([boxed(r"\frac{3}{2}")], ["1.5"]) == [1.0]
        # Dies while grading (from another thread, as a crash would): that item is an error.
        threading.Timer(0.5, lambda: p._workers[0].proc.kill()).start()
        assert p.score([boxed(TOWER), boxed(r"\sqrt{4}")], ["5", "2"]) == [0.0, 1.0]
        assert p.stats["errors"] == 1 and p.stats["restarts"] == 2
    with pytest.raises(RuntimeError, match="closed"):
        p.score([boxed("1")], ["1"])


def test_pool_works_from_a_thread(pool):
    # Trainers may score in a background thread; math-verify's alarms only ever run in worker main threads.
    out = {}
    thread = threading.Thread(target=lambda: out.update(s=pool.score([boxed(r"\frac{4}{8}")], ["0.5"])))
    thread.start()
    thread.join(timeout=30)
    assert out["s"] == [1.0]


def test_deeply_nested_braces():
    n = 100_000
    nested = r"\boxed{" + "{" * n + "1" + "}" * n + "}"
    start = time.monotonic()
    assert extract_answer(nested) is None  # no box in the last max_chars characters
    content = extract_answer(nested, max_chars=None, max_answer_chars=None)  # iterative: no RecursionError
    assert content == "{" * n + "1" + "}" * n
    assert time.monotonic() - start < 5


def test_hostile_inputs_through_the_pool(pool, tmp_path):
    marker = tmp_path / "pwned"
    code = [f"__import__('os').system('touch {marker}')", f"exec(\"open('{marker}','w')\")",
            f"eval(\"__import__('os').system('touch {marker}')\")", "().__class__.__bases__[0].__subclasses__()",
            f"\\text{{__import__('os').system('touch {marker}')}}"]
    n = 10_000
    completions = [boxed(c) for c in code] + [
        r"\boxed{" + "{" * 400 + "1" + "}" * 400 + "}",  # nested, but under the answer cap
        r"\boxed{" * n + "1" + "}" * n,
        "x" * 3_000_000 + r"\boxed{7}",  # megabyte strings
        "</think>" + "{" * 2_000_000,
        r"\boxed{" + "9" * 3_000_000 + "}",
        r"\boxed{" * 300_000,
    ]
    truths = ["0"] * len(code) + ["1", "1", "7", "1", "9", "1"]
    start = time.monotonic()
    scores = pool.score(completions, truths)
    assert time.monotonic() - start < 30
    assert scores == [0.0] * (len(code) + 2) + [1.0, 0.0, 0.0, 0.0]
    assert not marker.exists()
    assert pool.score([boxed(r"\frac{6}{4}")], ["1.5"]) == [1.0]  # and the pool still grades correctly


def test_model_text_never_reaches_sympy_eval(monkeypatch):
    """sympy's string parser ends in ``eval_expr``; only lexed number tokens and sympy's own symbols may
    reach it, never the text of an answer."""
    import sympy.parsing.sympy_parser as sympy_parser

    evaluated = []
    real_eval_expr = sympy_parser.eval_expr
    monkeypatch.setattr(sympy_parser, "eval_expr", lambda code, *a: evaluated.append(code) or real_eval_expr(code, *a))
    equivalence._parse.cache_clear()
    hostile = ["__import__('os').system('echo hi')", "exec('import os')", "lambda: 1", "1+2*3",
               "().__class__.__bases__[0]", r"\operatorname{exec}(1)", "x**2", r"\text{open('f')}"]
    for h in hostile:
        for gold in ("7", h):
            equivalence.verify_equivalent(h, (gold,))
    equivalence._parse.cache_clear()
    allowed = re.compile(r"(Integer|Float) \('?[0-9.]+'? \)|Symbol \('[A-Za-z]+' \)|E ")
    assert all(allowed.fullmatch(c) for c in evaluated), [c for c in evaluated if not allowed.fullmatch(c)]


# ------------------------------------------------------------------------------------------ synthetic

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _reference_value(expr: str) -> int:
    """Independent evaluator of ``+ - * ( )`` on integers (Python's grammar gives the precedence)."""

    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unexpected node {ast.dump(node)}")

    return ev(ast.parse(expr, mode="eval").body)


def _expression(row: dict) -> str:
    return re.fullmatch(r"Compute (.+)\.", row["messages"][0]["content"]).group(1)


def test_synthetic_is_deterministic_by_seed():
    assert generate_rows(64, seed=3) == generate_rows(64, seed=3)
    assert generate_rows(64, seed=3) != generate_rows(64, seed=4)
    assert generate_rows(0, seed=1) == []


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_synthetic_difficulty(k):
    for row in generate_rows(100, seed=k, min_ops=k, max_ops=k):
        assert row["data_source"] == f"arithmetic/ops{k}"
        assert sum(_expression(row).count(op) for op in "+-*") == k  # operands are non-negative
        steps = re.fullmatch(r"<think>(.*)</think> \\boxed\{(-?\d+)\}", row["solution"]).group(1).split(" ")
        assert len(steps) == k


def test_synthetic_rows_are_correct_and_regular():
    rows = generate_rows(500, seed=0, min_ops=1, max_ops=4)
    assert {r["data_source"] for r in rows} == {f"arithmetic/ops{k}" for k in range(1, 5)}
    assert any("(" in _expression(r) for r in rows)
    assert all(set(r) == {"messages", "ground_truth", "data_source", "solution"} for r in rows)
    allowed = set(tiny.CHARS)
    for row in rows:
        assert int(row["ground_truth"]) == _reference_value(_expression(row))
        steps = re.fullmatch(r"<think>(.*)</think> \\boxed\{(-?\d+)\}", row["solution"])
        assert steps.group(2) == row["ground_truth"]
        for step in steps.group(1).split(" "):
            lhs, rhs = step.rsplit("=", 1)
            assert _reference_value(lhs) == int(rhs), step
        assert set(row["messages"][0]["content"]) <= allowed and set(row["solution"]) <= allowed
    for row in generate_rows(500, seed=1):  # the defaults fit the tiny model's context
        assert len(row["messages"][0]["content"]) <= 40 and len(row["solution"]) <= 80


def test_synthetic_solutions_score_through_score_math(pool):
    rows = generate_rows(200, seed=7, max_ops=4, max_value=20)
    truths = [r["ground_truth"] for r in rows]
    before = pool.stats["worker_items"]
    assert score_math([r["solution"] for r in rows], truths, require_think=True, pool=pool) == [1.0] * 200
    wrong = [f"<think>guess</think> \\boxed{{{int(t) + 1}}}" for t in truths]
    assert score_math(wrong, truths, require_think=True, pool=pool) == [0.0] * 200
    assert pool.stats["worker_items"] == before  # all decided on the fast path


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="min_ops"):
        generate_rows(3, seed=0, min_ops=3, max_ops=2)


# ------------------------------------------------------------------------------------------ custom rewards

REWARD_MODULE = '''
import math
import numpy as np

def good(completions, rows):
    return [float(len(c)) + row["bonus"] for c, row in zip(completions, rows)]

def as_array(completions, rows):
    return np.ones(len(completions), np.float32)

def too_short(completions, rows):
    return [1.0]

def with_nan(completions, rows):
    return [math.nan] * len(completions)

def not_numbers(completions, rows):
    return ["yes"] * len(completions)

def scalar(completions, rows):
    return 1.0

class Scorer:
    @staticmethod
    def score(completions, rows):
        return [0.5] * len(completions)

NOT_CALLABLE = 3
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(REWARD_MODULE))
    (tmp_path / "broken_rewards.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    for name in ("my_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


def test_load_reward_fn_good(reward_module):
    rows = [{"bonus": 1.0}, {"bonus": 0.0}]
    assert load_reward_fn(f"{reward_module}:good")(["ab", "c"], rows) == [3.0, 1.0]
    assert load_reward_fn(f"{reward_module}:as_array")(["ab", "c"], rows) == [1.0, 1.0]
    assert load_reward_fn(f" {reward_module} : Scorer.score ")(["a"], rows[:1]) == [0.5]


@pytest.mark.parametrize(
    "spec,error,message",
    [
        ("no_colon", ValueError, "expected 'module:function'"),
        (":good", ValueError, "expected 'module:function'"),
        ("my_rewards:", ValueError, "expected 'module:function'"),
        ("a:b:c", ValueError, "expected 'module:function'"),
        (None, ValueError, "expected 'module:function'"),
        ("no_such_module_xyz:fn", ModuleNotFoundError, "no module named 'no_such_module_xyz'"),
        ("broken_rewards:fn", ImportError, "importing 'broken_rewards' failed"),
        ("my_rewards:missing", AttributeError, "has no attribute 'missing'"),
        ("my_rewards:Scorer.missing", AttributeError, "has no attribute 'Scorer.missing'"),
        ("my_rewards:NOT_CALLABLE", TypeError, "not a callable"),
    ],
)
def test_load_reward_fn_bad_spec(reward_module, spec, error, message):
    with pytest.raises(error, match=re.escape(message)) as info:
        load_reward_fn(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name,message",
    [
        ("too_short", "returned 1 rewards for 2 completions"),
        ("with_nan", "not finite"),
        ("not_numbers", "not a number"),
        ("scalar", "expected a sequence of 2 numbers"),
    ],
)
def test_reward_fn_output_is_validated(reward_module, name, message):
    fn = load_reward_fn(f"{reward_module}:{name}")
    with pytest.raises(ValueError, match=re.escape(message)):
        fn(["a", "b"], [{}, {}])


def test_reward_fn_checks_rows(reward_module):
    with pytest.raises(ValueError, match="2 completions but 1 rows"):
        load_reward_fn(f"{reward_module}:good")(["a", "b"], [{"bonus": 0}])
