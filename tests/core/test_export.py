"""`astrai model export`: Hugging Face folders that transformers loads with our logits, and GGUF
files whose tensors, shapes and metadata the `gguf` library reads back as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from astrai_core.cli.main import app
from astrai_core.export import export_gguf, export_hf, load_source
from astrai_core.export.gguf import (
    GGUF_TENSORS,
    gguf_pre_tokenizer,
    gguf_tensor_name,
    rope_halves_from_pairs,
    rope_pairs_from_halves,
)
from astrai_core.model import AutoModel, ModelConfig, Transformer
from astrai_core.model.rope import apply_rotary
from astrai_core.tokenizer import AutoTokenizer, train_tokenizer
from tolerances import forward_bound

transformers = pytest.importorskip("transformers")
runner = CliRunner()

BASE = dict(vocab_size=320, dim=64, n_layers=2, dim_ffn=96, max_seq_len=128, n_heads=4, n_kv_heads=2)
CASES = {
    # name: (config fields, the Hugging Face family and the GGUF architecture it maps to)
    "llama-untied": (dict(tie_weight=False), "llama", "llama"),
    "llama-bias": (dict(tie_weight=False, attention_bias=True, attention_out_bias=True,
                        mlp_bias=True, rope_theta=1e6), "llama", "llama"),
    "qwen2-qkv-bias": (dict(tie_weight=True, attention_bias=True), "qwen2", "llama"),
    "qwen3-tied-headdim": (dict(tie_weight=True, use_qk_norm=True, head_dim=24, n_heads=8),
                           "qwen3", "qwen3"),
}
CORPUS = ["The quick brown fox jumps over the lazy dog. ", "Numbers like 12345 split into digits. ",
          "小模型也可以在普通电脑上运行。中文和英文都可以。 ", "Paged attention keeps pages. "]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text("\n".join(CORPUS * 30) + "\n", encoding="utf-8")
    train_tokenizer([root / "corpus.txt"], 300, root / "tok", show_progress=False, held_out=[])
    return root / "tok"


def make_model_dir(folder: Path, tokenizer_dir: Path, **fields) -> Path:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**BASE, **fields})).eval()
    with torch.no_grad():  # random norms and biases, so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0, 0.3).add_(1.0 if "norm" in name else 0.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, tokenizer_dir):
    fields, family, arch = CASES[request.param]
    folder = make_model_dir(tmp_path_factory.mktemp(request.param), tokenizer_dir, **fields)
    return folder, family, arch


def _bound(expected: torch.Tensor, config: ModelConfig) -> float:
    width = max(config.dim, config.dim_ffn)
    return forward_bound(config.n_layers, width, scale=expected.abs().max().item(), dtype=torch.float32)


# -- Hugging Face ---------------------------------------------------------------------------------
def test_hf_export_loads_in_transformers_with_our_logits(case, tmp_path):
    folder, family, _ = case
    source = load_source(folder)
    assert export_hf(source, tmp_path / "hf") == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.model_type == family
    ours = AutoModel.from_pretrained(folder)
    ids = torch.randint(5, BASE["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert (got - expected).abs().max().item() <= _bound(expected, ours.config)


def test_hf_export_carries_the_tokenizer_chat_template_and_stop_ids(case, tmp_path):
    folder, _, _ = case
    export_hf(load_source(folder), tmp_path / "hf")
    ours = AutoTokenizer.from_pretrained(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in CORPUS:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    assert (theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == set(ours.stop_ids)


def test_hf_round_trip_is_exact(case, tmp_path):
    folder, _, _ = case
    export_hf(load_source(folder), tmp_path / "hf")
    before, after = AutoModel.from_pretrained(folder), AutoModel.from_pretrained(tmp_path / "hf")
    fields = ("vocab_size", "dim", "n_layers", "dim_ffn", "n_heads", "n_kv_heads", "resolved_head_dim",
              "max_seq_len", "norm_eps", "rope_theta", "tie_weight", "use_qk_norm",
              "attention_bias", "attention_out_bias", "mlp_bias")
    assert {f: getattr(after.config, f) for f in fields} == {f: getattr(before.config, f) for f in fields}
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("fields", "named"), [
    (dict(attention_type="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
          v_head_dim=8, n_kv_heads=4), "attention_type 'mla'"),
    (dict(use_gated_attention=True), "use_gated_attention"),
])
def test_export_refuses_features_without_an_equivalent_and_writes_nothing(
        fields, named, tmp_path, tokenizer_dir):
    folder = make_model_dir(tmp_path / "m", tokenizer_dir, **fields)
    source = load_source(folder)
    with pytest.raises(ValueError, match=named) as hf_error:
        export_hf(source, tmp_path / "hf")
    assert "Hugging Face" in str(hf_error.value)
    with pytest.raises(ValueError, match=named) as gguf_error:
        export_gguf(source, tmp_path / "m.gguf")
    assert "GGUF" in str(gguf_error.value)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporaries left


# -- GGUF -------------------------------------------------------------------------------------------
gguf = pytest.importorskip("gguf")


def _read(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _as_ours(tensor, name: str, config: ModelConfig, arch: str) -> torch.Tensor:
    """A GGUF tensor back in our layout and fp32, through the export's own mapping."""
    qtype = tensor.tensor_type
    data = gguf.quants.dequantize(tensor.data, qtype) if qtype not in (
        gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else tensor.data
    t = torch.from_numpy(data.astype("float32").copy()).reshape(tuple(reversed(tensor.shape.tolist())))
    if arch == "llama" and ".q_proj." in name:
        t = rope_halves_from_pairs(t, config.n_heads)
    elif arch == "llama" and ".k_proj." in name:
        t = rope_halves_from_pairs(t, config.n_kv_heads)
    return t


# Largest error per element a file type may add to a weight of magnitude |w| (2-D tensors):
# round to nearest in the type's mantissa, or for Q8_0 half a step of the block's scale, where
# scale = max|block| / 127 is itself rounded to fp16.
def _type_bound(file_type: str, w: torch.Tensor) -> torch.Tensor:
    if file_type == "f32":
        return torch.zeros_like(w)
    if file_type == "f16":
        return w.abs() * 2.0**-11 + 2.0**-25
    if file_type == "bf16":
        return w.abs() * 2.0**-8
    blocks = w.reshape(*w.shape[:-1], -1, 32).abs().amax(-1, keepdim=True) / 127
    step = blocks * (1 + 2.0**-11)
    return (step / 2 * (1 + 1e-6) + 127 * blocks * 2.0**-11).expand(*w.shape[:-1], -1, 32).reshape(w.shape)


@pytest.mark.parametrize("file_type", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_reads_back_tensors_shapes_and_metadata(case, file_type, tmp_path):
    folder, _, arch = case
    source = load_source(folder)
    config, tok = source.config, source.tokenizer
    with pytest.warns(UserWarning, match="starcoder"):
        assert export_gguf(source, tmp_path / "m.gguf", file_type) == arch
    fields, tensors = _read(tmp_path / "m.gguf")
    assert fields["general.architecture"] == arch
    expect = {"block_count": config.n_layers, "context_length": config.max_seq_len,
              "embedding_length": config.dim, "feed_forward_length": config.dim_ffn,
              "attention.head_count": config.n_heads, "attention.head_count_kv": config.n_kv_heads,
              "attention.key_length": config.resolved_head_dim, "vocab_size": config.vocab_size,
              "rope.dimension_count": config.resolved_head_dim}
    assert {k: fields[f"{arch}.{k}"] for k in expect} == expect
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(config.rope_theta)
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps)
    assert fields["general.file_type"] == int(getattr(gguf.LlamaFileType, {
        "f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[file_type]))
    # The tokenizer: every id's text, special tokens as control tokens, the merges, the template.
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "starcoder"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == config.vocab_size
    assert all(tokens[i] == tok.id_to_token(i) for i in range(tok.vocab_size))
    assert fields["tokenizer.ggml.token_type"][tok.eos_id] == int(gguf.TokenType.CONTROL)
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_id
    assert fields["tokenizer.chat_template"] == tok.chat_template
    spec = json.loads(tok.backend.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in spec]
    # Tensors: one per parameter (a tied lm_head is not stored), our shapes, our values.
    assert set(tensors) == {gguf_tensor_name(n) for n in source.state}
    for name, weight in source.state.items():
        stored = tensors[gguf_tensor_name(name)]
        back = _as_ours(stored, name, config, arch)
        assert back.shape == weight.shape, name
        bound = _type_bound(file_type if weight.dim() == 2 else "f32", weight)
        assert ((back - weight).abs() <= bound).all(), name


def test_llama_gguf_q_k_layout_matches_llama_cpp_rope(tmp_path):
    """llama.cpp's `llama` rotates adjacent pairs; with the reordered rows its queries are ours,
    reordered the same way (so attention scores, sums over the head, are equal)."""
    n_heads, head_dim, dim = 3, 8, 10
    weight = torch.randn(n_heads * head_dim, dim, dtype=torch.float64)
    x = torch.randn(5, dim, dtype=torch.float64)
    pos = torch.arange(5, dtype=torch.float64)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = pos[:, None] * inv_freq  # (T, D/2)
    ours = (x @ weight.T).view(5, n_heads, head_dim).transpose(0, 1)[None]  # (1, H, T, D)
    emb = torch.cat((angles, angles), -1)[None]
    ours = apply_rotary(ours, emb.cos(), emb.sin())[0]  # (H, T, D), halves rotated together
    pairs = (x @ rope_pairs_from_halves(weight, n_heads).T).view(5, n_heads, head_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    theirs = torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1)  # (T, H, D/2, 2)
    theirs = theirs.reshape(5, n_heads, head_dim).transpose(0, 1)
    reordered = rope_pairs_from_halves(ours.transpose(1, 2).reshape(n_heads * head_dim, 5), n_heads)
    assert torch.allclose(theirs, reordered.reshape(n_heads, head_dim, 5).transpose(1, 2), atol=1e-12)
    assert torch.equal(rope_halves_from_pairs(rope_pairs_from_halves(weight, n_heads), n_heads), weight)


def test_every_parameter_has_a_gguf_name(tokenizer_dir, tmp_path):
    model = Transformer(ModelConfig(**BASE, use_qk_norm=True, tie_weight=False))
    names = {gguf_tensor_name(n) for n in model.state_dict()}
    assert len(names) == len(model.state_dict())
    assert "blk.1.attn_q_norm.weight" in names and "output.weight" in names
    assert set(GGUF_TENSORS) >= {n.split(".", 2)[2].rsplit(".", 1)[0]
                                 for n in model.state_dict() if n.startswith("layers.")}


def test_pre_tokenizer_names(tokenizer_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    ours = AutoTokenizer.from_pretrained(tokenizer_dir).backend
    assert gguf_pre_tokenizer(ours)[0] == "starcoder"
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.decoder = __import__("tokenizers").decoders.ByteLevel()
    assert gguf_pre_tokenizer(plain) == ("gpt-2", None)
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="no pre-tokenizer equal"):
        gguf_pre_tokenizer(plain)


# -- the command line ---------------------------------------------------------------------------------
def test_cli_exports_both_formats(tmp_path, tokenizer_dir):
    folder = make_model_dir(tmp_path / "m", tokenizer_dir, tie_weight=False)
    result = runner.invoke(app, ["model", "export", str(folder), "--format", "hf", "--out",
                                 str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert "Hugging Face llama" in result.output
    result = runner.invoke(app, ["model", "export", str(folder), "--format", "gguf", "--quantize",
                                 "q8_0", "--out", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0, result.output
    assert _read(tmp_path / "m.gguf")[0]["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    again = runner.invoke(app, ["model", "export", str(folder), "--format", "gguf", "--out",
                                str(tmp_path / "m.gguf")])
    assert isinstance(again.exception, FileExistsError) and "--overwrite" in str(again.exception)


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "onnx"], "unknown --format 'onnx'"),
    (["--format", "hf", "--quantize", "q8_0"], "--quantize applies to --format gguf only"),
    (["--format", "gguf", "--quantize", "q4_k"], "unknown --quantize 'q4_k'"),
    (["--format", "gguf", "--dtype", "int8"], "unknown --dtype 'int8'"),
])
def test_cli_refuses_bad_options_with_one_clear_line(args, message, tmp_path, tokenizer_dir):
    folder = make_model_dir(tmp_path / "m", tokenizer_dir)
    result = runner.invoke(app, ["model", "export", str(folder), *args, "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, ValueError) and message in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_export_without_a_tokenizer_says_how_to_add_one(tmp_path):
    Transformer(ModelConfig(**BASE)).save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_source(tmp_path / "m")
