"""`train_tokenizer`: a bilingual (English and Chinese) byte-level BPE, trained by `tokenizers`.

Pre-tokenization, in order:
1. every digit is its own piece, so numbers tokenize the same way wherever they appear
   (arithmetic needs "12" + "3" and "123" to share their digit tokens);
2. every CJK character is its own piece, so a merge never joins two characters, nor a
   character and a Latin word ("用Python写"). Chinese then tokenizes the same way in any
   phrasing: on a small corpus BPE otherwise learns whole phrases as single tokens
   ("樱桃是什么颜色" was one token, "樱桃的颜色" another), and a model trained on one
   phrasing of a question cannot read another (held-out Chinese accuracy 0% on questions whose
   words it knew). A character is the unit a Chinese reader composes meaning from;
3. byte-level with the GPT-2 word pattern, so any text (any script, emoji, stray bytes) round-trips.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from astrai_core.tokenizer.chat_template import DEFAULT_CHAT_TEMPLATE
from astrai_core.tokenizer.corpus import CorpusStats, HoldOut, check_inputs, iter_batches
from astrai_core.tokenizer.hf_folder import TOKENIZER_FILE
from astrai_core.tokenizer.special_tokens import BOS_TOKEN, DEFAULT_NAMED_TOKENS, SPECIAL_TOKENS
from astrai_core.tokenizer.tokenizer import AutoTokenizer

# One Han, kana or Hangul character: scripts written without spaces between words.
CJK_CHAR = r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]"
CJK_RUN = CJK_CHAR  # its former name (a run of them), still read by the GGUF export
_CJK_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_LATIN_CHAR = re.compile(r"[A-Za-z]")
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256 + 1  # special tokens, the 256 bytes, one merge


@dataclass
class TrainingReport:
    """What `train_tokenizer` produced; `compression` is characters per token on held-out text."""

    out_dir: Path
    vocab_size: int
    requested_vocab_size: int
    train_texts: int
    train_bytes: int
    held_out_texts: int
    seconds: float
    compression: dict[str, float] = field(default_factory=dict)


def build_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split(Regex(CJK_CHAR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE pipeline with our pre-tokenization and decoder."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = build_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(files: Sequence[Path], vocab_size: int, out_dir: Path, *, min_frequency: int = 2,
                    held_out: Sequence[str] | None = None, held_out_every: int = 50,
                    max_held_out: int = 2000, chat_template: str | None = None,
                    show_progress: bool = True, overwrite: bool = False,
                    console: Console | None = None) -> TrainingReport:
    """Train on `files` (streamed, in order: the same inputs give the same tokenizer) and save
    a tokenizer folder to `out_dir`.

    Unless `held_out` texts are given, every `held_out_every`-th text (up to `max_held_out`) is
    kept out of training and used to measure compression per language.
    """
    started = time.perf_counter()
    paths = _check_arguments(files, vocab_size, out_dir, min_frequency, overwrite)
    hold_out = HoldOut(every=0 if held_out is not None else held_out_every, limit=max_held_out)
    stats = CorpusStats()
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    with _progress(paths, show_progress, console) as advance:
        tokenizer.train_from_iterator(iter_batches(paths, hold_out, stats, advance), trainer=trainer)
    if stats.texts == 0:
        raise ValueError(f"no training text in {', '.join(map(str, paths))}; the files are empty")
    _add_bos_processor(tokenizer)
    result = AutoTokenizer(tokenizer, special_tokens=DEFAULT_NAMED_TOKENS,
                           chat_template=chat_template or DEFAULT_CHAT_TEMPLATE, name=str(out_dir))
    result.save_pretrained(out_dir)
    sample = list(held_out) if held_out is not None else hold_out.lines
    return TrainingReport(
        out_dir=Path(out_dir), vocab_size=result.vocab_size, requested_vocab_size=vocab_size,
        train_texts=stats.texts, train_bytes=stats.bytes, held_out_texts=len(sample),
        seconds=time.perf_counter() - started, compression=compression_by_language(result, sample),
    )


def _check_arguments(files: Sequence[Path], vocab_size: int, out_dir: Path, min_frequency: int,
                     overwrite: bool) -> list[Path]:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
                         f"{MIN_VOCAB_SIZE} ({len(SPECIAL_TOKENS)} special tokens, 256 bytes, 1 merge)")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")
    if (Path(out_dir) / TOKENIZER_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a tokenizer; pass --overwrite (overwrite=True) "
                              "to replace it, or choose another --out")
    return check_inputs(files)


def _add_bos_processor(tokenizer: Tokenizer) -> None:
    """`encode(..., add_special_tokens=True)` prepends bos; kept in tokenizer.json so that
    transformers does the same with our folders."""
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1", special_tokens=[(BOS_TOKEN, bos_id)],
    )


@contextmanager
def _progress(paths: Sequence[Path], enabled: bool, console: Console | None
              ) -> Iterator[Callable[[int], None] | None]:
    """A bytes-read progress bar; the trainer's merge phase runs after reading ends."""
    if not enabled:
        yield None
        return
    total = sum(p.stat().st_size for p in paths)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeElapsedColumn(),
                  console=console or Console(stderr=True)) as progress:
        task = progress.add_task("reading corpus", total=total)

        def advance(size: int) -> None:
            progress.advance(task, size)
            if progress.tasks[task].completed >= total:
                progress.update(task, description="computing merges")

        yield advance


def language_of(text: str) -> str | None:
    """"Chinese" or "English" by which script has more characters; None if neither appears."""
    cjk = len(_CJK_CHAR.findall(text))
    latin = len(_LATIN_CHAR.findall(text))
    if cjk == 0 and latin == 0:
        return None
    return "Chinese" if cjk >= latin else "English"


def compression_by_language(tokenizer: AutoTokenizer, texts: Sequence[str]) -> dict[str, float]:
    """Characters per token for each language among `texts` (higher means better compression)."""
    by_language: dict[str, list[str]] = {}
    for text in texts:
        language = language_of(text)
        if language is not None:
            by_language.setdefault(language, []).append(text)
    result = {}
    for language, group in sorted(by_language.items()):
        tokens = sum(len(ids) for ids in tokenizer.encode_batch(group))
        result[language] = sum(map(len, group)) / max(tokens, 1)
    return result
