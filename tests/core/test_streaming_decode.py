"""IncrementalDecoder: one token at a time, only complete characters, same text as a full decode."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from astrai_core.tokenizer import AutoTokenizer, IncrementalDecoder
from astrai_core.tokenizer.streaming import MAX_PENDING_TOKENS

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "你好，世界！今天天气很好。",
    "Emoji: 😀👍🏽 and a family 👨‍👩‍👧 then 中文 mixed with English words.",
    "数学：12 + 30 = 42 ✓",
    "  leading and trailing spaces  \n\n\ttabs ",
]


def byte_tokens(text: str) -> list[str]:
    """The byte-level alphabet characters standing for the UTF-8 bytes of `text`."""
    (piece, _), = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    return list(piece)


def byte_level(merges_for: tuple[str, ...] = ()) -> Tokenizer:
    """Byte-level BPE whose merges join bytes *across* character boundaries (the last byte of
    one character with the first of the next), the hardest case for a streaming decoder."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for text in merges_for:
        chars = byte_tokens(text)
        for left, right in zip(chars[1::2], chars[2::2], strict=False):
            if left + right not in vocab:
                vocab[left + right] = len(vocab)
                merges.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIALS)
    return tokenizer


def sentencepiece_with_byte_fallback() -> Tokenizer:
    """Llama-2 style: `▁` for spaces, unknown characters as <0xNN> byte tokens, and a decoder that
    strips the first leading space, so a window decoded alone differs from a full decode."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for char in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,.!":
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tokenizer


def stream(decoder: IncrementalDecoder, ids: list[int]) -> list[str]:
    pieces = [decoder.step(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


@pytest.fixture(scope="module")
def tokenizer() -> AutoTokenizer:
    return AutoTokenizer(byte_level(merges_for=tuple(TEXTS)), special_tokens={"eos_token": "<|endoftext|>"})


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_full_decode_without_broken_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer.stream_decoder(), ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_fixture_has_tokens_that_straddle_two_characters(tokenizer):
    encoding = tokenizer.backend.encode(TEXTS[0])
    straddling = [tok for tok, (start, end) in zip(encoding.tokens, encoding.offsets, strict=True)
                  if end - start == 2 and len(tok) == 2]  # 2 bytes touching 2 three-byte characters
    assert straddling


def test_split_characters_are_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("你😀")  # 3 + 4 UTF-8 bytes
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # tokens really split characters
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.step(i) for i in ids]
    assert [p for p in pieces if p] == ["你", "😀"]
    assert decoder.flush() == "" and decoder.text == "你😀"


def test_special_tokens_are_skipped_or_kept_as_asked(tokenizer):
    ids = [tokenizer.token_to_id("<|im_start|>"), *tokenizer.encode("好的"), tokenizer.token_to_id("<|im_end|>")]
    assert "".join(stream(tokenizer.stream_decoder(), ids)) == "好的"
    kept = "".join(stream(tokenizer.stream_decoder(skip_special_tokens=False), ids))
    assert kept == "<|im_start|>好的<|im_end|>" == tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("text", ["Hello world, again!", "Say 你好 then 😀 bye."])
def test_byte_fallback_tokenizer_streams_like_its_full_decode(text):
    tokenizer = sentencepiece_with_byte_fallback()
    ids = tokenizer.encode(text).ids
    assert any(tokenizer.id_to_token(i).startswith("<0x") for i in ids) == ("你" in text)
    pieces = stream(IncrementalDecoder(tokenizer), ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_invalid_bytes_are_emitted_rather_than_held_forever(tokenizer):
    continuation = tokenizer.token_to_id(byte_tokens("é")[1])  # a lone UTF-8 continuation byte
    ids = [continuation] * (3 * MAX_PENDING_TOKENS) + tokenizer.encode("ok")
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.step(i) for i in ids]
    assert "".join(pieces[: 2 * MAX_PENDING_TOKENS]) != ""  # released before the stream ends
    assert "".join(pieces) + decoder.flush() == tokenizer.decode(ids)


def test_incomplete_character_at_end_of_stream_comes_out_on_flush(tokenizer):
    ids = tokenizer.encode("a中")[:-1]  # drop the last byte of 中
    decoder = tokenizer.stream_decoder()
    assert "".join(decoder.step(i) for i in ids) == "a"
    assert decoder.flush() == tokenizer.decode(ids)[1:]
    assert decoder.text == tokenizer.decode(ids)


def test_each_step_decodes_a_short_window_not_the_whole_sequence():
    backend = byte_level()
    lengths: list[int] = []

    class Recording:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            lengths.append(len(ids))
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = backend.encode("流式解码😀 streaming " * 100).ids
    assert len(ids) > 2000
    assert "".join(stream(IncrementalDecoder(Recording()), ids)) == backend.decode(ids)
    assert max(lengths) <= 2 * MAX_PENDING_TOKENS


def test_decoder_accepts_tensor_like_ids(tokenizer):
    torch = pytest.importorskip("torch")
    ids = tokenizer.encode("中文")
    decoder = tokenizer.stream_decoder()
    assert "".join(decoder.step(t) for t in torch.tensor(ids)) == "中文"


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_streaming_matches_full_decode_for_any_text(text):
    assume(not any(special in text for special in SPECIALS))  # those decode to "" (skipped)
    backend = byte_level(merges_for=tuple(TEXTS))
    ids = backend.encode(text).ids
    pieces = stream(IncrementalDecoder(backend), ids)
    assert "".join(pieces) == backend.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces if "\ufffd" not in text)
