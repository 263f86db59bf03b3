"""Our special tokens, and how the named special tokens of a Hugging Face folder are read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

EOS_TOKEN = "<|endoftext|>"  # end of text; also separates documents in pre-training data
IM_START_TOKEN = "<|im_start|>"  # opens a chat turn (ChatML)
IM_END_TOKEN = "<|im_end|>"  # closes a chat turn
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|begin_of_text|>"

# Trained tokenizers put these first, in this order, so their ids are 0..4 in every AstrAI vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN, BOS_TOKEN)

# The named roles our trained tokenizers declare in tokenizer_config.json.
DEFAULT_NAMED_TOKENS: dict[str, str] = {
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "pad_token": PAD_TOKEN,
}

# The named special tokens Hugging Face passes to chat templates (and keeps in tokenizer_config.json).
NAMED_TOKEN_KEYS: tuple[str, ...] = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)

# Tokens that end a turn in widespread chat formats (ChatML/Qwen, Llama 3, Gemma, Phi-3). Generation
# must stop on them even where tokenizer_config.json names a different eos_token.
END_OF_TURN_TOKENS: tuple[str, ...] = (
    EOS_TOKEN, IM_END_TOKEN, "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>",
)


def token_content(value: Any) -> str | None:
    """The text of a special token as tokenizer_config.json stores it: a plain string, or an
    AddedToken object (`{"content": "<s>", "lstrip": false, ...}`) in older folders."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token entry {value!r} is neither a string nor an object with 'content'")


def named_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """`{"bos_token": "<s>", ...}` for each named special token the config sets (unset ones left out)."""
    found = {}
    for key in NAMED_TOKEN_KEYS:
        content = token_content(config.get(key))
        if content is not None:
            found[key] = content
    return found
