"""Tiny offline building blocks: a character-level HF tokenizer with a Qwen-style chat template.

Tests, the embedded demo and the study need a real ``transformers`` tokenizer without a download. This
one maps every printable ASCII character (and newline) to its own id, plus the Qwen2 chat specials and
the ``<think>`` tags as single tokens, so any text the synthetic tasks produce round-trips exactly.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS_CHAT, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
UNK = "<unk>"
SPECIALS = (PAD, BOS_CHAT, EOS)
CHARS = tuple(sorted(set(string.printable) - set("\t\r\x0b\x0c")))

# The Qwen2 template without a default system prompt (the paper's prompts have none).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer():
    """A ``PreTrainedTokenizerFast``: ids 0-2 are PAD / <|im_start|> / <|im_end|> (EOS), 3-4 the think
    tags, then one id per printable character, then <unk>."""
    vocab = {t: i for i, t in enumerate((*SPECIALS, THINK_OPEN, THINK_CLOSE, *CHARS, UNK))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # and decode by plain concatenation
    tok.add_special_tokens(list(SPECIALS))
    tok.add_tokens([THINK_OPEN, THINK_CLOSE])  # whole tokens, but kept by skip_special_tokens
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    hf.chat_template = CHAT_TEMPLATE
    return hf
