"""LoRA adapters in PEFT's format: the names and config PEFT itself writes, `peft` loading ours
onto the Hugging Face export of the base with our logits, ours loading an adapter `peft`
trained, and `astrai model merge-lora`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from astrai_core.cli.main import app
from astrai_core.export import export_hf, load_source
from astrai_core.model import AutoModel, ModelConfig, Transformer
from astrai_core.model.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAAdapter, load_adapter
from astrai_core.model.lora import LoRAConfig, apply_lora, lora_layers
from astrai_core.tokenizer import AutoTokenizer, train_tokenizer
from tolerances import forward_bound

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
runner = CliRunner()

BASE = dict(vocab_size=300, dim=64, n_layers=2, dim_ffn=96, max_seq_len=128, n_heads=4, n_kv_heads=2)
CASES = {  # a llama export (untied, biases) and a qwen3 export (qk-norm, tied)
    "llama": dict(tie_weight=False, attention_bias=True, attention_out_bias=True),
    "qwen3": dict(tie_weight=True, use_qk_norm=True),
}
TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    text = "The quick brown fox jumps over the lazy dog. 小模型也可以在普通电脑上运行。 12345\n"
    (root / "corpus.txt").write_text(text * 60, encoding="utf-8")
    train_tokenizer([root / "corpus.txt"], 280, root / "tok", show_progress=False, held_out=[])
    return root / "tok"


@pytest.fixture(scope="module", params=list(CASES))
def base(request, tmp_path_factory, tokenizer_dir):
    """(our base folder, its Hugging Face export)."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, **CASES[request.param]))
    model.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root / "base")
    export_hf(load_source(root / "base"), root / "hf")
    return root / "base", root / "hf"


def adapted(folder: Path, seed: int = 1) -> torch.nn.Module:
    """The base with a rank-4 adapter whose B is random (a trained adapter's stand-in)."""
    model = AutoModel.from_pretrained(folder).eval()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    return model


def bound(expected: torch.Tensor) -> float:
    """fp32 on both sides (transformers keeps norms and RoPE in fp32): the worst-case rounding of
    the forward, as in test_model_parity."""
    return forward_bound(BASE["n_layers"], max(BASE["dim"], BASE["dim_ffn"]),
                         scale=expected.abs().max().item(), dtype=torch.float32)


def ids() -> torch.Tensor:
    return torch.randint(5, 280, (2, 17), generator=torch.Generator().manual_seed(3))


def peft_adapter_of(hf_folder: Path, out: Path) -> Path:
    """What peft itself writes for the same adapter shape on the exported base."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    peft.get_peft_model(hf, config).save_pretrained(out)
    return out


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def test_our_adapter_has_the_names_shapes_and_config_peft_writes(base, tmp_path):
    folder, hf_folder = base
    LoRAAdapter.from_model(adapted(folder)).save(tmp_path / "ours")
    theirs = peft_adapter_of(hf_folder, tmp_path / "peft")
    assert tensor_shapes(tmp_path / "ours" / ADAPTER_WEIGHTS) == tensor_shapes(theirs / ADAPTER_WEIGHTS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensor_shapes(
        tmp_path / "ours" / ADAPTER_WEIGHTS)
    ours_cfg = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    peft_cfg = json.loads((theirs / ADAPTER_CONFIG).read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora",
                "use_dora", "fan_in_fan_out", "modules_to_save"):
        assert ours_cfg[key] == peft_cfg[key], key
    assert sorted(ours_cfg["target_modules"]) == sorted(peft_cfg["target_modules"])


def test_peft_loads_our_adapter_onto_the_hf_export_with_our_logits(base, tmp_path):
    folder, hf_folder = base
    ours = adapted(folder)
    LoRAAdapter.from_model(ours, base_model=str(folder)).save(tmp_path / "adapter")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_base = hf(ids()).logits
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected, got = with_adapter(ids()).logits, ours(ids())
    assert (got - expected).abs().max().item() <= bound(expected)
    assert (expected - hf_base).abs().max().item() > 100 * bound(expected)  # it is applied


def test_an_adapter_peft_trained_loads_into_astrai_with_peft_logits(base, tmp_path):
    folder, hf_folder = base
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"],
                             lora_dropout=0.1, task_type="CAUSAL_LM")
    tuned = peft.get_peft_model(hf, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    tuned.save_pretrained(tmp_path / "peft")
    tuned.eval()
    ours = load_adapter(AutoModel.from_pretrained(folder), tmp_path / "peft").eval()
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_layers(ours)}) == ["k_proj", "o_proj", "up_proj"]
    assert next(iter(lora_layers(ours).values())).scaling == 4.0
    with torch.no_grad():
        expected, got = tuned(ids()).logits, ours(ids())
    assert (got - expected).abs().max().item() <= bound(expected)


def test_merge_lora_writes_a_model_folder_with_the_adapted_logits(base, tmp_path):
    folder, _ = base
    ours = adapted(folder)
    LoRAAdapter.from_model(ours).save(tmp_path / "adapter")
    out = tmp_path / "merged"
    result = runner.invoke(app, ["model", "merge-lora", str(folder), str(tmp_path / "adapter"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "6 layers merged, rank 4, float32" in result.output
    merged = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        expected, got = ours(ids()), merged(ids())
    assert (got - expected).abs().max().item() <= bound(expected)
    assert (out / "tokenizer.json").is_file()  # servable as it is
    assert AutoTokenizer.from_pretrained(out).encode("fox") == AutoTokenizer.from_pretrained(folder).encode("fox")
    again = runner.invoke(app, ["model", "merge-lora", str(folder), str(tmp_path / "adapter"),
                                "--out", str(out)])
    assert isinstance(again.exception, FileExistsError) and "pass --overwrite" in str(again.exception)


def test_bad_adapters_are_refused_in_one_line_and_nothing_is_written(base, tmp_path):
    folder, _ = base
    LoRAAdapter.from_model(adapted(folder)).save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    cases = {
        tmp_path / "a": "uses DoRA (weight-decomposed LoRA), which AstrAI does not compute",
        folder: "is not a LoRA adapter folder (adapter_config.json is missing)",
    }
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / ADAPTER_CONFIG).write_text(json.dumps(config))
    (tmp_path / "b" / "adapter_model.bin").write_bytes(b"pickle")
    cases[tmp_path / "b"] = "pickle adapter_model.bin is never loaded"
    for adapter, message in cases.items():
        result = runner.invoke(app, ["model", "merge-lora", str(folder), str(adapter), "--out",
                                     str(tmp_path / "out")])
        assert result.exit_code == 1 and message in str(result.exception), result.exception
    assert not (tmp_path / "out").exists()


def test_an_adapter_folder_is_not_a_model_folder_and_says_how_to_merge(base, tmp_path):
    folder, _ = base
    LoRAAdapter.from_model(adapted(folder)).save(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="is a LoRA adapter, not a model folder; merge it "
                                                "into its base first: astrai model merge-lora"):
        AutoModel.from_pretrained(tmp_path / "adapter")
