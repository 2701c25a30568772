"""Vote keys for maj@k: when two samples' final answers count as the same answer in a majority vote.

A vote key is a canonical string of an extracted answer (``extract.py``); answers with equal keys vote
together. The grouping is deliberately cheap and transitive, with no sympy:

1. Spelling that never changes a value is dropped: whitespace, ``$``, ``\\left`` / ``\\right``, the spacing
   commands ``\\!``, ``\\,``, ``\\;``, ``\\:``, ``\\ ``, and ``\\displaystyle``; ``\\dfrac`` / ``\\tfrac`` are
   ``\\frac``.
2. Exact rational numbers get one key: integers, decimals, ``a/b``, ``\\frac{a}{b}`` and ``\\frac ab`` (with
   an optional sign) are compared as fractions, so ``0.5``, ``1/2``, ``\\frac{1}{2}`` and ``\\dfrac12`` vote
   together, and ``007`` with ``7``. A numeral in base b (``equivalence.based_numeral``) keeps its base:
   ``52_8`` and ``52_{(8)}`` vote together, ``42`` (its value) does not join them; ``42_{10}`` is ``42``.
3. Everything else votes by its string after step 1: ``2\\sqrt{2}`` and ``\\sqrt{8}`` are two answers.

Grouping every pair through math-verify instead would cost k(k-1)/2 sympy comparisons per vote and is
not transitive (A ~ B and B ~ C without A ~ C), so a vote's winner could depend on the order of checks.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from realjax.rewards.equivalence import based_numeral, normalize
from realjax.rewards.extract import extract_answer

_NO_VALUE_RE = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[!,;: ]")
_FRAC_SPELLING_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")
_NUMBER_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_SLASH_RE = re.compile(r"(?P<sign>[+-]?)(?P<num>\d+)/(?P<den>\d+)")
_FRAC_RE = re.compile(r"(?P<sign>[+-]?)\\frac(?:\{(?P<num>\d+)\}|(?P<num_digit>\d))"
                      r"(?:\{(?P<den>\d+)\}|(?P<den_digit>\d))")
_MAX_NUMBER_CHARS = 1000  # longer digit strings keep their spelling as key (int() refuses ~4300 digits)


def _rational(s: str) -> Fraction | None:
    """The exact value of an integer, decimal, ``a/b`` or ``\\frac{a}{b}`` (already normalised), else None."""
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    if _NUMBER_RE.fullmatch(s):
        try:
            return Fraction(Decimal(s))
        except InvalidOperation:
            return None
    m = _SLASH_RE.fullmatch(s)
    if m is not None:
        num, den = int(m["num"]), int(m["den"])
    elif (m := _FRAC_RE.fullmatch(s)) is not None:  # \frac12 is \frac{1}{2}: one digit needs no braces
        num, den = int(m["num"] or m["num_digit"]), int(m["den"] or m["den_digit"])
    else:
        return None
    if den == 0:
        return None
    return Fraction(-num if m["sign"] == "-" else num, den)


def _digits(value: int, base: int) -> str:
    """``value`` written in ``base`` (digits above 9 as A-Z): the key of a based numeral reads as one."""
    out, rest = [], abs(value)
    while True:
        rest, d = divmod(rest, base)
        out.append("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[d])
        if rest == 0:
            return ("-" if value < 0 else "") + "".join(reversed(out))


def vote_key(answer: str | None) -> str | None:
    """The canonical form of an extracted answer (module docstring); ``None`` (no answer) abstains."""
    if answer is None:
        return None
    s = normalize(_FRAC_SPELLING_RE.sub(r"\\frac", _NO_VALUE_RE.sub("", answer)))
    based = based_numeral(s)
    if based is not None:
        value, base = based
        return str(value) if base == 10 else f"{_digits(value, base)}_{base}"
    value = _rational(s)
    if value is not None:
        return str(value)  # "7", "1/2", "-3/4": one spelling per rational
    return s or None


def answer_key(text: str, *, require_think: bool = False) -> str | None:
    """The vote key of a completion's final boxed answer (``extract_answer`` with the verifier's rules)."""
    return vote_key(extract_answer(text, require_think=require_think))
