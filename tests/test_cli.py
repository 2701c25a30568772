"""`realjax sample` and the CLI's one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from _tiny import make_hf_model

from realjax.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    make_hf_model("qwen2", d, seed=5)
    return d


def test_sample_writes_jsonl_with_token_ids_and_logprobs(model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "2+2?"}) + "\n" +
                       json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["sample", "--model", str(model_dir), "--prompts", str(prompts), "--n", "3", "--temperature", "1.0",
                 "--top-p", "0.9", "--max-new-tokens", "6", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert row["prompt"].startswith("<|im_start|>user\n") and row["prompt"].endswith("<|im_start|>assistant\n")
        assert 1 <= len(row["token_ids"]) == len(row["logprobs"]) <= 6
        assert all(lp <= 0 for lp in row["logprobs"]) and isinstance(row["completion"], str)


def test_sample_raw_text_and_greedy_is_deterministic(model_dir, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"{i}.jsonl"
        assert main(["sample", "--model", str(model_dir), "--prompt", "abc", "--no-chat-template",
                     "--max-new-tokens", "5", "--seed", str(i), "--output", str(out)]) == 0
        outs.append(json.loads(out.read_text()))
    assert outs[0]["prompt"] == "abc" and outs[0]["token_ids"] == outs[1]["token_ids"]
    np.testing.assert_allclose(outs[0]["logprobs"], outs[1]["logprobs"])


@pytest.mark.parametrize("args,message", [
    (["sample", "--model", "/nonexistent/model", "--prompt", "hi"], "model directory /nonexistent/model does not exist"),
    (["sample", "--model", "MODEL", "--prompts", "EMPTY"], "holds no prompts"),
    (["sample", "--model", "MODEL", "--prompt", "  "], "--prompt is empty"),
])
def test_cli_errors_are_one_line(model_dir, tmp_path, args, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    args = [str(model_dir) if a == "MODEL" else str(empty) if a == "EMPTY" else a for a in args]
    out = subprocess.run([sys.executable, "-m", "realjax", *args], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_help_answers_without_jax():
    out = subprocess.run([sys.executable, "-c", "import sys; from realjax.cli import main; main(['--help']) if False "
                          "else None; import realjax.cli; print('jax' in sys.modules)"], capture_output=True, text=True)
    assert out.stdout.strip() == "False"
