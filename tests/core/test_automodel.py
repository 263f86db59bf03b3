"""Saving and loading model folders: bit-exact round trips and clear errors for bad folders."""

from __future__ import annotations

import json

import pytest
import torch

from astrai_core.model import AutoModel, Transformer, get_preset
from astrai_core.model.weights import WEIGHTS_INDEX_NAME, WEIGHTS_NAME


def _model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_preset("tiny", **overrides))


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("overrides", [{}, {"tie_weight": False, "use_gated_attention": True},
                                       {"attention_type": "mla", "kv_lora_rank": 16,
                                        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                                        "v_head_dim": 8}])
def test_save_then_load_is_bit_exact(tmp_path, overrides):
    model = _model(**overrides)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModel.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, Transformer)
    _assert_same_weights(model, loaded)
    if model.config.tie_weight:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_sharded_save_loads_the_same(tmp_path):
    model = _model(tie_weight=False)
    model.save_pretrained(tmp_path / "m", max_shard_bytes=100_000)
    assert (tmp_path / "m" / WEIGHTS_INDEX_NAME).is_file()
    assert len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1
    _assert_same_weights(model, AutoModel.from_pretrained(tmp_path / "m"))


def test_dtype_and_default_fp32_on_cpu(tmp_path):
    model = _model().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert next(AutoModel.from_pretrained(tmp_path / "m").parameters()).dtype == torch.float32
    half = AutoModel.from_pretrained(tmp_path / "m", dtype="float16")
    assert next(half.parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        AutoModel.from_pretrained(tmp_path / "m", dtype="int4")


def test_save_keeps_tokenizer_files_and_leaves_no_temp_folders(tmp_path):
    folder = tmp_path / "m"
    _model().save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    _model().save_pretrained(folder)
    assert (folder / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AutoModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoModel.from_pretrained(tmp_path / "empty")
    folder = tmp_path / "m"
    _model().save_pretrained(folder)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*model\.safetensors"):
        AutoModel.from_pretrained(folder)


def test_truncated_weights_name_the_file(tmp_path):
    folder = tmp_path / "m"
    _model().save_pretrained(folder)
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
        AutoModel.from_pretrained(folder)


def test_missing_shard_is_named(tmp_path):
    folder = tmp_path / "m"
    _model(tie_weight=False).save_pretrained(folder, max_shard_bytes=100_000)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        AutoModel.from_pretrained(folder)


def test_unsupported_model_type_lists_supported(tmp_path):
    folder = tmp_path / "m"
    _model().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported.*llama, mixtral, qwen2, qwen3"):
        AutoModel.from_pretrained(folder)


def test_weights_that_do_not_match_the_config(tmp_path):
    folder = tmp_path / "m"
    _model().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dim_ffn": 64}))
    with pytest.raises(ValueError, match=r"mlp\..*_proj\.weight' has shape .* config.json implies"):
        AutoModel.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "n_layers": 3}))
    with pytest.raises(ValueError, match="missing .* tensors"):
        AutoModel.from_pretrained(folder)


def test_pickle_weights_are_refused(tmp_path):
    folder = tmp_path / "m"
    _model().save_pretrained(folder)
    (folder / WEIGHTS_NAME).unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        AutoModel.from_pretrained(folder)
