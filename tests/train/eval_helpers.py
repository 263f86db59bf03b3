"""Shared pieces of the evaluation tests: a byte-level BPE tokenizer trained on English and
Chinese text, tiny model folders with random weights, and a bilingual multiple-choice set with
its lm-eval task YAML over local files (nothing reaches the network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from astrai_core import AutoTokenizer, Transformer, get_preset

CORPUS = [
    "The capital of France is Paris. ",
    "Water boils at one hundred degrees. ",
    "Two plus three makes five, and four plus four makes eight. ",
    "Cats and dogs are animals; oak and pine are trees. ",
    "北京是中国的首都。水在一百度沸腾。 ",
    "二加三等于五，四加四等于八。 ",
    "猫和狗是动物，松树和橡树是树。 ",
]

MC_RECORDS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "Rome", "oak"],
     "answer": 0, "lang": "en"},
    {"question": "Water boils at one hundred", "choices": ["trees", "degrees", "cats", "five"],
     "answer": 1, "lang": "en"},
    {"question": "Two plus three makes", "choices": ["eight", "four", "five", "Paris"],
     "answer": 2, "lang": "en"},
    {"question": "Cats and dogs are", "choices": ["trees", "numbers", "cities", "animals"],
     "answer": 3, "lang": "en"},
    {"question": "Oak and pine are", "choices": ["trees", "animals", "degrees", "eight"],
     "answer": 0, "lang": "en"},
    {"question": "北京是中国的", "choices": ["首都", "动物", "树", "五"], "answer": 0,
     "lang": "zh"},
    {"question": "二加三等于", "choices": ["八", "五", "首都", "树"], "answer": 1, "lang": "zh"},
    {"question": "猫和狗是", "choices": ["树", "首都", "动物", "八"], "answer": 2, "lang": "zh"},
    {"question": "四加四等于", "choices": ["五", "树", "动物", "八"], "answer": 3, "lang": "zh"},
    {"question": "水在一百度", "choices": ["沸腾", "首都", "动物", "五"], "answer": 0,
     "lang": "zh"},
]

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def train_tokenizer(root: Path) -> Path:
    from astrai_core.tokenizer import train_tokenizer as train

    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20) + "\n", encoding="utf-8")
    train([corpus], 400, root / "tok", min_frequency=2, held_out=[], show_progress=False)
    return root / "tok"


def make_model_dir(folder: Path, tokenizer_dir: Path, seed: int, max_seq_len: int = 128,
                   init_std: float = 0.2) -> Path:
    """A tiny model with wide random weights (log-likelihoods that differ clearly between
    answers) and its tokenizer, as `astrai model init --tokenizer` writes it."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = get_preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len,
                        init_std=init_std)
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_mc_task(folder: Path, name: str = "bilingual_mc") -> Path:
    """The multiple-choice records as JSONL and a task YAML over that file."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in MC_RECORDS),
                    encoding="utf-8")
    yaml = folder / f"{name}.yaml"
    yaml.write_text(TASK_YAML.format(name=name, data=data), encoding="utf-8")
    return yaml


@torch.no_grad()
def continuation_logprob(model: torch.nn.Module, context: list[int], continuation: list[int]
                         ) -> tuple[float, bool, float]:
    """Reference: one plain fp32 forward of context + continuation; the summed log-softmax of
    the continuation's tokens, whether each is the argmax, and the largest |logit| (the scale
    of tests/tolerances.py's forward_bound)."""
    logits = model(torch.tensor([context + continuation[:-1]]))[0].float()
    logp = logits.double().log_softmax(-1)
    total, greedy = 0.0, True
    for j, token in enumerate(continuation):
        row = logp[len(context) - 1 + j]
        total += float(row[token])
        greedy = greedy and int(row.argmax()) == token
    return total, greedy, float(logits.abs().max())
