"""Schedules against their closed forms at chosen steps; state round trips; factory errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from astrai_train import CosineScheduler, SchedulerFactory, SGDRScheduler
from astrai_train.schedulers import ConstantScheduler

BASE_LR = 0.5


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=BASE_LR)


def _rate_after(scheduler, steps: int) -> float:
    """The rate the optimizer holds after `steps` updates (the rate of update steps + 1)."""
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
    return scheduler.optimizer.param_groups[0]["lr"]


def _cos(t: float, length: float, floor: float) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / length))


@pytest.mark.parametrize(("step", "factor"), [
    (0, 1 / 5), (3, 4 / 5),                      # warm-up (s + 1) / (warmup + 1)
    (4, 1.0), (9, _cos(5, 10, 0.1)),             # cosine over 10 steps after warm-up
    (11, 0.1 + 0.9 * 0.5 * (1 + math.cos(0.7 * math.pi))),
    (14, 0.1), (40, 0.1),                        # the floor after the decay
])
def test_cosine_matches_closed_form(step, factor):
    scheduler = CosineScheduler(_optimizer(), warmup_steps=4, lr_decay_steps=10, min_rate=0.1)
    assert _rate_after(scheduler, step) == pytest.approx(BASE_LR * factor, rel=1e-12)


@pytest.mark.parametrize(("step", "factor"), [
    (0, 1 / 3), (1, 2 / 3),                # warm-up of 2
    (2, 1.0), (4, 0.5), (5, _cos(3, 4, 0)),  # cycle 0: 4 steps
    (6, 1.0), (10, 0.5), (13, _cos(7, 8, 0)),  # restart; cycle 1: 8 steps
    (14, 1.0), (22, 0.5),                  # cycle 2: 16 steps
])
def test_sgdr_restarts_with_growing_cycles(step, factor):
    scheduler = SGDRScheduler(_optimizer(), warmup_steps=2, cycle_length=4, min_rate=0.0, t_mult=2)
    assert _rate_after(scheduler, step) == pytest.approx(BASE_LR * factor, rel=1e-12, abs=1e-15)


def test_sgdr_with_t_mult_one_is_periodic():
    scheduler = SGDRScheduler(_optimizer(), cycle_length=5, min_rate=0.2)
    rates = [_rate_after(scheduler, 1) for _ in range(15)]
    assert rates[:5] == rates[5:10] == rates[10:]
    assert rates[4] == pytest.approx(BASE_LR)  # step 5 is a restart
    assert rates[1] == pytest.approx(BASE_LR * _cos(2, 5, 0.2))


def test_constant_warms_up_then_holds():
    scheduler = ConstantScheduler(_optimizer(), warmup_steps=3)
    assert [_rate_after(scheduler, 1) for _ in range(5)] == pytest.approx(
        [BASE_LR * f for f in (0.5, 0.75, 1, 1, 1)])


def test_state_round_trips_through_json_and_continues_identically():
    a = CosineScheduler(_optimizer(), warmup_steps=2, lr_decay_steps=20, min_rate=0.0)
    _rate_after(a, 7)
    state = json.loads(json.dumps(a.state_dict()))
    b = CosineScheduler(_optimizer(), warmup_steps=2, lr_decay_steps=20, min_rate=0.0)
    b.load_state_dict(state)
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    assert [_rate_after(a, 1) for _ in range(5)] == [_rate_after(b, 1) for _ in range(5)]


def test_factory_creates_by_name_and_lists_names_on_error():
    scheduler = SchedulerFactory.create(_optimizer(), "sgdr", cycle_length=3)
    assert isinstance(scheduler, SGDRScheduler) and scheduler.cycle_length == 3
    assert {"cosine", "sgdr", "constant"} <= set(SchedulerFactory.list_registered())
    with pytest.raises(ValueError, match="unknown LR schedule 'linear'; registered: .*cosine"):
        SchedulerFactory.create(_optimizer(), "linear")


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (CosineScheduler, {"lr_decay_steps": 0}, "lr_decay_steps must be an integer >= 1"),
    (CosineScheduler, {"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    (CosineScheduler, {"min_rate": 2.0}, r"min_rate must be in \[0, 1\]"),
    (SGDRScheduler, {"cycle_length": 0}, "cycle_length must be an integer >= 1"),
    (SGDRScheduler, {"t_mult": 0}, "t_mult must be an integer >= 1"),
])
def test_invalid_arguments_are_explained(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(_optimizer(), **kwargs)
