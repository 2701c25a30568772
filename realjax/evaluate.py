"""The evaluation protocol behind the paper's tables: Pass@1 averaged over n samples, Pass@k and maj@k.

For each problem we draw ``n`` completions (the paper: n=16, temperature 0.6, top-p 0.95, up to 8192
new tokens), score each 1.0 / 0.0 with the verifier, and report per dataset

* ``pass@1``: mean over problems of the fraction of correct samples (verl's avg@16, the tables' number);
* ``pass@k``: mean over problems of the unbiased estimator of Chen et al. (2021) from (n, correct, k);
* ``maj@k`` (k > 1): majority vote (self-consistency) over the final answers of k samples, scored by
  whether the voted answer is correct (``maj_at_k``); maj@1 would be pass@1 and is not reported;

plus the mean response length and the fraction of truncated responses, and an ``average`` row that is
the unweighted mean over datasets (the tables' Avg column).

Departures from the official pipeline (verl ``main_generation`` + deepscaler reward), deliberate:

* The response is decoded with ``skip_special_tokens=True``; verl keeps special tokens and strips pad.
  The verifier only reads ``</think>`` and the last ``\\boxed{}``, which are ordinary (added, not
  special) tokens in the R1-distill tokenizers, so the scores agree.
* Every dataset is sampled from the same ``seed``: a dataset's numbers do not depend on which other
  datasets were evaluated with it.
* Prompts longer than ``--max-prompt-tokens`` are dropped, counted and reported (verl would stop).
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Mapping, Sequence

import numpy as np

from realjax.rewards import answer_key as default_answer_key, score_math
from realjax.sampling import Sampler, SamplingConfig, sample_ids

Verifier = Callable[[list[str], list], list[float]]
AnswerKey = Callable[[str], str | None]

PAPER_R = 16
MAX_DROPPED_FRACTION = 0.5  # an eval set that loses more than this is not the benchmark any more


# ----------------------------------------------------------------------------------------------------
# Estimators
# ----------------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021).

    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``: binomials of n=16
    are small, but the product never overflows nor loses precision for large n.

    Args:
      n: samples drawn for the problem (>= 1).
      c: how many of them are correct (0 <= c <= n).
      k: the budget (1 <= k <= n).
    Returns:
      The probability that at least one of k samples drawn without replacement is correct.
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1 and 0 <= c <= n; got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n; got k={k}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(keys: Sequence[str | None]) -> int | None:
    """Index of the sample that carries the voted answer, or None when no sample has an answer.

    The voted answer is the most frequent key (``None``, no answer, abstains); among equally frequent
    keys the one that occurs first wins, and the index is that key's first occurrence.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
            first.setdefault(key, i)
    if not counts:
        return None
    return first[max(counts, key=counts.__getitem__)]  # max keeps the first of equal counts: dicts keep order


def maj_at_k(keys_R: Sequence[str | None], scores_R: Sequence[float], k: int) -> float:
    """maj@k of one problem from its ``n`` samples, in sample order.

    The n samples are cut into ``n // k`` disjoint consecutive blocks of k (the last ``n % k`` samples
    sit out); each block votes (``majority_vote``) and scores the verifier's score of the sample that
    carries the voted answer, i.e. the voted answer checked against the ground truth; a block without
    any answer scores 0. The mean over blocks is an unbiased estimate of maj@k, since each block is k
    independent samples; at k = n it is the one vote over all samples.

    Args:
      keys_R: vote key per sample (``realjax.rewards.answer_key``), None when it has no answer.
      scores_R: the verifier's 0/1 score per sample.
      k: the vote size (1 <= k <= n).
    """
    n = len(keys_R)
    if len(scores_R) != n or not 1 <= k <= n:
        raise ValueError(f"maj_at_k needs {n} scores and 1 <= k <= n={n}; got {len(scores_R)} scores, k={k}")
    blocks = [range(start, start + k) for start in range(0, n - k + 1, k)]
    voted = [majority_vote([keys_R[i] for i in block]) for block in blocks]
    return sum(float(scores_R[block[v]]) for block, v in zip(blocks, voted) if v is not None) / len(blocks)


def check_ks(ks: Sequence[int], n: int) -> tuple[int, ...]:
    """Sorted unique ks, each in [1, n]; pass@1 is always reported."""
    bad = [k for k in ks if not 1 <= int(k) <= n]
    if bad:
        raise ValueError(f"pass@k needs 1 <= k <= n={n}; got k={bad}")
    return tuple(sorted({1, *(int(k) for k in ks)}))


def _check_scores(scores: Sequence[float], expected: int, name: str) -> np.ndarray:
    """The verifier's scores as float64 [expected]; they must be 0/1 for pass@k to be defined."""
    scores_S = np.asarray(scores, np.float64)
    if scores_S.shape != (expected,):
        raise ValueError(f"{name}: the verifier returned {scores_S.size} scores for {expected} completions")
    bad = scores_S[(scores_S != 0.0) & (scores_S != 1.0)]
    if bad.size:
        raise ValueError(f"{name}: the verifier must score 0.0 or 1.0 (pass@k counts correct samples); "
                         f"got {bad[0]!r}")
    return scores_S


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------
def dataset_metrics(correct_P: np.ndarray, lengths_PR: np.ndarray, finished_PR: np.ndarray, *, n: int,
                    ks: Sequence[int], maj: Mapping[int, Sequence[float]] | None = None) -> dict:
    """The metrics of one dataset from its per-problem counts.

    Args:
      correct_P: int [P] correct samples per problem.
      lengths_PR: int [P, n] response lengths in tokens.
      finished_PR: bool [P, n] the response ended on a stop token.
      n: samples per problem; ks: the Pass@k budgets (1 included).
      maj: k -> maj@k per problem [P] (``maj_at_k``), for the k that report it.
    Returns:
      {"pass@k" for k in ks, "maj@k" for k in maj, "problems", "samples", "response_length", "truncated"}.
    """
    out = {f"pass@{k}": float(np.mean([pass_at_k(n, int(c), k) for c in correct_P])) for k in ks}
    out["pass@1"] = float(np.mean(correct_P / n))  # the estimator at k=1, without rounding detours
    out.update({f"maj@{k}": float(np.mean(values)) for k, values in (maj or {}).items()})
    out.update(problems=int(correct_P.size), samples=int(lengths_PR.size),
               response_length=float(lengths_PR.mean()), truncated=float(1.0 - finished_PR.mean()))
    return out


def average_metrics(per_dataset: Mapping[str, dict]) -> dict:
    """The Avg column: the unweighted mean over datasets of every rate; counts are summed."""
    rows = list(per_dataset.values())
    out = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]
           if key not in ("problems", "samples")}
    out.update(problems=sum(r["problems"] for r in rows), samples=sum(r["samples"] for r in rows))
    return out


def _score_dataset(name: str, rows: Sequence[Mapping], samples: list[list[dict]], tokenizer,
                   verifier: Verifier, n: int) -> tuple[np.ndarray, list[str]]:
    """0/1 scores [P, n] of one dataset's samples (one verifier call for the whole set), and the decoded
    completions, flat and problem-major."""
    completions = [tokenizer.decode(s["token_ids"], skip_special_tokens=True) for per in samples for s in per]
    ground_truths = [row["ground_truth"] for row in rows for _ in range(n)]
    scores = _check_scores(verifier(completions, ground_truths), len(completions), name).reshape(len(rows), n)
    return scores, completions


def _majority(completions: list[str], scores_PR: np.ndarray, answer_key: AnswerKey,
              ks: Sequence[int]) -> dict[int, list[float]]:
    """k -> maj@k per problem for each k > 1 in ``ks`` (``maj_at_k``)."""
    n = scores_PR.shape[1]
    keys = [answer_key(text) for text in completions]
    keys_PR = [keys[p * n:(p + 1) * n] for p in range(scores_PR.shape[0])]
    return {k: [maj_at_k(keys_R, scores_R, k) for keys_R, scores_R in zip(keys_PR, scores_PR)]
            for k in ks if k > 1}


def evaluate(model, tokenizer, datasets: Mapping[str, Sequence[Mapping]], *,
             sampling: SamplingConfig | Sampler, n: int, seed: int = 0, prompts_per_batch: int = 8,
             verifier: Verifier | None = None, ks: Sequence[int] = (1,), mesh=None,
             progress: bool = False, answer_key: AnswerKey | None = None) -> dict:
    """Sample ``n`` completions per problem, score them, and aggregate Pass@1 / Pass@k / maj@k per dataset.

    Args:
      model: the NNX policy.
      tokenizer: its HF tokenizer (decodes completions; ``pad_token_id`` pads prompts).
      datasets: name -> rendered rows, each with ``prompt_ids`` (int [len]) and ``ground_truth``.
      sampling: a ``SamplingConfig``, or a ``Sampler`` to reuse (a trainer keeps its compiled programs
        across periodic evaluations).
      n: samples per problem.
      seed: sampling seed, the same for every dataset.
      prompts_per_batch: prompts per sampler call (each expands to ``n`` rows).
      verifier: ``(completions, ground_truths) -> [0.0 | 1.0]``, called once per dataset with flat
        problem-major lists; default ``realjax.rewards.score_math``.
      ks: Pass@k budgets, each in [1, n]; 1 is always included. Each k > 1 also gives maj@k.
      mesh: the mesh a new ``Sampler`` runs on (ignored when ``sampling`` is a ``Sampler``).
      progress: tqdm bars on stderr.
      answer_key: completion -> vote key of its final answer, None without one (maj@k); default
        ``realjax.rewards.answer_key``, the default verifier's extraction. It must extract the way the
        verifier does (e.g. both with ``require_think``): the vote is scored with the verifier's score.
    Returns:
      {"settings": {...}, "datasets": {name: metrics}, "average": metrics,
       "per_problem": {name: {"correct": [int] * P, "maj@k": [float] * P for each k > 1}}}, where
      metrics holds ``pass@k`` for each k, ``maj@k`` for each k > 1, ``problems``, ``samples``,
      ``response_length`` (mean tokens) and ``truncated`` (fraction).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not datasets or any(not rows for rows in datasets.values()):
        raise ValueError(f"evaluate needs non-empty datasets; sizes {({k: len(v) for k, v in datasets.items()})}")
    ks = check_ks(ks, n)
    if verifier is None:
        verifier = score_math
    if answer_key is None and max(ks) > 1:
        answer_key = default_answer_key
    sampler = sampling if isinstance(sampling, Sampler) else Sampler(sampling, pad_id=tokenizer.pad_token_id,
                                                                     mesh=mesh)
    per_dataset, per_problem = {}, {}
    for name, rows in datasets.items():
        if progress:
            print(f"eval {name}: {len(rows)} problems x {n} samples", file=sys.stderr)
        samples = sample_ids(model, sampler, [row["prompt_ids"] for row in rows], n=n, seed=seed,
                             prompts_per_batch=prompts_per_batch, progress=progress)
        scores_PR, completions = _score_dataset(name, rows, samples, tokenizer, verifier, n)
        maj = _majority(completions, scores_PR, answer_key, ks) if max(ks) > 1 else {}
        lengths_PR = np.array([[len(s["token_ids"]) for s in per] for per in samples])
        finished_PR = np.array([[s["finished"] for s in per] for per in samples], bool)
        correct_P = scores_PR.sum(axis=1).astype(int)
        per_dataset[name] = dataset_metrics(correct_P, lengths_PR, finished_PR, n=n, ks=ks, maj=maj)
        per_problem[name] = {"correct": correct_P.tolist(), **{f"maj@{k}": v for k, v in maj.items()}}
    cfg = sampler.cfg
    settings = dict(n=n, ks=list(ks), temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    max_new_tokens=cfg.max_new_tokens, seed=seed)
    return {"settings": settings, "datasets": per_dataset, "average": average_metrics(per_dataset),
            "per_problem": per_problem}


def metrics_row(result: Mapping, prefix: str = "eval") -> dict[str, float]:
    """Flat ``{prefix}/{dataset}/{metric}`` scalars (and ``{prefix}/avg/...``) for metrics.jsonl."""
    columns = {**result["datasets"], "avg": result["average"]}
    return {f"{prefix}/{name}/{key}": value for name, metrics in columns.items() for key, value in metrics.items()}


# ----------------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------------
def format_table(result: Mapping) -> str:
    """The paper's Table 1 layout: one row per metric, one column per dataset, then Avg.

    Pass@k, maj@k and the truncated fraction print with 3 decimals, the mean response length in tokens
    with 1; the caption line gives the sampling settings.
    """
    columns = {**result["datasets"], "Avg.": result["average"]}
    ks = result["settings"]["ks"]
    lines = [(f"pass@{k}", "{:.3f}") for k in ks]
    lines += [(f"maj@{k}", "{:.3f}") for k in ks if f"maj@{k}" in result["average"]]
    lines += [("truncated", "{:.3f}"), ("length", "{:.1f}")]
    keys = {"length": "response_length"}
    cells = [["", *columns]]
    cells += [[label, *(fmt.format(m[keys.get(label, label)]) for m in columns.values())] for label, fmt in lines]
    cells.append(["problems", *(str(m["problems"]) for m in columns.values())])
    widths = [max(len(row[j]) for row in cells) for j in range(len(cells[0]))]
    text = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
            for row in cells]
    text.insert(1, "-" * len(text[0]))
    s = result["settings"]
    caption = (f"n={s['n']} samples/problem, temperature {s['temperature']}, top-p {s['top_p']}, "
               f"top-k {s['top_k'] or 'off'}, max {s['max_new_tokens']} new tokens, seed {s['seed']}")
    return "\n".join([caption, *text])
