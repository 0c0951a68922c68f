"""Shadow serving: paired comparisons checked against a teacher-forced reference from the model.

The reference is written from the definition in `serve/shadow.py`: decode the primary greedily
with the torch model, score those tokens with the shadow's torch model, count argmax matches
and average the negative log-likelihoods.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import trustmoe
from trustmoe.config import EngineConfig
from trustmoe.deploy.registry import Registry
from trustmoe.serve.app import create_app
from trustmoe.serve.fleet import MODEL_HEADER, ServeConfig
from trustmoe.serve.shadow import compare

ENGINE = EngineConfig(kv_cache_mb=8, max_num_seqs=8, max_queue=32)
PROMPT = "def value(x):"
N_TOKENS = 8


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory, model_dir_factory: Any
                 ) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("shadow")
    m1, m2 = model_dir_factory(root / "p", seed=11), model_dir_factory(root / "s", seed=12)
    db = root / "reg.db"
    with Registry.open(db) as reg:
        reg.add(m1, "m", why="test")
        reg.add(m2, "m", why="test")
        reg.promote("m", 1, "production", why="test", force=True)
        reg.promote("m", 2, "candidate", why="test", force=True)
    return db, m1, m2


def _reference(primary: Path, shadow: Path, prompt_ids: list[int], n: int
               ) -> tuple[list[int], float, float, float]:
    """Greedy tokens of `primary`, then (tokens, agreement, primary NLL, shadow NLL)."""
    p, s = trustmoe.load(primary).eval(), trustmoe.load(shadow).eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(p(torch.tensor([ids]))[0, -1].argmax()))
        full = torch.tensor([ids])  # (1, P+n)
        lp_p = torch.log_softmax(p(full)[0].float(), -1)  # (P+n, V)
        lp_s = torch.log_softmax(s(full)[0].float(), -1)
    P = len(prompt_ids)
    toks = ids[P:]
    pos = range(P - 1, P - 1 + n)  # row t predicts token t+1
    agree = sum(int(lp_s[t].argmax()) == ids[t + 1] for t in pos) / n
    nll_p = -sum(float(lp_p[t, ids[t + 1]]) for t in pos) / n
    nll_s = -sum(float(lp_s[t, ids[t + 1]]) for t in pos) / n
    return toks, agree, nll_p, nll_s


def _wait_lines(path: Path, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines()]
            if len(lines) >= n:
                return lines
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} shadow comparisons in {path}")


def test_shadow_matches_a_teacher_forced_reference(two_versions: tuple[Path, Path, Path],
                                                   live_server: Any, tmp_path: Path) -> None:
    db, m1, m2 = two_versions
    log = tmp_path / "shadow.jsonl"
    app = create_app("registry:m@production", ServeConfig(
        engine=ENGINE, registry_url=str(db), shadow="m@candidate", shadow_log=log))
    fleet = app.state.fleet
    with live_server(app) as srv:
        body = {"model": "m", "prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.headers[MODEL_HEADER].startswith("m:1@")
        line = _wait_lines(log, 1)[0]
        prompt_ids = fleet.production.state.engine.encode(PROMPT)
        toks, agree, nll_p, nll_s = _reference(m1, m2, prompt_ids, N_TOKENS)
        # the user's answer is the primary's own greedy text, untouched by the shadow
        assert r.json()["choices"][0]["text"] == fleet.production.state.engine.decode(toks)
        assert (line["primary"], line["shadow"], line["tokens"]) == ("m:1", "m:2", N_TOKENS)
        assert line["agreement"] == pytest.approx(agree, abs=1e-9)
        assert line["primary_nll"] == pytest.approx(nll_p, abs=2e-3)
        assert line["shadow_nll"] == pytest.approx(nll_s, abs=2e-3)
        assert line["nll_difference"] == pytest.approx(nll_s - nll_p, abs=4e-3)
        assert line["primary_latency_s"] > 0 and line["shadow_latency_s"] > 0
        # a streamed answer is copied too; the metrics count both
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True},
                          timeout=60) as s:
            assert s.status_code == 200 and "data: [DONE]" in s.read().decode()
        _wait_lines(log, 2)
        text = httpx.get(srv.url + "/metrics").text
        assert 'trustmoe:shadow_comparisons_total{outcome="compared"} 2.0' in text
        assert 'trustmoe:shadow_token_agreement_count{primary="m:1",shadow="m:2"} 2.0' in text
        assert 'role="shadow",status="200"' not in text  # the shadow never answers a client


def test_shadow_of_the_same_weights_agrees_fully(two_versions: tuple[Path, Path, Path],
                                                 live_server: Any, tmp_path: Path) -> None:
    db, m1, _ = two_versions
    log = tmp_path / "same.jsonl"
    app = create_app("registry:m@production", ServeConfig(
        engine=ENGINE, registry_url=str(db), shadow=str(m1), shadow_log=log, shadow_percent=100))
    with live_server(app) as srv:
        for i in range(3):
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                "model": "m", "messages": [{"role": "user", "content": f"x{i}"}],
                "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200
        for line in _wait_lines(log, 3):
            assert line["agreement"] == 1.0 and abs(line["nll_difference"]) < 1e-3


def test_shadow_percent_zero_copies_nothing(two_versions: tuple[Path, Path, Path],
                                            live_server: Any, tmp_path: Path) -> None:
    db, _, _ = two_versions
    log = tmp_path / "none.jsonl"
    app = create_app("registry:m@production", ServeConfig(
        engine=ENGINE, registry_url=str(db), shadow="m@candidate", shadow_log=log,
        shadow_percent=0))
    with live_server(app) as srv:
        r = httpx.post(srv.url + "/v1/completions", timeout=60,
                       json={"prompt": "def", "max_tokens": 3})
        assert r.status_code == 200
        time.sleep(0.3)
    assert not log.exists()


def test_compare_definition() -> None:
    agree, p, s = compare([5, 6, 7, 8], [-0.5, -1.0, -1.5, -2.0], [5, 0, 7, 0],
                          [-1.0, -1.0, -1.0, -1.0])
    assert agree == 0.5 and p == pytest.approx(1.25) and s == pytest.approx(1.0)
    with pytest.raises(ValueError):
        compare([], [], [], [])
