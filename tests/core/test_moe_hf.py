"""Hugging Face `qwen3_moe` and `mixtral` folders: logits equal to transformers (fp32, the bound
of test_model_parity.py), exports in those layouts that transformers loads with our logits, and
one clear line for what a folder or a model holds that the other side cannot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from astrai_core.cli.main import app
from astrai_core.export import export_gguf, export_hf, load_source
from astrai_core.model import AutoModel, ModelConfig, Transformer
from astrai_core.tokenizer import AutoTokenizer, train_tokenizer
from tolerances import forward_bound

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            max_position_embeddings=128, rms_norm_eps=1e-6, num_attention_heads=4,
            num_key_value_heads=2)
CASES = {
    # name: (config class, model class, extra config fields)
    "qwen3-moe-dense-first-normalised": (
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40, mlp_only_layers=[0],
             norm_topk_prob=True, head_dim=24, tie_word_embeddings=False, rope_theta=1e6)),
    "qwen3-moe-raw-top3-tied": (
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24, norm_topk_prob=False,
             head_dim=16, tie_word_embeddings=True, attention_bias=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
}


def make_hf_model(name: str, folder: Path):
    config_cls, model_cls, extra = CASES[name]
    fields = dict(BASE, **extra)
    if "rope_theta" in fields:  # transformers 5 reads rope parameters from one dict
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
    config = getattr(transformers, config_cls)(**fields)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norms, biases and a spread router: every parameter matters
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.normal_(0.0, 0.3).add_(1.0 if "norm" in pname else 0.0)
            elif pname.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return make_hf_model(request.param, folder), AutoModel.from_pretrained(folder), folder


def _bound(expected: torch.Tensor) -> float:
    width = max(BASE["hidden_size"], BASE["intermediate_size"])
    return forward_bound(BASE["num_hidden_layers"], width, scale=expected.abs().max().item(),
                         dtype=torch.float32)


@pytest.mark.parametrize("seq_len", [1, 7, 33])
def test_logits_match_transformers(pair, seq_len):
    hf_model, ours, _ = pair
    ids = torch.randint(0, BASE["vocab_size"], (2, seq_len),
                        generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() <= _bound(expected)


def test_padded_batch_matches_transformers(pair):
    hf_model, ours, _ = pair
    ids = torch.randint(0, BASE["vocab_size"], (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, 8:] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf_model(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, input_mask=mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= _bound(expected[real])


def test_the_config_maps_onto_our_moe_fields(pair):
    hf_model, ours, _ = pair
    hf, c = hf_model.config, ours.config
    assert c.n_experts == hf.num_local_experts  # qwen3_moe: num_experts, an alias of it
    assert c.n_experts_per_token == hf.num_experts_per_tok
    assert c.dim_expert == getattr(hf, "moe_intermediate_size", hf.intermediate_size)
    assert c.norm_topk_prob == getattr(hf, "norm_topk_prob", True)
    assert c.n_dense_layers == len(getattr(hf, "mlp_only_layers", None) or [])
    assert c.n_shared_experts == 0 and c.router_scoring == "softmax"


def test_model_info_counts_all_and_active_parameters(pair):
    hf_model, ours, folder = pair
    result = CliRunner().invoke(app, ["model", "info", str(folder)])
    assert result.exit_code == 0, result.output
    total = ours.num_parameters()
    assert hf_model.num_parameters() == total
    c = ours.config
    moe_layers = c.n_layers - c.n_dense_layers
    active = total - moe_layers * (c.n_experts - c.n_experts_per_token) * 3 * c.dim * c.dim_expert
    assert f"{total:,}" in result.output and f"{active:,} per token" in result.output


# -- folders AstrAI cannot hold -----------------------------------------------------------------
def test_missing_expert_tensor_names_it_and_the_folder(tmp_path):
    make_hf_model("mixtral", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lack 'model\.layers\.1\.block_sparse_moe\.experts\.2"
                                         r"\.w3\.weight'.*4 experts in layer 1") as error:
        AutoModel.from_pretrained(tmp_path)
    assert str(tmp_path) in str(error.value)


def _write_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_dense_layers_that_do_not_lead_are_refused(tmp_path):
    make_hf_model("qwen3-moe-raw-top3-tied", tmp_path)
    _write_config(tmp_path, mlp_only_layers=[1])
    with pytest.raises(ValueError, match=r"makes layers \[1\] dense.*only leading layers"):
        AutoModel.from_pretrained(tmp_path)


def test_a_sliding_window_shorter_than_the_context_is_refused(tmp_path):
    make_hf_model("mixtral", tmp_path)
    _write_config(tmp_path, sliding_window=32)
    with pytest.raises(ValueError, match="sliding_window 32, below its context of 128 tokens"):
        AutoModel.from_pretrained(tmp_path)


# -- export -------------------------------------------------------------------------------------
OURS = dict(vocab_size=320, dim=64, n_layers=3, dim_ffn=96, max_seq_len=128, n_heads=4,
            n_kv_heads=2, n_experts=4, n_experts_per_token=2, dim_expert=32)
EXPORTS = {
    # name: (config fields, the family it exports to)
    "qk-norm-dense-first": (dict(use_qk_norm=True, n_dense_layers=1, tie_weight=False), "qwen3_moe"),
    "qk-norm-raw-weights": (dict(use_qk_norm=True, norm_topk_prob=False), "qwen3_moe"),
    "no-qk-norm": (dict(tie_weight=False), "mixtral"),
}
CORPUS = ["The quick brown fox jumps over the lazy dog. ", "小模型也可以在普通电脑上运行。 "]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text("\n".join(CORPUS * 30) + "\n", encoding="utf-8")
    train_tokenizer([root / "corpus.txt"], 300, root / "tok", show_progress=False, held_out=[])
    return root / "tok"


def make_model_dir(folder: Path, tokenizer_dir: Path, **fields) -> Path:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**OURS, **fields})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3).add_(1.0)
            elif name.endswith("gate.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers_with_our_logits_and_round_trips(name, tmp_path, tokenizer_dir):
    fields, family = EXPORTS[name]
    folder = make_model_dir(tmp_path / "ours", tokenizer_dir, **fields)
    assert export_hf(load_source(folder), tmp_path / "hf") == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.model_type == family
    ours = AutoModel.from_pretrained(folder)
    ids = torch.randint(5, OURS["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    bound = forward_bound(OURS["n_layers"], OURS["dim_ffn"], scale=expected.abs().max().item(),
                          dtype=torch.float32)
    assert (got - expected).abs().max().item() <= bound
    back = AutoModel.from_pretrained(tmp_path / "hf")
    keep = ("n_experts", "n_experts_per_token", "dim_expert", "n_dense_layers", "norm_topk_prob",
            "router_scoring", "n_shared_experts", "use_qk_norm")
    assert {k: getattr(back.config, k) for k in keep} == {k: getattr(ours.config, k) for k in keep}
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("fields", "named"), [
    (dict(use_qk_norm=True, n_shared_experts=1), "n_shared_experts 1"),
    (dict(use_qk_norm=True, router_scoring="sigmoid"), "router_scoring 'sigmoid'"),
    (dict(n_dense_layers=1), "dense leading layers without qk-norm"),
])
def test_export_refuses_what_qwen3_moe_and_mixtral_cannot_hold(fields, named, tmp_path,
                                                              tokenizer_dir):
    folder = make_model_dir(tmp_path / "m", tokenizer_dir, **fields)
    source = load_source(folder)
    with pytest.raises(ValueError, match=named):
        export_hf(source, tmp_path / "hf")
    with pytest.raises(ValueError, match="mixture-of-experts feed-forward"):
        export_gguf(source, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing written, no temporaries


def test_export_refuses_learnt_balancing_biases(tmp_path, tokenizer_dir):
    folder = make_model_dir(tmp_path / "m", tokenizer_dir, use_qk_norm=True)
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        model.layers[2].mlp.gate.e_score_correction_bias[1] = 0.01
    model.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"balancing biases.*layers\.2.*--moe-bias-update-rate 0"):
        export_hf(load_source(folder), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
