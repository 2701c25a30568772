"""Runs one ``realjax bench rollout`` request through vLLM: a script for vLLM's own interpreter.

``realjax bench rollout --vllm-python PATH`` starts ``PATH vllm_runner.py REQUEST RESULT``. This file
imports nothing from realjax (vLLM lives in its own virtual environment, with its own torch): it reads
the request (JSON), runs every row's prompt ids through vLLM's continuous-batching engine for exactly
the row's oracle length (``min_tokens = max_tokens = L``, EOS ignored, no tokenizer, float32), and writes
the result (JSON):

  request: {"model": HF dir, "prompts": [[ids] per row], "lengths": [L per row], "temperature": T,
            "top_p": p (optional, 1.0), "max_model_len": int, "repeats": int, "seed": int}
  result:  {"vllm_version": str, "startup_s": s, "generate_s": [s per timed call],
            "lengths": [tokens generated per row, last timed call]}

One untimed warm-up call (2 tokens per row) comes before the timed calls. vLLM's engine starts worker
processes, hence the ``__main__`` guard.
"""

from __future__ import annotations

import json
import sys
import time


def run(request: dict) -> dict:
    import vllm  # here, not at the top: the module's docstring and protocol read without vLLM installed
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=request["model"], skip_tokenizer_init=True, dtype="float32", seed=request["seed"],
              max_model_len=request["max_model_len"])
    startup = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    params = lambda n: SamplingParams(temperature=request["temperature"], top_p=request.get("top_p", 1.0),
                                      min_tokens=n, max_tokens=n, ignore_eos=True, detokenize=False)
    llm.generate(prompts, [params(min(2, n)) for n in request["lengths"]], use_tqdm=False)
    times, outs = [], []
    for _ in range(max(int(request["repeats"]), 1)):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, [params(n) for n in request["lengths"]], use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return {"vllm_version": getattr(vllm, "__version__", "unknown"), "startup_s": startup, "generate_s": times,
            "lengths": [len(o.outputs[0].token_ids) for o in outs]}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        result = run(json.load(f))
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
