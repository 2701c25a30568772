"""Answer extraction: the final ``\\boxed{...}`` of a completion, and ground truths as answer strings.

Follows the official REAL verifier (DeepScaleR ``math_reward.py`` / ``math_utils``, PAPER.md §5.2):

1. Thinking split: with ``require_think`` a completion without ``</think>`` has no answer. When
   ``</think>`` is present only the segment after the FIRST one is kept, up to a second ``</think>`` if
   there is one (the official ``split("</think>")[1]``).
2. The content of the LAST ``\\boxed{...}``, with balanced-brace matching. No box, or an unclosed last
   box -> ``None``. ``\\fbox`` is never an answer: the official ``last_boxed_only_string`` falls back to
   ``\\fbox`` only when the text holds no ``\\boxed``, but its caller ``extract_answer`` returns nothing
   in that case, and ``remove_boxed`` rejects anything not starting ``\\boxed{`` anyway. So
   ``\\fbox{7}`` alone has no answer and ``\\boxed{1} \\fbox{8}`` answers ``1``, as there.

Departures from the official code, for safety or LaTeX-correctness, and one leniency:

- Bounded work: only the last ``max_chars`` (default 4096) characters of the kept segment are searched,
  so a megabyte completion costs one ``str.find`` plus a fixed-size scan. A box that opens earlier than
  that window is not seen. An answer longer than ``max_answer_chars`` (default 1000) counts as no answer
  (no benchmark answer is that long, and the sympy stage should never see such strings).
- Brace matching is an iterative scan (no recursion), and escaped braces ``\\{`` / ``\\}`` are
  skipped, so ``\\boxed{\\{1,2\\}}`` gives ``\\{1,2\\}`` (the official code counts them too, which gives
  the same result whenever they come in pairs).
- ``\\boxed 5`` (a single token after a space, as in ``$\\boxed 5$``) is accepted; the official
  ``remove_boxed`` only accepts ``\\boxed{``, so there it is no answer (a right answer scored 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

THINK_CLOSE = "</think>"
DEFAULT_MAX_CHARS = 4096
DEFAULT_MAX_ANSWER_CHARS = 1000

BOX_COMMAND = "\\boxed"
# An escaped character (so `\{` and `\\` never count as braces) or a bare brace.
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_TOKEN_RE = re.compile(r"[^\s$]+")


def answer_region(text: str, *, require_think: bool = False) -> str | None:
    """The part of ``text`` that may hold the final answer (rule 1 above); ``None`` if it cannot."""
    start = text.find(THINK_CLOSE)
    if start < 0:
        return None if require_think else text
    start += len(THINK_CLOSE)
    end = text.find(THINK_CLOSE, start)
    return text[start:] if end < 0 else text[start:end]




def _braced(text: str, open_pos: int) -> str | None:
    """Content of the group whose ``{`` is at ``open_pos``; ``None`` when it never closes."""
    depth = 0
    for m in _BRACE_RE.finditer(text, open_pos):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : m.start()]
    return None


def boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{..}`` / ``\\boxed TOKEN`` in ``text``, else ``None``."""
    pos = text.rfind(BOX_COMMAND)
    if pos < 0:
        return None
    pos += len(BOX_COMMAND)
    stripped = text[pos:].lstrip()
    if stripped.startswith("{"):
        return _braced(text, len(text) - len(stripped))
    if len(stripped) == len(text) - pos:  # no space after the command: `\boxedx` is no box
        return None
    m = _TOKEN_RE.match(stripped)
    return m.group().rstrip(".,;:") if m else None


def extract_answer(
    text: str,
    *,
    require_think: bool = False,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    max_answer_chars: int | None = DEFAULT_MAX_ANSWER_CHARS,
) -> str | None:
    """The final boxed answer of a completion (module docstring), stripped, or ``None``.

    Args:
      text: a decoded completion (anything that is not a ``str`` has no answer).
      require_think: the official rule that a completion without ``</think>`` is unanswered.
      max_chars: only the last ``max_chars`` characters of the answer region are searched (None: all).
      max_answer_chars: longer answers count as no answer (None: no cap).
    """
    if not isinstance(text, str):
        return None
    region = answer_region(text, require_think=require_think)
    if region is None:
        return None
    if max_chars is not None and len(region) > max_chars:
        region = region[-max_chars:]
    answer = boxed_content(region)
    if answer is None:
        return None
    answer = answer.strip()
    if not answer or (max_answer_chars is not None and len(answer) > max_answer_chars):
        return None
    return answer


def _number_str(x: int | float) -> str:
    """``142.0 -> "142"`` (AMC ground truths are floats), ``0.1 -> "0.1"`` (shortest round-trip)."""
    if isinstance(x, float) and math.isfinite(x) and x.is_integer():
        return str(int(x))
    return repr(x) if isinstance(x, float) else str(x)


def _flatten(gt) -> Iterable:
    """Elements of a (possibly nested) list / tuple / numpy array, without recursion."""
    stack = [gt]
    while stack:
        item = stack.pop()
        if hasattr(item, "tolist"):  # numpy arrays and numpy scalars, without importing numpy
            item = item.tolist()
        if isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        else:
            yield item


def ground_truth_answers(gt) -> tuple[str, ...]:
    """Acceptable answers of a ground truth: a string, a number, or a list / array of them.

    Strings holding a ``\\boxed{}`` are reduced to its content first (the official ``extract`` step);
    surrounding ``$`` are removed; numbers are printed without a spurious ``.0``. Empty answers and
    ``None`` are dropped, so an all-empty ground truth matches nothing.
    """
    answers = []
    for item in _flatten(gt):
        if item is None:
            continue
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            answers.append(_number_str(item))
            continue
        s = str(item).strip()
        if BOX_COMMAND in s:
            s = extract_answer(s, max_chars=None, max_answer_chars=None) or s
        s = s.strip().strip("$").strip()
        if s:
            answers.append(s)
    return tuple(answers)
