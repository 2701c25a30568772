"""Answer equivalence: an exact fast path, then math-verify.

``fast_equal`` decides without sympy whenever it can: equal after removing whitespace and ``$``, or both
sides plain numbers (integers compare exactly both ways; decimals only decide "equal", because
math-verify rounds to 6 decimals and would call ``142.0000001`` equal to ``142``), or either side a
numeral with a base subscript (below). It returns ``None`` when undecided, and then
``verify_equivalent`` asks math-verify.

Two corrections to math-verify, both false positives that tilted pass@1 upward:

- Base subscripts. math-verify drops a subscript on a number, so it accepted ``52_{9}`` and ``52`` for
  ``52_8`` (six MATH500 answers are written in a base). Here a numeral ``DIGITS_b`` / ``DIGITS_{b}`` /
  ``DIGITS_{(b)}`` (``based_numeral``) equals only a numeral of the same base and value (``052_{8}``
  and ``52_{(8)}`` are ``52_8``); a bare number never equals a based one, not even its value (``42``
  is not ``52_8``: the question asked for base 8), except that base 10 is the bare number. The
  official REAL reward rejects ``52``, ``42`` and ``52_{9}`` too (its sympy stage reads ``52_8`` as
  the Python literal ``528``, so it also accepts ``528``, a quirk not copied).
- Small magnitudes. math-verify compares numbers by rounding to 6 decimals (plain decimals) or by
  ``evalf(chop=True)`` (expressions), both absolute: every pair of values below about 1e-6 (decimals)
  or 1e-16 (``a \\times 10^{-n}``) compared equal, so ``1.6 \\times 10^{-18}`` was accepted for
  ``8.224 \\times 10^{-19}`` (Minerva). When math-verify says equal and both sides are real constants,
  they must also agree to ``REL_TOL`` (1e-5) relatively: an answer rounded to 6 significant digits
  passes, ``8.22 \\times 10^{-19}`` does not (as ``8.22`` does not for ``8.224``). Above about 0.1
  math-verify's own test is already tighter than this, so nothing changes there; the official reward
  (``sympy.simplify(gt - pred) == 0``) is stricter still.

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
# A numeral with a base subscript, on a normalised answer: 52_8, 52_{8}, 52_{(8)}, (52)_8, 4A_{16}, and
# with a short "n=" in front as math-verify (and the official mathd) accept for plain answers. Digits
# above 9 are upper-case letters and a digit must appear, so x_1 or b_{12} are not numerals.
_BASED_RE = re.compile(r"(?:[A-Za-z]{1,2}=)?(?P<sign>[+-]?)\(?(?P<digits>(?=[0-9A-Z]*[0-9])[0-9A-Z]+)\)?"
                       r"_(?:\{\(?(?P<braced>\d+)\)?\}|\(?(?P<bare>\d+)\)?)")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|mathrm)\{([0-9A-Z()]+)\}")
REL_TOL = 1e-5  # small magnitudes: module docstring


def normalize(s: str) -> str:
    """Whitespace and ``$`` removed: differences that never change a LaTeX answer's value."""
    return "".join(s.split()).replace("$", "")


def _int_digits(s: str) -> tuple[bool, str]:
    """(negative, digits without leading zeros) of an integer string, compared as strings so a
    10k-digit answer never meets Python's int-parsing limit."""
    negative = s.startswith("-")
    digits = s.lstrip("+-").lstrip("0") or "0"
    return negative and digits != "0", digits


def based_numeral(answer: str) -> tuple[int, int] | None:
    """(value, base) of a numeral with a base subscript (module docstring), else None.

    ``answer`` is normalised here (``normalize``); ``\\text{..}`` / ``\\mathrm{..}`` around the digits
    or the base are dropped. Digits that do not exist in the base (``59_8``) make it no numeral.
    """
    m = _BASED_RE.fullmatch(_TEXT_WRAP_RE.sub(r"\1", normalize(answer)))
    if m is None:
        return None
    base = int(m["braced"] or m["bare"])
    if not 2 <= base <= 36 or len(m["digits"]) > 1000:  # int() refuses longer digit strings
        return None
    try:
        value = int(m["digits"], base)
    except ValueError:
        return None
    return (-value if m["sign"] == "-" else value), base


def _based_equal(p: str, g: str) -> bool | None:
    """fast_equal's verdict when either side is a based numeral; None when neither is (or undecided)."""
    p_based, g_based = based_numeral(p), based_numeral(g)
    if p_based is None and g_based is None:
        return None
    if p_based is not None and g_based is not None:
        return p_based == g_based
    based, plain = (p_based, g) if p_based is not None else (g_based, p)
    if based[1] != 10:
        return False  # a bare number is not an answer in base b, not even b's value of it
    if _INT_RE.fullmatch(plain) and len(plain) <= 1000:
        return int(plain) == based[0]
    return None  # 42_{10} against \frac{84}{2}: math-verify, which reads 42_{10} as 42


def fast_equal(pred: str, gold: str) -> bool | None:
    """True / False when decided without sympy (module docstring), else None."""
    p, g = normalize(pred), normalize(gold)
    if p == g:
        return bool(p)
    based = _based_equal(p, g)
    if based is not None:
        return based
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
    from math_verify import LatexExtractionConfig  # lazy: math_verify pulls in sympy (seconds), only the verifier's slow path needs it

    return [LatexExtractionConfig(boxed_match_priority=0)]


@functools.lru_cache(maxsize=256)
def _parse(s: str, timeout_s: int):
    """math-verify parse of one answer; cached because a group's G completions share one ground
    truth and, often, one answer."""
    from math_verify import parse  # lazy: as above

    return parse(_wrap(s), extraction_config=_latex_only_config(), parsing_timeout=timeout_s)


def _real_constant(parsed):
    """The value of a math-verify parse that is one real constant (a 30-digit sympy Float), else None;
    percentages (``50\\%``, whose realness sympy leaves open) and infinities are not. Duck-typed: sympy
    is math-verify's dependency, not ours, and a parse also holds plain strings."""
    expr = parsed[0] if parsed else None
    if getattr(expr, "is_number", False) is not True or getattr(expr, "is_real", None) is not True:
        return None
    value = expr.evalf(30)
    return value if value.is_finite else None


def magnitudes_agree(parsed_gold, parsed_pred) -> bool:
    """False only when both parses are real constants that differ by more than ``REL_TOL`` relatively
    (module docstring); math-verify's verdict stands for everything else."""
    try:
        a, b = _real_constant(parsed_gold), _real_constant(parsed_pred)
        if a is None or b is None:
            return True
        return bool(abs(a - b) <= REL_TOL * max(abs(a), abs(b)))
    except Exception:  # a sympy corner case must not turn math-verify's "equal" into a crash
        return True


def verify_equivalent(pred: str, golds: Sequence[str], *, timeout_s: int = 5) -> bool:
    """math-verify equivalence of ``pred`` to any of ``golds``. Must run in a main thread.

    Args:
      pred: extracted answer of the completion.
      golds: acceptable answers (``ground_truth_answers``).
      timeout_s: math-verify's own per-parse / per-comparison alarm, whole seconds (>= 1).
    """
    from math_verify import verify  # lazy: as above

    timeout_s = max(1, int(timeout_s))
    parsed_pred = _parse(pred, timeout_s)
    if not parsed_pred:
        return False
    for gold in golds:
        parsed_gold = _parse(gold, timeout_s)
        if (parsed_gold and verify(parsed_gold, parsed_pred, timeout_seconds=timeout_s)
                and magnitudes_agree(parsed_gold, parsed_pred)):
            return True
    return False
