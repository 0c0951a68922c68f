"""Training: it learns, checkpoints are model dirs, resume is exact, bad input is refused."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import trustmoe
from trustmoe.io import TrustmoeError
from trustmoe.train import train
from trustmoe.train.optim import lr_at

FAST = {"batch_size": 4, "seq_len": 32, "eval_every": 5, "eval_batches": 1,
        "checkpoint_every": 100, "warmup_steps": 3}


def test_training_reduces_loss_and_writes_model_dir(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    res = train(tiny_data_dir, out, "tiny", max_steps=30, overrides=FAST, progress=False)
    assert res.steps == 30 and res.stopped == "max_steps"
    assert res.losses[-1] < res.losses[0] - 1.0  # learned something real
    assert res.val_loss is not None and res.val_loss < res.losses[0]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                 "trustmoe.json", "metrics.jsonl", "train_state.safetensors"):
        assert (out / name).exists(), name
    meta = json.loads((out / "trustmoe.json").read_text())
    assert meta["preset"] == "tiny" and meta["step"] == 30
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31))
    assert all(0.0 <= x["load_balance"] <= 1.0 for x in lines)
    model = trustmoe.load(out)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    assert model(x).shape == (2, 16, model.config.vocab_size)
    assert not list(tmp_path.glob(".*.tmp")), "temporary checkpoint dirs left behind"


def test_resume_equals_uninterrupted_run(tiny_data_dir: Path, tmp_path: Path) -> None:
    full = train(tiny_data_dir, tmp_path / "a", "tiny", max_steps=10, overrides=FAST,
                 progress=False)
    part1 = train(tiny_data_dir, tmp_path / "b", "tiny", max_steps=10, overrides=FAST,
                  progress=False, stop_at=4)
    assert part1.stopped == "stop_at" and part1.steps == 4
    part2 = train(tiny_data_dir, tmp_path / "b", "tiny", resume=True, overrides=FAST,
                  progress=False)
    assert part2.steps == 10
    assert part1.losses + part2.losses == pytest.approx(full.losses, abs=1e-6)
    wa = trustmoe.load(tmp_path / "a").state_dict()
    wb = trustmoe.load(tmp_path / "b").state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_resume_without_checkpoint_is_refused(tiny_data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrustmoeError, match="no train_state"):
        (tmp_path / "empty").mkdir()
        train(tiny_data_dir, tmp_path / "empty", "tiny", resume=True, progress=False)


def test_existing_checkpoint_is_not_overwritten(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    train(tiny_data_dir, out, "tiny", max_steps=2, overrides=FAST, progress=False)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(TrustmoeError, match="already holds a checkpoint"):
        train(tiny_data_dir, out, "tiny", max_steps=2, overrides=FAST, progress=False)
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("bad, msg", [
    ({"preset": "huge"}, "unknown preset"),
    ({"overrides": {"batch_size": 0}}, "batch-size must be positive"),
    ({"overrides": {"lr": 5.0}}, "learning rate"),
    ({"overrides": {"seq_len": 100000}}, "fewer than one sequence"),
])
def test_bad_parameters(tiny_data_dir: Path, tmp_path: Path, bad: dict, msg: str) -> None:
    kwargs = {"preset": "tiny", "max_steps": 1, "progress": False, **bad}
    with pytest.raises((TrustmoeError, ValueError), match=msg):
        train(tiny_data_dir, tmp_path / "x", **kwargs)


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(TrustmoeError, match="not found"):
        train(tmp_path / "nope", tmp_path / "out", "tiny", max_steps=1, progress=False)


def test_schedule_warmup_then_cosine() -> None:
    from trustmoe.config import TrainConfig

    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(55, cfg, 100) == pytest.approx(0.55)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg, 100) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_time_budget_fits_the_schedule_and_checkpoints(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "timed"
    res = train(tiny_data_dir, out, "tiny", max_minutes=0.1, overrides=FAST, progress=False)
    assert res.steps > 3  # the schedule was refitted from measured step times
    assert res.seconds < 0.1 * 60 + 5  # budget kept (one eval + checkpoint of slack)
    meta = json.loads((out / "trustmoe.json").read_text())
    assert meta["step"] == res.steps and meta["max_steps"] >= res.steps


def test_validation_says_what_it_measured(tiny_data_dir: Path, tmp_path: Path) -> None:
    res = train(tiny_data_dir, tmp_path / "m", "tiny", max_steps=2, overrides=FAST,
                progress=False)
    assert res.val_tokens == 1 * 4 * 32  # eval_batches x batch_size x seq_len
    assert res.val_measured_on().startswith("128 tokens of val.bin: 4 evenly spaced windows of 32")
    meta = json.loads((tmp_path / "m" / "trustmoe.json").read_text())
    assert meta["metrics"]["val_tokens"] == 128
    assert meta["metrics"]["val_measured_on"] == res.val_measured_on()


def test_reserve_steps_leave_time_for_what_follows(tiny_data_dir: Path, tmp_path: Path) -> None:
    from trustmoe.train.loop import RESERVE_CAP, pace

    assert pace([]) == pace([1.0, 2.0]) == 0.0  # no estimate from the slow first steps
    assert pace([9.0, 1.0, 3.0, 2.0]) == 2.0  # median of the recent steps, oldest left out
    assert pace([9.0, 1.0, 1.0, 60.0]) == 1.0  # a load spike moves it little
    budget_s = 3.0
    # a reserve far beyond the budget is capped: training still gets 40% of the budget
    res = train(tiny_data_dir, tmp_path / "b", "tiny", max_minutes=budget_s / 60,
                max_steps=10_000, overrides=FAST, progress=False, reserve_steps=1e6)
    assert res.stopped == "time" and 3 <= res.steps < 10_000
    assert (1 - RESERVE_CAP) * budget_s <= res.seconds < budget_s
    assert (tmp_path / "b" / "model.safetensors").exists()  # still a complete model dir
    with pytest.raises(TrustmoeError):
        train(tiny_data_dir, tmp_path / "c", "tiny", max_minutes=0.05, progress=False,
              reserve_steps=-1)
