"""Perplexity and bits per byte through `astrai eval --tasks ppl:FILE` equal a hand computation
(one plain forward per window, the document conditioned on eos), per language, for JSONL, text
and prepared HDF5 files; and the held-out task of `astrai eval` is the quickstart's."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from eval_helpers import continuation_logprob, make_model_dir, train_tokenizer
from typer.testing import CliRunner

from astrai_core import AutoModel, AutoTokenizer
from astrai_core.cli.main import app
from astrai_data import save_h5, synthesize
from astrai_train.evaluation import HeldOutSet, preference_gaps, preference_scores, score_model
from astrai_train.evaluation.scoring import rolling_windows
from astrai_train.rl.rewards import build_reward
from tolerances import forward_bound

N_LAYERS, WIDTH = 2, 176  # the tiny preset
WINDOW = 32  # the model's context window: the long document below needs several
runner = CliRunner()
DOCS = [
    {"text": "The capital of France is Paris.", "lang": "en"},
    {"text": "北京是中国的首都。", "lang": "zh"},
    {"text": "Water boils at one hundred degrees. " * 8, "lang": "en"},  # > WINDOW tokens
    {"text": "二加三等于五，四加四等于八。", "lang": "zh"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    return make_model_dir(root / "model", train_tokenizer(root), seed=5, max_seq_len=WINDOW)


@pytest.fixture(scope="module")
def model(folder):
    return AutoModel.from_pretrained(folder, dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder)


def by_hand(model, tokens: list[int], eos: int) -> tuple[float, float]:
    """(NLL of the document given eos, its error bound): a plain forward per window."""
    nll, bound = 0.0, 0.0
    for inputs, targets in rolling_windows(tokens, eos, WINDOW):
        first = len(inputs) - len(targets)
        logp, _, scale = continuation_logprob(model, inputs[:first + 1], targets)
        nll -= logp
        bound += 2 * len(targets) * forward_bound(N_LAYERS, WIDTH, scale, torch.float32)
    return nll, bound


def run_ppl(folder, path, out):
    result = runner.invoke(app, ["eval", str(folder), "--tasks", f"ppl:{path}", "--out", str(out),
                                 "--dtype", "float32", "--no-progress"], catch_exceptions=True)
    assert result.exit_code == 0, result.output + repr(result.exception)
    model = json.loads((out / "results.json").read_text())["models"][0]
    return ({(s["metric"], s["lang"]): s["value"] for s in model["scores"]},
            model["raw"][f"ppl:{path.name}"])


def test_perplexity_and_bits_per_byte_equal_a_hand_computation(folder, model, tokenizer,
                                                               tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS), "utf-8")
    scores, raw = run_ppl(folder, path, tmp_path / "out")
    expected = {}
    for lang in ("all", "en", "zh"):
        docs = [d for d in DOCS if lang in ("all", d["lang"])]
        tokens = [tokenizer.encode(d["text"]) for d in docs]
        hand = [by_hand(model, t, tokenizer.eos_id) for t in tokens]
        nll, bound = sum(h[0] for h in hand), sum(h[1] for h in hand)
        n_tokens = sum(len(t) for t in tokens)
        n_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
        assert raw[lang]["tokens"] == n_tokens and raw[lang]["bytes"] == n_bytes
        assert raw[lang]["docs"] == len(docs)
        assert abs(raw[lang]["nll"] - nll) <= bound
        expected[("ppl", lang)] = math.exp(raw[lang]["nll"] / n_tokens)
        expected[("bpb", lang)] = raw[lang]["nll"] / (math.log(2) * n_bytes)
    assert scores == pytest.approx(expected, rel=1e-12)
    assert any(len(tokenizer.encode(d["text"])) > WINDOW for d in DOCS)


def test_a_text_file_is_one_document(folder, model, tokenizer, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("猫和狗是动物。Cats and dogs are animals.\n", encoding="utf-8")
    scores, raw = run_ppl(folder, path, tmp_path / "out")
    nll, bound = by_hand(model, tokenizer.encode(path.read_text("utf-8")), tokenizer.eos_id)
    assert set(scores) == {("ppl", "all"), ("bpb", "all")}
    assert abs(raw["all"]["nll"] - nll) <= bound
    assert raw["all"]["bytes"] == len(path.read_bytes())


def test_a_prepared_file_is_scored_document_by_document(folder, model, tokenizer, tmp_path):
    docs = [tokenizer.encode(d["text"]) for d in DOCS[:2]]
    stream = np.array(docs[0] + [tokenizer.eos_id] + docs[1] + [tokenizer.eos_id])
    path = save_h5(tmp_path / "seq.h5", "seq", {"sequence": stream},
                   tokenizer_fingerprint=tokenizer.fingerprint())
    _, raw = run_ppl(folder, path, tmp_path / "out")
    hand = [by_hand(model, d, tokenizer.eos_id) for d in docs]
    assert raw["all"]["docs"] == 2 and raw["all"]["tokens"] == sum(map(len, docs))
    assert raw["all"]["bytes"] == sum(len(tokenizer.decode(d).encode("utf-8")) for d in docs)
    assert abs(raw["all"]["nll"] - sum(h[0] for h in hand)) <= sum(h[1] for h in hand)


def test_a_file_of_another_tokenizer_or_without_text_fails_with_one_line(folder, tmp_path):
    other = save_h5(tmp_path / "other.h5", "seq", {"sequence": np.arange(5, 50)},
                    tokenizer_fingerprint="0" * 64)
    result = runner.invoke(app, ["eval", str(folder), "--tasks", f"ppl:{other}", "--out",
                                 str(tmp_path / "o1")], catch_exceptions=True)
    assert "prepare the data again with this tokenizer" in str(result.exception)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text field"}\n')
    result = runner.invoke(app, ["eval", str(folder), "--tasks", f"ppl:{bad}", "--out",
                                 str(tmp_path / "o2")], catch_exceptions=True)
    assert 'bad.jsonl:1: a perplexity record needs a "text" string' in str(result.exception)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_the_heldout_task_is_the_quickstart_s_scoring(folder, tmp_path):
    folder = make_model_dir(tmp_path / "chat", folder, seed=6, max_seq_len=256)  # chats are long
    model = AutoModel.from_pretrained(folder, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpus = tmp_path / "corpus"
    synthesize(corpus, size=40, eval_per_lang=3)
    result = runner.invoke(app, ["eval", str(folder), "--tasks", f"heldout:{corpus}", "--out",
                                 str(tmp_path / "out"), "--dtype", "float32", "--max-tokens", "8",
                                 "--no-progress"], catch_exceptions=True)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    got = {(s["metric"], s["lang"]): s["value"] for s in report["models"][0]["scores"]}
    direct = score_model("model", model, tokenizer, HeldOutSet.load(corpus),
                         build_reward("exact_answer,format"), 8)
    for metric in ("loss", "accuracy", "preference", "reward"):
        for lang, value in getattr(direct, metric).items():
            assert got[(metric, lang)] == value, (metric, lang)
    assert {lang for _, lang in got} == {"en", "zh"}


def test_a_reference_s_gaps_give_the_margins_the_reference_gives(folder, tmp_path):
    """The quickstart scores the SFT model's log-prob gaps once and reuses them for the DPO
    and GRPO rows: the same numbers as scoring the reference each time."""
    policy = AutoModel.from_pretrained(make_model_dir(tmp_path / "p", folder, seed=3, max_seq_len=256),
                                       dtype="float32")
    reference = AutoModel.from_pretrained(make_model_dir(tmp_path / "r", folder, seed=4,
                                                         max_seq_len=256), dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    synthesize(tmp_path / "corpus", size=40, eval_per_lang=4)
    pairs = HeldOutSet.load(tmp_path / "corpus").pairs
    by_model = preference_scores(policy, tokenizer, pairs, reference, beta=0.2)
    gaps = preference_gaps(reference, tokenizer, pairs)
    assert preference_scores(policy, tokenizer, pairs, beta=0.2, reference_gaps=gaps) == by_model
    assert set(by_model[1]) == {"en", "zh"} and any(v != 0 for v in by_model[1].values())
