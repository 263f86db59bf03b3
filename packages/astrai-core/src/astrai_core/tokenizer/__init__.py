"""Tokenizers and chat templates: `AutoTokenizer` (Hugging Face folder layout, streaming-safe
decoding), `ChatTemplate` (sandboxed Jinja2), and `train_tokenizer` (bilingual byte-level BPE)."""

from astrai_core.tokenizer.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplate,
    ChatTemplateError,
)
from astrai_core.tokenizer.special_tokens import (
    BOS_TOKEN,
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
)
from astrai_core.tokenizer.streaming import IncrementalDecoder
from astrai_core.tokenizer.tokenizer import AutoTokenizer
from astrai_core.tokenizer.training import TrainingReport, train_tokenizer

__all__ = [
    "BOS_TOKEN", "DEFAULT_CHAT_TEMPLATE", "EOS_TOKEN", "IM_END_TOKEN", "IM_START_TOKEN", "PAD_TOKEN",
    "SPECIAL_TOKENS", "AutoTokenizer", "ChatTemplate", "ChatTemplateError", "IncrementalDecoder",
    "TrainingReport", "train_tokenizer",
]
