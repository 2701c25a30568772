"""``realjax sample``: completions of a local HF model, as JSONL."""

from __future__ import annotations

import json
from pathlib import Path

from realjax.cli import CliError
from realjax.data import prompt_text
from realjax.models import from_pretrained, load_tokenizer, stop_token_ids
from realjax.models.config import resolve_dtype
from realjax.sampling import Sampler, SamplingConfig, sample_ids


def _read_prompts(args) -> list:
    """Prompts as chat messages (list) or raw text (str), from --prompt or a JSONL file."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise CliError("--prompt is empty")
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise CliError(f"prompt file {path} does not exist")
    prompts = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"{path}:{i}: not JSON ({e.msg})") from None
        item = obj.get("messages", obj.get("prompt")) if isinstance(obj, dict) else None
        if not item:
            raise CliError(f'{path}:{i}: expected an object with "prompt" (text) or "messages" (chat turns)')
        prompts.append(item)
    if not prompts:
        raise CliError(f"prompt file {path} holds no prompts")
    return prompts


def run(args) -> int:
    """`realjax sample`: completions of a local HF model as JSONL."""
    prompts = _read_prompts(args)
    tok = load_tokenizer(args.model)
    model = from_pretrained(args.model, dtype=resolve_dtype(args.dtype))
    texts = []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
        texts.append(prompt_text(messages, tok, chat_template=not args.no_chat_template))
    ids = [tok(t, add_special_tokens=args.no_chat_template)["input_ids"] for t in texts]
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, stop_ids=stop_token_ids(args.model, tok))
    sampler = Sampler(cfg, pad_id=tok.pad_token_id)
    results = sample_ids(model, sampler, ids, n=args.n, seed=args.seed, prompts_per_batch=args.batch_prompts,
                         progress=True)
    out = open(args.output, "w") if args.output else None
    for text, samples in zip(texts, results):
        for s in samples:
            row = {"prompt": text, "completion": tok.decode(s["token_ids"], skip_special_tokens=True),
                   "token_ids": s["token_ids"], "logprobs": s["logprobs"], "finished": s["finished"]}
            if out:
                out.write(json.dumps(row) + "\n")
            else:
                print(row["completion"])
    if out:
        out.close()
        print(f"wrote {sum(len(r) for r in results)} completions to {args.output}")
    return 0
