"""Checkpoint: exact round trip of weights and nested training state; atomic writes."""

from __future__ import annotations

import random

import pytest
import torch

from astrai_core import AutoModel, Checkpoint, Transformer, get_preset
from astrai_core.checkpoint import flatten_state, unflatten_state


def _trained_state():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 512, (2, 8))).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, opt = _trained_state()
    states = {"optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state(),
                                                     "python": random.getstate()},
              "sampler": {"epoch": 2, "iter": 7}}
    ckpt = Checkpoint(model.state_dict(), epoch=2, iteration=41, config=model.config, states=states)
    ckpt.save(tmp_path / "step_41")
    back = Checkpoint.load(tmp_path / "step_41")
    assert (back.epoch, back.iteration, back.config) == (2, 41, model.config)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict[name], tensor), name
    opt2 = torch.optim.AdamW(Transformer(get_preset("tiny")).parameters(), lr=1e-3)
    opt2.load_state_dict(back.states["optimizer"])
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert back.states["rng"]["python"] == random.getstate()
    random.setstate(back.states["rng"]["python"])  # tuples survive, so setstate accepts it
    assert back.states["sampler"] == {"epoch": 2, "iter": 7}


def test_checkpoint_is_a_model_folder(tmp_path):
    model, _ = _trained_state()
    Checkpoint(model.state_dict(), config=model.config).save(tmp_path / "ckpt")
    loaded = AutoModel.from_pretrained(tmp_path / "ckpt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_failed_write_keeps_the_old_checkpoint(tmp_path):
    model, _ = _trained_state()
    Checkpoint(model.state_dict(), iteration=1, config=model.config).save(tmp_path / "ckpt")
    bad = Checkpoint(model.state_dict(), iteration=2, config=model.config,
                     states={"broken": {"x": object()}})
    with pytest.raises(TypeError, match="cannot store object"):
        bad.save(tmp_path / "ckpt")
    assert Checkpoint.load(tmp_path / "ckpt").iteration == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_loading_a_plain_model_folder_explains(tmp_path):
    model, _ = _trained_state()
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        Checkpoint.load(tmp_path / "m")


def test_flatten_keeps_int_keys_and_tuples():
    state = {0: {"step": torch.tensor(3.0)}, "groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]}
    tensors: dict = {}
    skeleton = flatten_state(state, tensors)
    assert unflatten_state(skeleton, tensors)["groups"][0]["betas"] == (0.9, 0.95)
    assert 0 in unflatten_state(skeleton, tensors)
