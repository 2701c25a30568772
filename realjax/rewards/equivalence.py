"""Answer equivalence: an exact fast path, then math-verify.

``fast_equal`` decides without sympy whenever it can: equal after removing whitespace and ``$``, or both
sides plain numbers (integers compare exactly both ways; decimals only decide "equal", because
math-verify rounds to 6 decimals and would call ``142.0000001`` equal to ``142``). It returns ``None``
when undecided, and then ``verify_equivalent`` asks math-verify.

Where this departs from the paper: the official verifier (PAPER.md §5.2) is DeepScaleR's
``grade_answer_mathd`` or ``grade_answer_sympy``; realjax uses math-verify (DESIGN.md §3), which covers
the same ground (fractions vs decimals, radicals, tuples and intervals with bracket types, sets,
matrices, units and ``\\text{}``) and parses LaTeX with its own grammar.

Safety: model text is never evaluated as code. Both sides go through ``LatexExtractionConfig`` only:
math-verify's ``ExprExtractionConfig`` would hand plain-text expressions to ``sympy.parse_expr``, which
is built on ``eval``. Nothing here calls ``sympify`` on a string. (Inside the LaTeX parser, sympy's
``Number("12")`` still sympifies the digit tokens the grammar lexed, and sympy builds its unit-prefix
symbols the same way; a test spies on sympy's ``eval_expr`` to pin that nothing else reaches it.)
sympy can still hang on a hostile expression (a tower of exponents), which is why
``verify_equivalent`` runs in a worker process under an outer deadline (``pool.py``); math-verify's own
``signal.alarm`` timeouts, which only work in a main thread, are the inner line of defence that
usually spares the worker from being killed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

_INT_RE = re.compile(r"[+-]?\d+")
_DEC_RE = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")


def normalize(s: str) -> str:
    """Whitespace and ``$`` removed: differences that never change a LaTeX answer's value."""
    return "".join(s.split()).replace("$", "")


def _int_digits(s: str) -> tuple[bool, str]:
    """(negative, digits without leading zeros) of an integer string, compared as strings so a
    10k-digit answer never meets Python's int-parsing limit."""
    negative = s.startswith("-")
    digits = s.lstrip("+-").lstrip("0") or "0"
    return negative and digits != "0", digits


def fast_equal(pred: str, gold: str) -> bool | None:
    """True / False when decided without sympy (module docstring), else None."""
    p, g = normalize(pred), normalize(gold)
    if p == g:
        return bool(p)
    p_int, g_int = _INT_RE.fullmatch(p), _INT_RE.fullmatch(g)
    if p_int and g_int:
        return _int_digits(p) == _int_digits(g)
    if (p_int or _DEC_RE.fullmatch(p)) and (g_int or _DEC_RE.fullmatch(g)):
        try:
            if Decimal(p) == Decimal(g):
                return True
        except InvalidOperation:
            pass
    return None


def fast_grade(pred: str, golds: Sequence[str]) -> bool | None:
    """True if any gold is fast-equal; False only when every gold is decided unequal; else None."""
    decided = [fast_equal(pred, g) for g in golds]
    if any(d is True for d in decided):
        return True
    return False if all(d is False for d in decided) else None


def _wrap(s: str) -> str:
    """Present an answer to math-verify as a boxed LaTeX answer (a bare string could be taken for
    prose); unbalanced braces (only possible in a ground truth) go between ``$`` instead."""
    depth = 0
    for ch in s:
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            break
    return "\\boxed{" + s + "}" if depth == 0 else "$" + s + "$"


@functools.lru_cache(maxsize=1)
def _latex_only_config():
    from math_verify import LatexExtractionConfig

    return [LatexExtractionConfig(boxed_match_priority=0)]


@functools.lru_cache(maxsize=256)
def _parse(s: str, timeout_s: int):
    """math-verify parse of one answer; cached because a group's G completions share one ground
    truth and, often, one answer."""
    from math_verify import parse

    return parse(_wrap(s), extraction_config=_latex_only_config(), parsing_timeout=timeout_s)


def verify_equivalent(pred: str, golds: Sequence[str], *, timeout_s: int = 5) -> bool:
    """math-verify equivalence of ``pred`` to any of ``golds``. Must run in a main thread.

    Args:
      pred: extracted answer of the completion.
      golds: acceptable answers (``ground_truth_answers``).
      timeout_s: math-verify's own per-parse / per-comparison alarm, whole seconds (>= 1).
    """
    from math_verify import verify

    timeout_s = max(1, int(timeout_s))
    parsed_pred = _parse(pred, timeout_s)
    if not parsed_pred:
        return False
    for gold in golds:
        parsed_gold = _parse(gold, timeout_s)
        if parsed_gold and verify(parsed_gold, parsed_pred, timeout_seconds=timeout_s):
            return True
    return False
