"""``realjax eval``: Pass@1 (mean over n samples), Pass@k and maj@k per dataset of a local HF model."""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path

from realjax import data
from realjax.cli import CliError
from realjax.data import DataError
from realjax.evaluate import MAX_DROPPED_FRACTION, check_ks, evaluate, format_table
from realjax.models import from_pretrained, load_tokenizer, stop_token_ids
from realjax.models.config import resolve_dtype
from realjax.rewards import answer_key, score_math
from realjax.sampling import SamplingConfig


def _parse_ks(text: str | None, n: int) -> tuple[int, ...]:
    if not text:
        return (1, n)
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
        return check_ks(ks, n)
    except ValueError as e:
        raise CliError(f"--k {text!r}: {e}" if "pass@k" in str(e) else f"--k {text!r}: not integers") from None


def _load_data(args, tokenizer) -> tuple[dict[str, list], dict[str, dict]]:
    """Rendered rows per dataset (the first ``--limit``), and what was kept / dropped per dataset."""
    datasets, counts = {}, {}
    for name, (rows, report) in data.load_many(args.data).items():
        rows, report = data.render_prompts(rows, tokenizer, max_prompt_tokens=args.max_prompt_tokens,
                                           chat_template=not args.no_chat_template, report=report,
                                           limit_key="--max-prompt-tokens")
        print(report.summary(), file=sys.stderr)
        if report.dropped:  # the score is then over a subset of the benchmark: say so loudly
            print(f"warning: {name}: {report.dropped} of {report.total} problems dropped; "
                  "the score is not comparable with the full benchmark", file=sys.stderr)
        report.check(max_bad_fraction=MAX_DROPPED_FRACTION)
        datasets[name] = rows[:args.limit] if args.limit > 0 else rows
        counts[name] = dict(source=report.source, total=report.total, kept=report.kept,
                            too_long=report.too_long, malformed=dict(report.malformed),
                            evaluated=len(datasets[name]))
    return datasets, counts


def _load_tokenizer(path: str):
    """(tokenizer, stop ids) of a local HF directory."""
    tokenizer = load_tokenizer(path)
    return tokenizer, stop_token_ids(path, tokenizer)


def _load_model(path: str, dtype: str):
    return from_pretrained(path, dtype=resolve_dtype(dtype))


def run(args) -> int:
    """Load, sample, score, print the table, write JSON."""
    start = time.time()
    if args.n < 1 or args.limit < 0 or args.batch_prompts < 1:
        raise CliError("--n and --batch-prompts must be >= 1 and --limit >= 0")
    if args.output and not Path(args.output).resolve().parent.is_dir():  # fail before hours of sampling
        raise CliError(f"--output {args.output}: its directory does not exist")
    ks = _parse_ks(args.k, args.n)
    # Cheap steps first (tokenizer, data), the weights last: a typo fails in seconds, not minutes.
    try:
        tokenizer, stops = _load_tokenizer(args.model)
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, stop_ids=stops)
        datasets, counts = _load_data(args, tokenizer)
        model = _load_model(args.model, args.dtype)
    except FileNotFoundError:
        raise  # cli.main prints it as one line
    except (DataError, ValueError, KeyError, OSError) as e:  # malformed data, checkpoint or settings
        raise CliError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    verifier = key = None
    if args.require_think:
        verifier = partial(score_math, require_think=True)
        key = partial(answer_key, require_think=True)  # the votes read answers as the verifier does
    result = evaluate(model, tokenizer, datasets, sampling=sampling, n=args.n, seed=args.seed,
                      prompts_per_batch=args.batch_prompts, verifier=verifier, ks=ks, progress=True,
                      answer_key=key)
    result["settings"].update(max_prompt_tokens=args.max_prompt_tokens, require_think=args.require_think,
                              chat_template=not args.no_chat_template, limit=args.limit, dtype=args.dtype)
    print(format_table(result))
    if args.output:
        record = {"model": args.model, "data": args.data, **result, "counts": counts,
                  "wall_time_s": round(time.time() - start, 3)}
        with open(args.output, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.output}")
    return 0
