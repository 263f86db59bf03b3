"""Several LoRA adapters served beside their base (`astrai serve BASE --lora NAME=DIR`): greedy
output per adapter, with requests for two adapters and the base sharing batches, equals each
merged model served alone, token for token; the prefix cache never shares K/V across adapters;
the HTTP API picks by `model` and lists the adapters; bad adapters fail in one line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from api_helpers import LiveServer, model_folder
from serve_helpers import assert_no_pages_held, random_prompts
from typer.testing import CliRunner

from astrai_core.cli.main import app as cli_app
from astrai_core.model import ModelConfig, Transformer
from astrai_core.model.adapter import ADAPTER_CONFIG, LoRAAdapter
from astrai_core.model.lora import LoRAConfig, apply_lora, lora_layers, merge_lora
from astrai_serve import InferenceEngine, SamplingParams
from astrai_serve.adapters import (
    PerRowLoRA,
    ServedAdapters,
    UnknownAdapterError,
    parse_lora_option,
)
from astrai_serve.api import ServerConfig, create_app
from astrai_serve.kvcache import PrefixCache
from astrai_serve.quantize import prepare_model

# fp64: the bank adds (x A^T) B^T where the merged model multiplies by W + B A; in fp64 the
# two round far below any gap between the two best logits, so greedy tokens must agree.
FIELDS = dict(vocab_size=96, dim=32, n_layers=2, dim_ffn=64, n_heads=4, n_kv_heads=2,
              max_seq_len=128)
# Adapter "kv" changes K/V directly (and so what the prefix cache holds); "mlp" changes them
# from the second layer on, through the residual stream, with another rank and scaling.
ADAPTERS = {"kv": (LoRAConfig(rank=4, targets=("q_proj", "k_proj", "v_proj")), 1),
            "mlp": (LoRAConfig(rank=2, alpha=8, targets=("o_proj", "gate_proj", "down_proj")), 2)}
NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)


def base_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**FIELDS, **overrides})).double().eval()
    with torch.no_grad():  # wide weights: greedy outputs vary instead of repeating one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def save_adapter(base: torch.nn.Module, config: LoRAConfig, seed: int, out: Path) -> Path:
    """A trained adapter's stand-in: `config` on a copy of `base`, B random."""
    tuned = copy.deepcopy(base)
    apply_lora(tuned, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(tuned).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g,
                                                  dtype=layer.lora_B.weight.dtype) * 0.3)
    return LoRAAdapter.from_model(tuned).save(out)


def merged(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """What `astrai model merge-lora` computes: the adapter folded into a copy of the base."""
    return merge_lora(LoRAAdapter.load(folder).apply_to(copy.deepcopy(base)))


@pytest.fixture(scope="module")
def base() -> Transformer:
    return base_model()


@pytest.fixture(scope="module")
def folders(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_adapter(base, cfg, seed, root / name)
            for name, (cfg, seed) in ADAPTERS.items()}


def served_engine(base, folders, **options) -> InferenceEngine:
    model = copy.deepcopy(base)
    return InferenceEngine(model, adapters=ServedAdapters.load(model, folders), **options)


def record_batches(engine: InferenceEngine) -> list[set[int]]:
    """The adapter ids of the requests in every forward from now on."""
    seen: list[set[int]] = []
    run = engine.scheduler.runner.run

    def recording(batch):
        seen.append({t.adapter for t, _ in batch.scheduled()})
        return run(batch)

    engine.scheduler.runner.run = recording
    return seen


@pytest.mark.parametrize("options", [dict(page_size=4), dict(page_size=4, max_num_tokens=8,
                                                            max_batch_size=6)],
                         ids=["one-step-prefill", "chunked-prefill"])
def test_greedy_per_adapter_in_shared_batches_equals_each_merged_model(base, folders, options):
    prompts = random_prompts([3, 17, 9, 30], seed=1, low=5)
    prompts = [[t % FIELDS["vocab_size"] for t in p] for p in prompts]
    names = [None, *folders]
    expected = {}
    for name in names:
        alone = base if name is None else merged(base, folders[name])
        with InferenceEngine(alone, page_size=4) as engine:
            expected[name] = [r.token_ids for r in engine.generate_ids(prompts, GREEDY)]
    assert expected["kv"] != expected[None] and expected["mlp"] != expected[None]
    assert expected["kv"] != expected["mlp"]

    with served_engine(base, folders, **options) as engine:
        batches = record_batches(engine)
        jobs = [(name, i) for i in range(len(prompts)) for name in names]
        params = [SamplingParams(max_tokens=NEW_TOKENS, temperature=0, adapter=name)
                  for name, _ in jobs]
        results = engine.submit_many([prompts[i] for _, i in jobs], params)
        got = {(name, i): r.wait_completion().token_ids for (name, i), r in zip(jobs, results,
                                                                                 strict=True)}
        assert_no_pages_held(engine)
    assert any(len(ids) == 3 for ids in batches), batches  # base and both adapters, one forward
    for name, i in jobs:
        assert got[name, i] == expected[name][i], (name, i)


def test_the_prefix_cache_is_never_shared_across_adapters(base, folders):
    prompt = [(7 * i + 3) % FIELDS["vocab_size"] for i in range(21)]
    with served_engine(base, folders, page_size=4) as engine:

        def run(name):
            params = SamplingParams(max_tokens=6, temperature=0, adapter=name)
            return engine.submit(prompt, params).wait_completion()

        first = run("kv")
        again = run("kv")
        assert first.cached_tokens == 0 and again.cached_tokens == 20  # the same adapter hits
        assert again.token_ids == first.token_ids
        others = {name: run(name) for name in ("mlp", None)}
        for name, result in others.items():
            assert result.cached_tokens == 0, name  # same tokens, other weights: no hit
            assert result.token_ids != first.token_ids, name
        with InferenceEngine(merged(base, folders["mlp"]), page_size=4) as alone:
            assert others["mlp"].token_ids == alone.submit(
                prompt, SamplingParams(max_tokens=6, temperature=0)).wait_completion().token_ids
        assert_no_pages_held(engine)


def test_prefix_cache_namespaces_keep_equal_tokens_apart():
    cache = PrefixCache(page_size=2)
    assert cache.record(5, [1, 2], namespace=1) and cache.record(6, [3, 4], parent=5, namespace=1)
    assert cache.lookup([1, 2, 3, 4], namespace=1) == [5, 6]
    assert cache.lookup([1, 2, 3, 4]) == [] and cache.lookup([1, 2, 3, 4], namespace=2) == []
    assert cache.record(7, [1, 2])  # the base's copy of the same tokens is its own page
    assert cache.lookup([1, 2, 3, 4]) == [7]


def test_unknown_adapter_names_are_refused_with_the_served_names(base, folders):
    with served_engine(base, folders) as engine:
        assert engine.adapter_names == ("kv", "mlp")
        with pytest.raises(UnknownAdapterError, match="no LoRA adapter named 'sql' is served; "
                                                      "the adapters are kv, mlp"):
            engine.submit([1, 2, 3], SamplingParams(adapter="sql"))
    with InferenceEngine(base) as plain, pytest.raises(ValueError, match="base model alone"):
        plain.submit([1, 2, 3], SamplingParams(adapter="kv"))


def test_adapters_of_another_base_are_refused_naming_the_adapter(base, tmp_path):
    wider = save_adapter(base_model(dim=48, n_heads=4), ADAPTERS["kv"][0], 1, tmp_path / "wide")
    deeper = save_adapter(base_model(n_layers=3), ADAPTERS["mlp"][0], 1, tmp_path / "deep")
    cases = {wider: r"adapter 'w': layers.0.self_attn.k_proj has LoRA factors \(4, 48\) .* "
                    r"rank 4 on this base needs \(4, 32\)",
             deeper: "adapter 'w' adapts layers.2.* not a linear layer of this base model"}
    for folder, message in cases.items():
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=message):
            ServedAdapters.load(model, {"w": folder})
    with pytest.raises(FileNotFoundError, match="adapter 'w': .* is not a LoRA adapter folder"):
        ServedAdapters.load(copy.deepcopy(base), {"w": tmp_path})


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_adapters_wrap_the_serving_kernels(model, quantize, tmp_path):
    """After `prepare_model` the layers are oneDNN-packed or int8 (no `.weight`): the adapters
    wrap them as they are, and still change the output."""
    folder = save_adapter(model, ADAPTERS["kv"][0], 1, tmp_path / "kv")
    with pytest.raises(ValueError, match="fuse=False"):  # fused projections have no q_proj
        ServedAdapters.load(prepare_model(copy.deepcopy(model), quantize), {"kv": folder})
    served = prepare_model(copy.deepcopy(model), quantize, fuse=False)
    kernel = type(served.get_submodule("layers.0.self_attn.q_proj"))
    adapters = ServedAdapters.load(served, {"kv": folder})
    wrapped = served.get_submodule("layers.0.self_attn.q_proj")
    assert isinstance(wrapped, PerRowLoRA) and type(wrapped.base) is kernel
    prompt = list(range(5, 25))
    with InferenceEngine(served, adapters=adapters, page_size=4) as engine:
        outs = [engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0, adapter=a))
                for a in (None, "kv")]
        base_ids, kv_ids = (r.wait_completion().token_ids for r in outs)
    assert base_ids != kv_ids


# -- the HTTP API ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(model, tokenizer, tmp_path_factory):
    """The fp32 tiny llama with two adapters, served as 'tiny', 'kv' and 'mlp'."""
    root = tmp_path_factory.mktemp("api-adapters")
    folders = {name: save_adapter(model, cfg, seed, root / name)
               for name, (cfg, seed) in ADAPTERS.items()}
    served = copy.deepcopy(model)  # the session's model stays as it is
    with InferenceEngine(served, tokenizer, page_size=4,
                         adapters=ServedAdapters.load(served, folders)) as engine, \
            LiveServer(create_app(engine, ServerConfig(served_model_name="tiny"))) as server:
        yield engine, server.url


def test_the_api_picks_the_adapter_by_model_and_lists_them(api, tokenizer):
    engine, url = api
    prompt = "The quick brown fox"
    texts = {}
    for name in ("tiny", "kv", "mlp"):
        body = {"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == name
        texts[name] = response.json()["choices"][0]["text"]
        adapter = None if name == "tiny" else name
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, adapter=adapter)
        assert texts[name] == engine.submit(tokenizer.encode(prompt), params,
                                            text=True).wait_completion().text
    assert len(set(texts.values())) == 3
    models = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["parent"]) for m in models["data"]] == [
        ("tiny", "model", None), ("kv", "model", "tiny"), ("mlp", "model", "tiny")]
    assert httpx.get(f"{url}/v1/models/kv", timeout=10).json()["parent"] == "tiny"
    chat = {"model": "sql", "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=10)
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "this server serves 'tiny', 'kv', 'mlp'" in error["message"]
    assert httpx.get(f"{url}/v1/models/sql", timeout=10).status_code == 404


def test_echoed_logprobs_are_scored_with_the_requested_adapter(api):
    _, url = api
    scores = {}
    for name in ("tiny", "kv"):
        body = {"model": name, "prompt": "The quick brown fox", "max_tokens": 0, "echo": True,
                "logprobs": 0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == name
        scores[name] = response.json()["choices"][0]["logprobs"]["token_logprobs"]
    assert scores["tiny"][0] is None and scores["tiny"] != scores["kv"]


# -- the CLI --------------------------------------------------------------------------------

def test_lora_option_forms():
    assert parse_lora_option("sql=runs/a") == ("sql", Path("runs/a"))
    for bad in ("foo", "=runs/a", "sql=", "bad name=runs/a"):
        with pytest.raises(ValueError, match="--lora"):
            parse_lora_option(bad)


def test_serve_refuses_bad_lora_options_before_starting(tmp_path, hf_folder, tokenizer, folders):
    folder = model_folder(tmp_path / "tiny", hf_folder, tokenizer)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    cases = {
        "foo": "write --lora NAME=DIR",
        f"a={tmp_path / 'missing'}": "--lora a: " + str(tmp_path / "missing") + " is not a folder",
        f"a={folder}": "adapter 'a': " + str(folder) + " is not a LoRA adapter folder",
        f"a={tmp_path / 'broken'}": "adapter 'a': " + str(tmp_path / "broken"),
        f"tiny={folders['kv']}": "--lora tiny: the name is already taken by the base model",
    }
    for option, message in cases.items():
        result = CliRunner().invoke(cli_app, ["serve", str(folder), "--lora", option])
        assert result.exit_code == 1 and message in str(result.exception), (option, result)
    twice = ["--lora", f"kv={folders['kv']}", "--lora", f"kv={folders['mlp']}"]
    result = CliRunner().invoke(cli_app, ["serve", str(folder), *twice])
    assert "the name is already taken by another --lora" in str(result.exception)


def test_a_bad_lora_option_is_one_line_without_a_traceback(tmp_path, hf_folder, tokenizer):
    folder = model_folder(tmp_path / "tiny", hf_folder, tokenizer)
    result = subprocess.run([sys.executable, "-m", "astrai_core.cli.main", "serve", str(folder),
                             "--lora", "foo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "write --lora NAME=DIR" in result.stderr and "Traceback" not in result.stderr
