"""User reward functions named in a config as ``module:function``.

The function is called as ``fn(completions: list[str], rows: list[dict]) -> sequence of numbers`` (one
per completion; ``rows`` are the data set rows the completions answer, repeated per rollout). It runs
in the trainer process, so unlike ``score_math`` it gets no deadline or sandbox: it is the user's own
code. ``load_reward_fn`` returns it wrapped so that a wrong length or a non-finite value fails at once
with an error that names the spec, instead of surfacing as NaNs in the loss.

Not in the paper, whose only reward is the math verifier.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Sequence

RewardFn = Callable[[list[str], list[dict]], list[float]]


def _parse_spec(spec: str) -> tuple[str, str]:
    module, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module.strip() or not attr.strip() or ":" in attr:
        raise ValueError(f"reward spec {spec!r}: expected 'module:function', e.g. 'my_pkg.rewards:score'")
    return module.strip(), attr.strip()


def _import(spec: str, module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module or module.startswith(f"{e.name}."):  # the module itself (or a parent) is missing
            raise ModuleNotFoundError(f"reward spec {spec!r}: no module named {module!r}") from None
        raise ImportError(f"reward spec {spec!r}: importing {module!r} failed: {e}") from e
    except ImportError as e:
        raise ImportError(f"reward spec {spec!r}: importing {module!r} failed: {e}") from e


def _resolve(spec: str, module, attr: str):
    """``attr`` may be dotted (``Class.method``)."""
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"reward spec {spec!r}: module {module.__name__!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def validate_rewards(spec: str, rewards, n: int) -> list[float]:
    """``rewards`` as a list of ``n`` finite floats, or a ``ValueError`` naming ``spec``."""
    if hasattr(rewards, "tolist"):  # numpy / jax arrays
        rewards = rewards.tolist()
    if not isinstance(rewards, Sequence) or isinstance(rewards, (str, bytes)):
        raise ValueError(f"reward fn {spec!r} returned {type(rewards).__name__}, expected a sequence of {n} numbers")
    if len(rewards) != n:
        raise ValueError(f"reward fn {spec!r} returned {len(rewards)} rewards for {n} completions")
    out = []
    for i, r in enumerate(rewards):
        try:
            value = float(r)
        except (TypeError, ValueError):
            raise ValueError(f"reward fn {spec!r}: reward {i} is {r!r}, not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"reward fn {spec!r}: reward {i} is {value}, not finite")
        out.append(value)
    return out


def load_reward_fn(spec: str) -> RewardFn:
    """The reward function named by ``spec`` (``"module:function"``), wrapped to validate its output.

    Raises:
      ValueError: malformed spec. ModuleNotFoundError / ImportError: the module is missing or fails to
      import. AttributeError: no such function. TypeError: the attribute is not callable.
    """
    module_name, attr = _parse_spec(spec)
    fn = _resolve(spec, _import(spec, module_name), attr)
    if not callable(fn):
        raise TypeError(f"reward spec {spec!r}: {attr!r} is a {type(fn).__name__}, not a callable")

    @functools.wraps(fn)
    def reward_fn(completions: list[str], rows: list[dict]) -> list[float]:
        if len(completions) != len(rows):
            raise ValueError(f"reward fn {spec!r}: {len(completions)} completions but {len(rows)} rows")
        return validate_rewards(spec, fn(completions, rows), len(completions))

    return reward_fn
