"""Reading and writing tokenizer folders in the Hugging Face layout.

    tokenizer.json          the `tokenizers` pipeline: vocabulary, merges, pre-tokenizer, decoder
    tokenizer_config.json   named special tokens (bos_token, eos_token, ...) and `chat_template`
    chat_template.jinja     the chat template, where recent `transformers` versions put it instead
    generation_config.json  (read only) `eos_token_id`: every id generation stops on
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from astrai_core.atomic import atomic_file

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass
class TokenizerFolder:
    """What a tokenizer folder holds, parsed."""

    tokenizer: Tokenizer
    config: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    generation_eos_ids: list[int] = field(default_factory=list)


def read_folder(path: str | os.PathLike[str]) -> TokenizerFolder:
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: tokenizer folder not found; train one with "
                                "`astrai tokenizer train` or pass a model folder")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; pass the folder that holds {TOKENIZER_FILE}")
    tokenizer_file = folder / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no {TOKENIZER_FILE}; AstrAI reads the fast-tokenizer format. Train one with "
            "`astrai tokenizer train`, or convert a slow tokenizer once with transformers: "
            "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # the Rust parser raises a bare Exception
        raise ValueError(f"{tokenizer_file} could not be parsed: {exc}") from exc
    config = _read_json(folder / CONFIG_FILE)
    return TokenizerFolder(
        tokenizer=tokenizer,
        config=config,
        chat_template=_read_template(folder, config),
        generation_eos_ids=_generation_eos_ids(folder / GENERATION_CONFIG_FILE),
    )


def write_folder(path: str | os.PathLike[str], tokenizer_json: str, config: dict[str, Any]) -> None:
    """Write the tokenizer files into `path`, each atomically (temp file + rename), leaving other
    files (a model's config.json and weights) alone: a tokenizer is often saved into a model folder."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; save_pretrained needs a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / TOKENIZER_FILE, tokenizer_json)
    _atomic_write(folder / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    template = config.get("chat_template")
    if (folder / TEMPLATE_FILE).exists() and isinstance(template, str):
        # transformers prefers this file over the config entry: keep the two from disagreeing.
        _atomic_write(folder / TEMPLATE_FILE, template)


def _atomic_write(target: Path, text: str) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _read_template(folder: Path, config: dict[str, Any]) -> str | None:
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        chosen = by_name.get("default") or next(iter(by_name.values()), None)
        if isinstance(chosen, str):
            return chosen
    raise ValueError(f"{folder / CONFIG_FILE}: 'chat_template' should be a string or a list of "
                     "{'name': ..., 'template': ...} objects")


def _generation_eos_ids(path: Path) -> list[int]:
    value = _read_json(path).get("eos_token_id")
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []
