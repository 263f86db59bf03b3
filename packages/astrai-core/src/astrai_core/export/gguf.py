"""`export_gguf`: one GGUF file (llama.cpp, Ollama) in F32, F16, BF16 or Q8_0, with the tokenizer
and the chat template, written with the `gguf` library (llama.cpp's own reference writer).

Architecture: `qwen3` for models with qk-norm, `llama` otherwise; both are llama.cpp's own
names for exactly our block (pre-norm GQA, SwiGLU, RMSNorm, RoPE). One difference in layout:
llama.cpp's `llama` rotates pairs of adjacent head values, while our (Hugging Face's) RoPE rotates
the two halves of each head, so q_proj and k_proj rows are reordered for `llama` (each head's
rows i and i + D/2 become rows 2i and 2i + 1). `qwen3` rotates halves, as we do.

Tensor names follow `GGUF_TENSORS` (our parameter name -> llama.cpp's), the one mapping that the
export and the read-back in the tests share. 1-D tensors (norms, biases) stay F32 in every file
type, as llama.cpp's own converter keeps them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from astrai_core.atomic import atomic_file
from astrai_core.export.source import ExportSource
from astrai_core.model.config import ModelConfig

GGUF_HINT = "the GGUF export needs the gguf library: pip install 'astrai-core[gguf]'"

# Our parameter name (per layer without the `layers.N.` prefix) -> llama.cpp's tensor kind.
GGUF_TENSORS: dict[str, str] = {
    "embed_tokens": "TOKEN_EMBD",
    "norm": "OUTPUT_NORM",
    "lm_head": "OUTPUT",
    "input_layernorm": "ATTN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "self_attn.q_norm": "ATTN_Q_NORM",
    "self_attn.k_norm": "ATTN_K_NORM",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
# File types: name -> (tensor type of the 2-D weights, llama.cpp's general.file_type).
GGUF_TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}

# Pre-tokenizers llama.cpp knows, by the tokenizer.json `pre_tokenizer` they correspond to.
# llama.cpp carries no regex in the file: it picks its split rules by this name.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                 r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
OURS_PRE_NOTE = (
    "llama.cpp has no pre-tokenizer that splits CJK characters from their neighbours, as "
    "AstrAI's does; the GGUF uses its 'starcoder' rules (single digits, then GPT-2 words). No "
    "merge of AstrAI's vocabulary spans that split (it never saw one), so the tokens are the same "
    "for English, for Chinese and for mixed text; they can differ only where a space or a "
    "multi-byte letter directly precedes kana or CJK symbols and the vocabulary learnt a merge "
    "across that boundary elsewhere")


@dataclass(frozen=True)
class GGUFArch:
    name: str  # llama.cpp architecture
    permute_qk: bool  # llama.cpp rotates adjacent pairs: reorder our half-rotation rows


def gguf_arch(config: ModelConfig) -> GGUFArch:
    unsupported = unsupported_gguf_features(config)
    if unsupported:
        raise ValueError("this model has no GGUF equivalent: " + "; ".join(unsupported)
                         + ". llama.cpp's llama and qwen3 architectures cannot hold it, so it is "
                         "not exported (serve it with `astrai serve` instead)")
    return GGUFArch("qwen3", False) if config.use_qk_norm else GGUFArch("llama", True)


def unsupported_gguf_features(config: ModelConfig) -> list[str]:
    found = []
    if config.attention_type != "gqa":
        found.append(f"attention_type '{config.attention_type}' (multi-head latent attention)")
    if config.use_gated_attention:
        found.append("use_gated_attention (a sigmoid output gate on attention)")
    if config.is_moe:
        found.append("mixture-of-experts feed-forward (n_experts > 0; the GGUF export writes "
                     "dense llama/qwen3 blocks only, export --format hf instead)")
    if config.use_qk_norm and (config.attention_bias or config.attention_out_bias or config.mlp_bias):
        found.append("qk-norm together with biases (llama.cpp's qwen3 loads no biases)")
    return found


def gguf_tensor_name(name: str) -> str:
    """`layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (llama.cpp's names)."""
    gguf = _import_gguf()
    stem, _, suffix = name.rpartition(".")
    block = None
    if stem.startswith("layers."):
        _, index, stem = stem.split(".", 2)
        block = int(index)
    if stem not in GGUF_TENSORS:
        raise ValueError(f"no GGUF name for parameter '{name}'")
    kind = getattr(gguf.MODEL_TENSOR, GGUF_TENSORS[stem])
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=block) if block is not None else base) + "." + suffix


def rope_pairs_from_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (n_heads * D, in) from half-rotation order to adjacent pairs:
    within each head, row i (i < D/2) goes to 2i and row D/2 + i to 2i + 1."""
    out_features = weight.shape[0]
    half = out_features // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def rope_halves_from_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `rope_pairs_from_halves` (for reading a llama GGUF back)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def export_gguf(source: ExportSource, out: Path, file_type: str = "f32") -> str:
    """Write `source` as one GGUF file at `out` (atomically); returns the architecture."""
    if file_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF file type '{file_type}'; choose one of: {', '.join(GGUF_TYPES)}")
    gguf = _import_gguf()
    config = source.config
    arch = gguf_arch(config)
    pre, note = gguf_pre_tokenizer(source.tokenizer.backend)
    if note:
        warnings.warn(note, stacklevel=2)
    tensor_type, ftype = GGUF_TYPES[file_type]
    qtype = getattr(gguf.GGMLQuantizationType, tensor_type)
    tensors = [_tensor(gguf, name, t, config, arch, qtype) for name, t in source.state.items()]
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; --out for GGUF names a file, e.g. {out}/model.gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.name)
        _write_hparams(writer, gguf, config, source.folder.name, getattr(gguf.LlamaFileType, ftype))
        _write_tokenizer(writer, gguf, source, pre)
        for name, data, raw_dtype in tensors:
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return arch.name


def _tensor(gguf: Any, name: str, tensor: torch.Tensor, config: ModelConfig, arch: GGUFArch,
            qtype: Any) -> tuple[str, np.ndarray, Any]:
    t = tensor.detach().float()
    if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
        t = rope_pairs_from_halves(t, config.n_heads)
    elif arch.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
        t = rope_pairs_from_halves(t, config.n_kv_heads)
    data = t.contiguous().numpy()
    T = gguf.GGMLQuantizationType
    if data.ndim == 1 or qtype == T.F32:
        return gguf_tensor_name(name), data, None
    if qtype == T.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] != 0:
        qtype = T.F16  # rows that are not whole 32-value blocks, as llama.cpp's converter does
    if qtype == T.F16:
        return gguf_tensor_name(name), data.astype(np.float16), None
    return gguf_tensor_name(name), gguf.quants.quantize(data, qtype), qtype


def _write_hparams(writer: Any, gguf: Any, config: ModelConfig, name: str, ftype: int) -> None:
    writer.add_name(name)
    writer.add_file_type(ftype)
    if ftype != gguf.LlamaFileType.ALL_F32:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.dim_ffn)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.resolved_head_dim)
    writer.add_value_length(config.resolved_head_dim)
    writer.add_rope_dimension_count(config.resolved_head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)


# -- tokenizer ----------------------------------------------------------------------------------
def gguf_pre_tokenizer(backend: Any) -> tuple[str, str | None]:
    """llama.cpp's name for a `tokenizers` byte-level BPE's pre-tokenizer, and a note when that
    name only approximates it. Raises ValueError for a tokenizer llama.cpp cannot reproduce."""
    spec = json.loads(backend.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise ValueError(f"the tokenizer is a {model.get('type')} model with a "
                         f"{decoder.get('type')} decoder; the GGUF export writes byte-level BPE "
                         "tokenizers only (llama.cpp's 'gpt2' model)")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ValueError(f"the tokenizer has a {normalizer} normalizer, which llama.cpp does not "
                         "apply; it cannot be exported to GGUF")
    steps = _pre_steps(spec.get("pre_tokenizer"))
    if steps == [("Digits", True), ("Split", "CJK"), ("ByteLevel", True)]:
        return "starcoder", OURS_PRE_NOTE
    known = {
        (("ByteLevel", True),): "gpt-2",
        (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
        (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    }
    if tuple(steps) in known:
        return known[tuple(steps)], None
    raise ValueError(f"llama.cpp has no pre-tokenizer equal to this tokenizer's ({steps}); "
                     "a GGUF would tokenize text differently, so it is not written")


def _pre_steps(pre: dict[str, Any] | None) -> list[tuple[str, Any]]:
    from astrai_core.tokenizer.training import CJK_CHAR

    cjk = (CJK_CHAR, CJK_CHAR + "+")  # each CJK character alone (now), or runs of them (before)
    items = (pre or {}).get("pretokenizers", [pre] if pre else [])
    steps: list[tuple[str, Any]] = []
    for item in items:
        kind = item.get("type")
        if kind == "ByteLevel":
            if item.get("add_prefix_space"):
                steps.append(("ByteLevel+prefix-space", None))
            else:
                steps.append(("ByteLevel", bool(item.get("use_regex", True))))
        elif kind == "Digits":
            steps.append(("Digits", bool(item.get("individual_digits"))))
        elif kind == "Split" and (item.get("behavior") or "").lower() == "isolated" and not item.get("invert"):
            pattern = (item.get("pattern") or {}).get("Regex")
            steps.append(("Split", "CJK" if pattern in cjk else pattern))
        else:
            steps.append((kind, json.dumps(item, sort_keys=True)))
    return steps


def _write_tokenizer(writer: Any, gguf: Any, source: ExportSource, pre: str) -> None:
    tok, vocab_size = source.tokenizer, source.config.vocab_size
    spec = json.loads(tok.backend.to_str())
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    added = {t["id"]: bool(t.get("special")) for t in spec.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        if i in added:
            types[i] = int(gguf.TokenType.CONTROL if added[i] else gguf.TokenType.USER_DEFINED)
        else:
            types[i] = int(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for value, add in ((tok.bos_id, writer.add_bos_token_id), (tok.eos_id, writer.add_eos_token_id),
                       (tok.pad_id, writer.add_pad_token_id)):
        if value is not None:
            add(value)
    # AstrAI's engine feeds a prompt's ids as they are: no implicit begin-of-text marker.
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok.chat_template)


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError(GGUF_HINT) from None
    return gguf
