"""EMA maths: decay schedule, update interval, buffers, state-dict round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vdm.lightning.ema import EMA, ema_decay


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def set_weights(model: Tiny, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model.running.fill_(value)
        model.count.fill_(int(value))


def test_decay_schedule_values() -> None:
    assert ema_decay(1, 0.999, warmup=10) == pytest.approx(2 / 11)
    assert ema_decay(100, 0.999, warmup=10) == pytest.approx(101 / 110)
    assert ema_decay(10**6, 0.999, warmup=10) == pytest.approx(0.999)
    assert ema_decay(5, 0.9, warmup=0) == pytest.approx(0.9)
    assert ema_decay(5, 0.9, warmup=0, every=3) == pytest.approx(0.9**3)


def test_constant_decay_matches_closed_form() -> None:
    model = Tiny()
    set_weights(model, 0.0)
    ema = EMA(model, decay=0.9, warmup=0)
    ema.update(model, step=1)  # the first update copies: ema = 0
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, -1.0, 4.0], start=2):
        set_weights(model, value)
        assert ema.update(model, step)
        expected = 0.9 * expected + 0.1 * value
        torch.testing.assert_close(ema.module.linear.weight, torch.full((2, 3), expected))
        torch.testing.assert_close(ema.module.running, torch.full((2,), expected))
        assert int(ema.module.count) == int(value)  # integer buffers are copied, not averaged
    assert ema.num_updates == 5


def test_warmup_and_interval() -> None:
    model = Tiny()
    set_weights(model, 1.0)
    ema = EMA(model, decay=0.99, warmup=10, every=2)
    assert not ema.update(model, step=1)
    assert ema.update(model, step=2)  # copy
    set_weights(model, 3.0)
    assert ema.update(model, step=4)
    d = ema_decay(2, 0.99, 10, every=2)
    assert d == pytest.approx(3 / 12)
    torch.testing.assert_close(ema.module.linear.bias, torch.full((2,), d * 1.0 + (1 - d) * 3.0))


def test_frozen_eval_and_state_dict_round_trip() -> None:
    model = Tiny()
    ema = EMA(model, decay=0.5, warmup=0)
    parent = nn.ModuleDict({"model": model, "ema": ema}).train()
    assert not ema.module.training and model.training
    assert not any(p.requires_grad for p in ema.parameters())
    for step in range(1, 4):
        with torch.no_grad():
            model.linear.weight.add_(1.0)
        ema.update(model, step)
    state = {k: v.clone() for k, v in parent.state_dict().items()}
    restored = nn.ModuleDict({"model": Tiny(), "ema": EMA(Tiny(), decay=0.5, warmup=0)})
    restored.load_state_dict(state, strict=True)
    assert restored["ema"].num_updates == 3
    torch.testing.assert_close(restored["ema"].module.linear.weight, ema.module.linear.weight)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="decay"):
        EMA(Tiny(), decay=1.0)
    with pytest.raises(ValueError, match="every"):
        EMA(Tiny(), every=0)


def test_update_groups_and_gather_context():
    from contextlib import contextmanager

    from vdm.lightning.ema import _groups

    assert list(_groups([3, 3, 10, 1], limit=6)) == [(0, 2), (2, 3), (3, 4)]
    assert list(_groups([], limit=6)) == []
    torch.manual_seed(0)
    model, gathered = Tiny(), []

    @contextmanager
    def gather(params):
        gathered.append([id(p) for p in params])
        yield

    plain, sharded = EMA(model, decay=0.9, warmup=0), EMA(model, decay=0.9, warmup=0)
    for step in (1, 2):
        with torch.no_grad():
            model.linear.weight.add_(1.0)
        plain.update(model, step)
        sharded.update(model, step, gather=gather)
    assert sorted(i for group in gathered[:1] for i in group) == sorted(id(p) for p in model.parameters())
    for a, b in zip(plain.state_dict().values(), sharded.state_dict().values()):
        torch.testing.assert_close(a, b)
