"""trainer.ema_decay: the weight average's arithmetic, its swap for validation, its checkpoint
round trip, and what the tracked checkpoint and the model card say about it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from sam3ft import params
from sam3ft.errors import ConfigError
from sam3ft.stages.export import ema_line, ema_record
from sam3ft.train.ema import EMA_KEY, WeightEma
from sam3ft.train.run import normalise_checkpoint


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)
        self.register_buffer("count", torch.tensor(0))  # not floating point: copied, not averaged


def _set(model: Tiny, value: float, count: int) -> None:
    with torch.no_grad():
        model.linear.weight.fill_(value)
        model.linear.bias.fill_(value)
    model.count.fill_(count)


def test_average_follows_the_warmed_up_decay():
    model = Tiny()
    _set(model, 0.0, 0)
    ema = WeightEma(model, decay=0.9)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        _set(model, value, n)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13, 5/14
        expected = d * expected + (1 - d) * value
    assert ema.updates == 4
    assert ema.state["linear.weight"].flatten().tolist() == pytest.approx([expected, expected], rel=1e-6)
    assert ema.state["count"].item() == 4
    assert ema.current_decay() == pytest.approx(5 / 14)  # the next update's


def test_swapped_in_validates_the_average_then_restores_the_weights():
    model = Tiny()
    _set(model, 1.0, 0)
    ema = WeightEma(model, decay=0.5)
    _set(model, 5.0, 3)
    with ema.swapped_in(model):
        assert model.linear.weight.tolist() == [[1.0, 1.0]] and model.count.item() == 0
    assert model.linear.weight.tolist() == [[5.0, 5.0]] and model.count.item() == 3
    assert ema.state["linear.weight"].tolist() == [[1.0, 1.0]]  # the average is untouched


def test_state_round_trips_and_refuses_another_decay():
    model = Tiny()
    ema = WeightEma(model, decay=0.9)
    _set(model, 2.0, 1)
    ema.update(model)
    again = WeightEma(Tiny(), decay=0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 1 and torch.equal(again.state["linear.bias"], ema.state["linear.bias"])
    with pytest.raises(ValueError, match=r"decay 0\.9"):
        WeightEma(Tiny(), decay=0.5).load_state_dict(ema.state_dict())


def test_tracked_checkpoint_holds_the_average(tmp_path):
    regular = {"w": torch.ones(2)}
    averaged = {"w": torch.zeros(2)}
    ckpt = {
        "model": regular,
        "epoch": 3,
        "time_elapsed": 9.0,
        EMA_KEY: {"decay": 0.9, "updates": 5, "state": averaged},
    }
    torch.save(ckpt, tmp_path / "scratch.pt")
    normalise_checkpoint(tmp_path / "scratch.pt", tmp_path / "ema.pt", ema=True)
    normalise_checkpoint(tmp_path / "scratch.pt", tmp_path / "raw.pt", ema=False)
    ema, raw = (torch.load(tmp_path / n, weights_only=True) for n in ("ema.pt", "raw.pt"))
    assert ema["model"]["w"].tolist() == [0.0, 0.0] and ema["model_weights"] == "ema"
    assert raw["model"]["w"].tolist() == [1.0, 1.0] and "model_weights" not in raw
    assert EMA_KEY not in ema and EMA_KEY not in raw and ema["time_elapsed"] == 0.0


def test_model_card_says_which_weights_were_exported(tmp_path):
    (tmp_path / "selection.json").write_text(json.dumps({"epoch": 2, "weights": "ema", "ema_decay": 0.99}))
    record = ema_record(tmp_path)
    assert record == {"weights": "ema", "decay": 0.99}
    assert "moving average" in ema_line(record) and "0.99" in ema_line(record)
    (tmp_path / "selection.json").write_text(json.dumps({"epoch": 2}))  # a run from before EMA
    assert "no EMA" in ema_line(ema_record(tmp_path))


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_bad_decay_names_the_key(value):
    data = params.read_params(REPO / "params.yaml")["trainer"]
    with pytest.raises(ConfigError, match=rf"trainer\.ema_decay={value} is invalid"):
        params.section_from_dict(params.Trainer, dict(data, ema_decay=value), "trainer", "tiny")
