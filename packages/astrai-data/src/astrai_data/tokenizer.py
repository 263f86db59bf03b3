"""The slice of `astrai_core.tokenizer.AutoTokenizer` this package relies on.

Preprocessing accepts a tokenizer folder or any object with this shape (tests use a tiny one).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TokenizerLike(Protocol):
    eos_id: int
    pad_id: int
    bos_id: int

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> Any: ...

    def apply_chat_template_with_mask(self, messages: list[dict[str, str]]
                                      ) -> tuple[list[int], list[int]]: ...

    def fingerprint(self) -> str: ...


TokenizerSource = str | Path | TokenizerLike


def load_tokenizer(source: TokenizerSource) -> TokenizerLike:
    """A tokenizer object from a folder path (via AutoTokenizer) or the object itself."""
    if not isinstance(source, str | Path):
        return source
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokenizer folder not found; train one with "
                                "`astrai tokenizer train` or pass a model folder")
    from astrai_core.tokenizer import AutoTokenizer  # core's tokenizer is only needed here

    return AutoTokenizer.from_pretrained(path)


def encode_batch(tokenizer: TokenizerLike, texts: list[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    if batch is not None:
        return batch(texts, add_special_tokens=False)
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def vocab_size(tokenizer: TokenizerLike) -> int | None:
    size = getattr(tokenizer, "vocab_size", None)
    if callable(size):
        size = size()
    return int(size) if size is not None else None
