"""Prompts: templating and tokenizing, length buckets and left padding, and the shuffled, resumable stream
of training batches (the row schema: ``realjax.data.sources``).

``render_prompts`` adds ``"prompt_text"`` (str) and ``"prompt_ids"`` (int32 ndarray) to each row, counting
the rows it drops (too long, broken template) in the source's ``DataReport``.

verl shuffles with a torch generator seeded once; our order is a pure function of (seed, epoch), so a
resumed run replays exactly the same batches from two saved ints.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from jinja2 import TemplateError

from realjax.data.report import DataError, DataReport
from realjax.data.sources import Row


# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------
def prompt_text(messages: Sequence[Mapping[str, str]], tokenizer, *, chat_template: bool = True) -> str:
    """The text the policy continues: the chat template with the assistant header, or the raw user turns."""
    if chat_template:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return "\n\n".join(m["content"] for m in messages if m["role"] == "user")


def render_prompts(rows: Sequence[Row], tokenizer, *, max_prompt_tokens: int, chat_template: bool = True,
                   report: DataReport | None = None, limit_key: str = "data.max_prompt_tokens"
                   ) -> tuple[list[Row], DataReport]:
    """Template and tokenize prompts; drop (and count) those longer than ``max_prompt_tokens``.

    Args:
      rows: normalised rows (``load_rows``).
      tokenizer: a ``transformers`` tokenizer (with a chat template unless ``chat_template=False``).
      max_prompt_tokens: the longest prompt kept, in tokens after templating (paper: 1024).
      chat_template: False renders the user turns as plain text (base models).
      report: the loading report; when given, the returned report covers both stages.
      limit_key: the setting that raises ``max_prompt_tokens``, named in the report of too-long prompts.
    Returns:
      (kept rows with ``prompt_text`` and ``prompt_ids`` (int32 [len]), report).
    """
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be positive, got {max_prompt_tokens}")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; render with chat_template=False")

    stage = DataReport(source=report.source if report else "prompts", total=len(rows),
                       max_prompt_tokens=max_prompt_tokens, limit_key=limit_key)
    texts, templated = [], []
    for row in rows:
        try:
            texts.append(prompt_text(row["messages"], tokenizer, chat_template=chat_template))
            templated.append(row)
        except TemplateError:  # e.g. a template that refuses system turns
            stage.count("template_error")
    # A chat template writes its own BOS; raw text needs the tokenizer's (Llama), so add it only there.
    ids_list = tokenizer(texts, add_special_tokens=not chat_template)["input_ids"] if texts else []
    kept = []
    for row, text, ids in zip(templated, texts, ids_list):
        if len(ids) > max_prompt_tokens:
            stage.too_long += 1
        else:
            kept.append({**row, "prompt_text": text, "prompt_ids": np.asarray(ids, np.int32)})
    stage.kept = len(kept)
    return kept, report.then(stage) if report else stage


def bucket_length(length: int, buckets: Sequence[int] | None = None) -> int:
    """The smallest bucket >= ``length``; default buckets are the powers of two from 16."""
    if buckets is None:
        return max(16, 1 << max(length - 1, 0).bit_length())
    fits = [b for b in buckets if b >= length]
    if not fits:
        raise DataError(f"a prompt of {length} tokens is longer than the largest bucket {max(buckets)}")
    return min(fits)


def batch_prompts(prompt_ids_list: Sequence[Sequence[int]], pad_id: int, *,
                  buckets: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts to one bucketed length, so every prompt ends at the right edge.

    Buckets keep the set of prompt shapes (hence sampler compiles) small.

    Returns:
      ids_BT: int32 [B, T], ``pad_id`` before each prompt; mask_BT: int32 [B, T], 1 on prompt tokens.
    """
    if not len(prompt_ids_list):
        raise DataError("batch_prompts needs at least one prompt")
    t = bucket_length(max(len(p) for p in prompt_ids_list), buckets)
    ids_BT = np.full((len(prompt_ids_list), t), pad_id, np.int32)
    mask_BT = np.zeros((len(prompt_ids_list), t), np.int32)
    for b, prompt in enumerate(prompt_ids_list):
        if len(prompt):
            ids_BT[b, t - len(prompt):] = prompt
            mask_BT[b, t - len(prompt):] = 1
    return ids_BT, mask_BT


# ----------------------------------------------------------------------------------------------------
# Shuffled stream
# ----------------------------------------------------------------------------------------------------
class PromptStream:
    """Batches of rows in an order that depends only on (seed, epoch): resumable from two ints.

    Drop-last: a batch never straddles an epoch. When fewer than ``n`` rows remain in an epoch they are
    skipped and the batch is the start of the next epoch, so each epoch yields ``len(rows) // n`` batches.
    On several processes every one walks the same global order and takes its contiguous slice of each
    global batch of ``n`` rows (``n / process_count`` rows each).
    """

    def __init__(self, rows: Sequence[Row], *, seed: int, process_index: int = 0, process_count: int = 1):
        if not rows:
            raise DataError("PromptStream needs at least one row")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
        self.rows, self.seed = rows, seed
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.index = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of row indices for ``epoch``."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(len(self.rows)))
        return self._order[1]

    def next_batch(self, n: int) -> list[Row]:
        """This process's slice of the next global batch of ``n`` rows."""
        if n < 1 or n % self.process_count:
            raise ValueError(f"global batch {n} is not a positive multiple of "
                             f"process_count={self.process_count}")
        if n > len(self.rows):
            raise DataError(f"global batch {n} is larger than the dataset ({len(self.rows)} rows)")
        if self.index + n > len(self.rows):
            self.epoch, self.index = self.epoch + 1, 0
        per_process = n // self.process_count
        start = self.index + self.process_index * per_process
        picked = self.order(self.epoch)[start:start + per_process]
        self.index += n
        return [self.rows[i] for i in picked]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self.rows):
            raise ValueError(f"stream position {dict(state)} is outside a dataset of {len(self.rows)} rows")
        self.epoch, self.index = epoch, index
