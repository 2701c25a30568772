"""A synthetic verifiable task family: multi-step integer arithmetic, for the embedded demo and the study.

A problem is ``Compute 3+4*2-5.``: ``k`` operators from ``+ - *`` on integers in ``[0, max_value]``,
usual precedence, and for ``k >= 2`` sometimes one parenthesised ``(a+b)`` / ``(a-b)``. The difficulty
knob is ``k``, the number of operations (drawn uniformly from ``[min_ops, max_ops]``; ``data_source``
records it as ``arithmetic/ops{k}``). The worked solution evaluates one operation per step, in the
order precedence dictates, inside a think block, then boxes the answer:

    <think>4*2=8 3+8=11 11-5=6</think> \\boxed{6}

It is short and regular on purpose: it is the supervised warm start of a tiny character-level model
(``realjax/tiny.py``), so every string is printable ASCII. Answers are integers, possibly negative, and
ground truths are their decimal strings, so ``score_math`` decides these rows on its fast path.

Not from the paper (which trains on DeepScaleR math problems); this stands in for it where a real
model and data set would not fit the budget of a test or a CPU demo.
"""

from __future__ import annotations

import random

_OPS = "+-*"
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_PAREN_PROB = 0.3


def _sample_problem(rng: random.Random, k: int, max_value: int) -> tuple[list[int], list[str], int | None]:
    """``k + 1`` operands, ``k`` operators, and the index of the operator in parentheses (or None)."""
    nums = [rng.randint(0, max_value) for _ in range(k + 1)]
    ops = [rng.choice(_OPS) for _ in range(k)]
    paren = None
    if k >= 2 and rng.random() < _PAREN_PROB:
        # Only around + or -: parentheses around * would change nothing a reader can see.
        candidates = [i for i, op in enumerate(ops) if op != "*"]
        if candidates:
            paren = rng.choice(candidates)
    return nums, ops, paren


def _render(nums: list[int], ops: list[str], paren: int | None) -> str:
    operands = [str(x) for x in nums]
    if paren is not None:  # operator i joins operands i and i+1
        operands[paren] = "(" + operands[paren]
        operands[paren + 1] += ")"
    return operands[0] + "".join(op + x for op, x in zip(ops, operands[1:]))


def _step(nums: list[int], ops: list[str], i: int, steps: list[str]) -> None:
    """Apply operator ``i`` in place and record ``a op b = c``."""
    a, b, op = nums[i], nums[i + 1], ops[i]
    c = _APPLY[op](a, b)
    steps.append(f"{a}{op}{b}={c}")
    nums[i : i + 2] = [c]
    del ops[i]


def _solve(nums: list[int], ops: list[str], paren: int | None) -> tuple[int, list[str]]:
    """The value and the steps: the parenthesised operation, then ``*`` left to right, then ``+ -``
    left to right (the order a person would write them)."""
    nums, ops, steps = list(nums), list(ops), []
    if paren is not None:
        _step(nums, ops, paren, steps)
    while "*" in ops:
        _step(nums, ops, ops.index("*"), steps)
    while ops:
        _step(nums, ops, 0, steps)
    return nums[0], steps


def make_row(rng: random.Random, k: int, max_value: int) -> dict:
    """One problem with ``k`` operations, in the row layout of ``generate_rows``."""
    nums, ops, paren = _sample_problem(rng, k, max_value)
    answer, steps = _solve(nums, ops, paren)
    return {
        "messages": [{"role": "user", "content": f"Compute {_render(nums, ops, paren)}."}],
        "ground_truth": str(answer),
        "data_source": f"arithmetic/ops{k}",
        "solution": f"<think>{' '.join(steps)}</think> \\boxed{{{answer}}}",
    }


def generate_rows(n: int, *, seed: int, min_ops: int = 1, max_ops: int = 3, max_value: int = 9) -> list[dict]:
    """``n`` arithmetic problems, deterministic for ``seed``.

    Args:
      n: number of rows.
      seed: rows depend only on it (and the knobs), not on global random state or the Python version's
        hash seed.
      min_ops, max_ops: the difficulty range; each row has ``k`` operations, ``k`` uniform in it.
      max_value: operands are integers in ``[0, max_value]``.

    Returns:
      dicts with ``messages`` (one user turn), ``ground_truth`` (the integer answer as a string),
      ``data_source`` (``arithmetic/ops{k}``) and ``solution`` (worked steps, then ``\\boxed{answer}``).
    """
    if n < 0 or not 1 <= min_ops <= max_ops or max_value < 0:
        raise ValueError(f"generate_rows: need n >= 0, 1 <= min_ops <= max_ops, max_value >= 0; got "
                         f"n={n}, min_ops={min_ops}, max_ops={max_ops}, max_value={max_value}")
    rng = random.Random(seed)
    return [make_row(rng, rng.randint(min_ops, max_ops), max_value) for _ in range(n)]
