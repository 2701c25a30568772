"""Prompt data: load and normalise rows from any source (``sources``), render prompts and stream shuffled,
resumable batches (``prompts``). See ``realjax/data/sources.py`` for the spec syntax and the row schema."""

from realjax.data.prompts import PromptStream, batch_prompts, bucket_length, prompt_text, render_prompts
from realjax.data.sources import (PAPER_INSTRUCTION, DataError, DataReport, MalformedRow, Row, load_many,
                                  load_rows, normalise_ground_truth, normalise_row, spec_name)

__all__ = ["PAPER_INSTRUCTION", "DataError", "DataReport", "MalformedRow", "PromptStream", "Row", "batch_prompts",
           "bucket_length", "load_many", "load_rows", "normalise_ground_truth", "normalise_row", "prompt_text",
           "render_prompts", "spec_name"]
