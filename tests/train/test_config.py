"""TrainConfig: defaults are valid, every invalid value names its field, plain-value views."""

from __future__ import annotations

import json

import pytest

from astrai_train import TrainConfig


def test_defaults_are_valid_and_single_process():
    config = TrainConfig()
    assert (config.nprocs, config.strategy, config.device) == (1, "seq", "auto")


@pytest.mark.parametrize(("field", "value"), [
    ("strategy", "ppo"), ("scheduler", "linear"), ("batch_size", 0), ("batch_size", 2.5),
    ("accumulation_steps", 0), ("n_epoch", 0), ("learning_rate", 0.0), ("learning_rate", -1.0),
    ("max_grad_norm", -1.0), ("adam_beta2", 1.0), ("label_smoothing", 1.0), ("dpo_beta", 0.0),
    ("dpo_reduction", "max"), ("grpo_clip_eps", 1.5), ("grpo_kl_coef", -0.1),
    ("grpo_group_size", 1), ("max_steps", 0), ("ckpt_interval", 0), ("keep_last", -1),
    ("device", "tpu"), ("dtype", "fp16"), ("num_workers", -1), ("min_rate", 1.5),
    ("warmup_steps", True), ("backend", "mpi"), ("lr_decay_steps", 0), ("t_mult", 0),
])
def test_invalid_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be"):
        TrainConfig(**{field: value})


def test_start_epoch_must_be_below_n_epoch():
    with pytest.raises(ValueError, match=r"TrainConfig\.start_epoch must be below n_epoch \(2\)"):
        TrainConfig(n_epoch=2, start_epoch=2)


def test_nprocs_above_one_is_accepted_and_below_one_refused():
    assert TrainConfig(nprocs=2).nprocs == 2
    with pytest.raises(ValueError, match=r"TrainConfig\.nprocs must be an integer >= 1"):
        TrainConfig(nprocs=0)


def test_validate_rechecks_after_mutation():
    config = TrainConfig()
    config.batch_size = -3
    with pytest.raises(ValueError, match=r"TrainConfig\.batch_size"):
        config.validate()


def test_plain_values_round_trip_through_json():
    config = TrainConfig(batch_size=3, learning_rate=1e-4, max_steps=7, extra_kwargs={"a": 1})
    values = config.to_dict()
    assert "model" not in values and "optimizer_fn" not in values
    back = TrainConfig.from_dict(json.loads(json.dumps(values)))
    assert back.to_dict() == values


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown TrainConfig field.*batchsize"):
        TrainConfig.from_dict({"batchsize": 4})
