"""DP-SGD: per-sample gradients equal a per-example loop, ε equals Opacus's accountant, the
noise is what the accountant assumed, DP training runs end to end, and bad input is refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import trustmoe
from trustmoe.config import get_preset
from trustmoe.io import TrustmoeError
from trustmoe.model.transformer import Transformer
from trustmoe.security import dp as D

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FAST = {"batch_size": 4, "seq_len": 32, "eval_every": 5, "eval_batches": 1,
        "checkpoint_every": 100, "warmup_steps": 3}


def _tiny(seed: int = 0, **changes: object) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(get_preset("tiny").model.replace(**changes))


@pytest.mark.parametrize("changes", [{}, {"shared_expert_intermediate_size": 32},
                                     {"num_local_experts": 1, "num_experts_per_tok": 1}])
def test_per_sample_grads_equal_per_example_loop(changes: dict[str, object]) -> None:
    model = _tiny(**changes).double()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (5, 24), generator=g), torch.randint(0, V, (5, 24), generator=g)
    grads, losses = D.model_per_sample_grads(model, x, y, chunk=2)
    names = [k for k, _ in model.named_parameters()]
    assert set(grads) == set(names)  # every layer, router and experts included
    assert any("gate" in k for k in names) or not model.config.is_moe
    for i in range(5):  # the real model: sorted-expert custom autograd path
        model.zero_grad()
        out = model.run(x[i:i + 1], y[i:i + 1])
        out.loss.backward()
        assert float(losses[i]) == pytest.approx(float(out.loss), abs=1e-6)
        for k, p in model.named_parameters():
            assert p.grad is not None
            torch.testing.assert_close(grads[k][i], p.grad, rtol=0, atol=1e-6, msg=k)
            if k.endswith((".w13", ".w2", "mlp.gate.weight")):
                assert float(grads[k][i].abs().max()) > 0  # experts and router do get gradient


def test_per_sample_grads_match_opacus_grad_sampler() -> None:
    from opacus import GradSampleModule

    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(24, 5)).double()
    x = torch.randint(0, 50, (6, 3))
    y = torch.randint(0, 5, (6,))

    class Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(xi[None]), yi[None])

    ours, _ = D.per_sample_grads(Loss(), x, y, chunk=4)
    gsm = GradSampleModule(net, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    for k, p in net.named_parameters():
        torch.testing.assert_close(ours["net." + k], p.grad_sample, rtol=0, atol=1e-10)


def test_clip_sum_bounds_each_sample() -> None:
    g = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "b": torch.zeros(2, 1)}
    summed, norms = D.clip_sum(g, 1.0)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    torch.testing.assert_close(summed["a"], torch.tensor([0.6 + 0.3, 0.8 + 0.4]), atol=1e-5,
                               rtol=0)


def test_epsilon_matches_opacus_accountants() -> None:
    from opacus.accountants import PRVAccountant, RDPAccountant

    cfg = D.DPConfig(epsilon=3.0, delta=1e-5)
    q, steps = 0.01, 400
    sigma = D.calibrate_noise(cfg, q, steps)
    ref = RDPAccountant()
    for _ in range(steps):
        ref.step(noise_multiplier=sigma, sample_rate=q)
    eps = D.spent_epsilon(sigma, q, steps, 1e-5)
    assert eps == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    assert eps == pytest.approx(3.0, abs=0.02)  # calibrated to the target
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    assert D.spent_epsilon(sigma, q, steps, 1e-5, "prv") == pytest.approx(
        prv.get_epsilon(1e-5), rel=1e-6)
    assert D.spent_epsilon(sigma, q, steps // 2, 1e-5) < eps  # fewer steps spend less


def test_poisson_batches_have_rate_q() -> None:
    sizes = [len(D.poisson_indices(1000, 0.02, 0, s)) for s in range(300)]
    assert np.mean(sizes) == pytest.approx(20, rel=0.08)
    assert np.std(sizes) == pytest.approx(math.sqrt(1000 * 0.02 * 0.98), rel=0.2)
    assert list(D.poisson_indices(1000, 0.02, 0, 7)) == list(D.poisson_indices(1000, 0.02, 0, 7))


def test_noise_has_the_calibrated_scale() -> None:
    """With every gradient zeroed by an all-zero model output, p.grad is pure noise: σC/E[B]."""
    model = _tiny()
    for p in model.parameters():
        nn.init.zeros_(p)  # zero weights: every per-sample gradient is exactly 0
    tokens = np.arange(40 * 33) % 7
    dps = D.DPSGD(model, tokens, 32, 4, 50, D.DPConfig(epsilon=2.0, delta=1e-3), seed=0)
    dps.step(0)
    w = model.embed_tokens.weight.grad
    assert w is not None
    expected = dps.state.noise_multiplier * 1.0 / 4
    assert float(w.std()) == pytest.approx(expected, rel=0.05)
    assert dps.state.steps == 1 and 0 < dps.state.epsilon < 2.0


@pytest.mark.parametrize(("kw", "msg"), [
    ({"epsilon": 0.0}, "--dp-epsilon must be a positive"),
    ({"epsilon": -1.0}, "--dp-epsilon must be a positive"),
    ({"epsilon": float("inf")}, "--dp-epsilon must be a positive"),
    ({"epsilon": 1.0, "delta": 1.0}, "--dp-delta must be in"),
    ({"epsilon": 1.0, "delta": 0.0}, "--dp-delta must be in"),
    ({"epsilon": 1.0, "max_grad_norm": 0.0}, "--max-grad-norm must be positive"),
    ({"epsilon": 1.0, "accountant": "gdp"}, "accountant must be one of"),
])
def test_bad_dp_config_is_refused(kw: dict[str, float], msg: str) -> None:
    with pytest.raises(TrustmoeError, match=msg):
        D.DPConfig(**kw).validate()  # type: ignore[arg-type]


def test_delta_above_one_over_n_is_refused(tiny_data_dir: Path, tmp_path: Path) -> None:
    from trustmoe.train import train

    with pytest.raises(TrustmoeError, match="must be below 1/N"):
        train(tiny_data_dir, tmp_path / "m", "tiny", max_steps=3, overrides=FAST,
              progress=False, dp=D.DPConfig(epsilon=1.0, delta=0.5))


def test_dp_training_records_epsilon(tiny_data_dir: Path, tmp_path: Path) -> None:
    from trustmoe.train import train

    cfg = D.DPConfig(epsilon=4.0, delta=1e-4, max_grad_norm=1.0)
    res = train(tiny_data_dir, tmp_path / "m", "tiny", max_steps=6, overrides=FAST,
                progress=False, dp=cfg)
    meta = json.loads((tmp_path / "m/trustmoe.json").read_text())
    d = meta["dp"]
    assert res.dp is not None and d["steps"] == 6 and d["planned_steps"] == 6
    assert d["epsilon"] == pytest.approx(D.spent_epsilon(d["noise_multiplier"], d["sample_rate"],
                                                         6, 1e-4), rel=1e-9)
    assert d["epsilon"] == pytest.approx(4.0, abs=0.05)  # whole schedule run: target spent
    assert all(math.isfinite(x) for x in res.losses)
    lines = [json.loads(x) for x in (tmp_path / "m/metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["dp_epsilon"] == pytest.approx(d["epsilon"])
    trustmoe.load(tmp_path / "m")  # a normal model dir


def test_cli_bad_epsilon_is_one_line(tiny_data_dir: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "trustmoe.cli", "train", "--data",
                        str(tiny_data_dir), "--out", str(tmp_path / "m"), "--preset", "tiny",
                        "--dp-epsilon", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--dp-epsilon must be a positive" in r.stderr
    assert not (tmp_path / "m").exists()
