"""End to end: a real registry (SQLite), the real fleet and HTTP server with `--monitor`'s
wiring (`serve.monitoring.attach`), real `openai` clients. Production serves v1; v2, a
deliberately worse copy of v1 (its weights perturbed), is the canary at 20%. Traffic flows,
the monitor opens an incident on v2 and rolls the canary back to 0% by itself within two
windows, and no client request fails.

What is compared with what: both versions are registered with v1's eval dir, whose profile is
v1's own features (NLL, entropy, top-1, hidden states, expert routing, tokens) on "trusted
traffic": prompts from the same generator the clients draw from, another seed. Production is
thus judged against its own reference (it must stay quiet) and the canary against the baseline
it has to match: the same kind of prompts, but v2's weights give other per-request signals.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from monitor_helpers import model_eval_dir, tokenizer_vocab, traffic

from trustmoe.config import EngineConfig
from trustmoe.deploy.incidents import IncidentStore
from trustmoe.deploy.registry import Registry
from trustmoe.engine.features import features_from_model
from trustmoe.model.hf import load, save_model
from trustmoe.security.guard import Guard, GuardPolicy
from trustmoe.serve.app import create_app
from trustmoe.serve.fleet import ServeConfig
from trustmoe.serve.monitoring import attach

WINDOW = 10
MONITOR_TOML = f"""
[monitor]
window = {WINDOW}
ert_requests = 100000
consecutive = 2
cooldown_requests = 1000
cooldown_s = 0

[actions]
act = ["drift"]
action = "rollback_canary"

[detectors.hidden]
permutations = 50

[slo]
window = 50
max_error_rate = 0.05
"""


def perturbed_copy(src: Path, out: Path, std: float, dataset_sha: str) -> Path:
    """v2: v1's weights plus Gaussian noise (every matrix), saved as a full model dir."""
    model = load(src)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=g) * std)
    save_model(model, out, tokenizer_file=src / "tokenizer.json",
               metadata={"dataset_manifest_sha256": dataset_sha})
    return out


def relabel(model_dir: Path, dataset_sha: str) -> Path:
    """v1 as a model trained on dataset `dataset_sha` (its lineage in trustmoe.json)."""
    model = load(model_dir)
    save_model(model, model_dir, tokenizer_file=model_dir / "tokenizer.json",
               metadata={"dataset_manifest_sha256": dataset_sha})
    return model_dir


@pytest.mark.slow
def test_worse_canary_is_rolled_back_within_two_windows(tmp_path: Path, model_dir_factory: Any,
                                                        live_server: Any) -> None:
    v1_dir = relabel(model_dir_factory(tmp_path / "v1", seed=0), "a1" * 32)
    v2_dir = perturbed_copy(v1_dir, tmp_path / "v2", std=0.3, dataset_sha="b2" * 32)
    shutil.copyfile(v1_dir / "tokenizer_config.json", v2_dir / "tokenizer_config.json")
    vocab = tokenizer_vocab(v1_dir)

    # v1's reference profile on trusted traffic; v2 really is worse on it (higher NLL)
    reference = traffic(seed=1, n=300, vocab=vocab)
    eval_dir = model_eval_dir(v1_dir, tmp_path / "eval-v1", reference)
    probe = reference[:32]
    nll1 = sum(f.mean_nll for f in features_from_model(load(v1_dir), probe)) / len(probe)
    nll2 = sum(f.mean_nll for f in features_from_model(load(v2_dir), probe)) / len(probe)
    assert nll2 > nll1 + 0.1, (nll1, nll2)

    db = tmp_path / "registry.db"
    with Registry.open(db) as reg:
        d1 = reg.add(v1_dir, "demo", eval_dir=eval_dir, why="v1").digest
        d2 = reg.add(v2_dir, "demo", eval_dir=eval_dir, why="v2: judged against v1's profile").digest
        reg.promote("demo", 1, "production", why="baseline", force=True)
        reg.promote("demo", 2, "canary", why="try v2", force=True)
    policy_path = tmp_path / "monitor.toml"
    policy_path.write_text(MONITOR_TOML)

    cfg = ServeConfig(engine=EngineConfig(features=True, kv_cache_mb=8, max_num_seqs=8),
                      registry_url=str(db), canary="demo@canary", canary_percent=20.0,
                      guard=Guard(GuardPolicy(enabled=False, model="none")))
    app = create_app("registry:demo@production", cfg)
    live = attach(app, policy_path)
    fleet = app.state.fleet
    assert live._thread is None  # the worker runs with the app's lifespan, not before

    prompts = iter(traffic(seed=2, n=2000, vocab=vocab))
    lock = threading.Lock()
    answered: list[tuple[float, str]] = []  # (time, x-trustmoe-model)
    failures: list[str] = []
    rolled_back_at: list[float] = []
    stop = threading.Event()

    def client(url: str) -> None:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        while not stop.is_set():
            with lock:
                p = next(prompts, None)
            if p is None:
                return
            try:
                raw = c.completions.with_raw_response.create(model="demo", prompt=p, max_tokens=2,
                                                             temperature=0)
                raw.parse()
                with lock:
                    answered.append((time.monotonic(), raw.headers["x-trustmoe-model"]))
            except Exception as e:  # every failure is counted, none is retried
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")

    t0 = time.monotonic()
    with live_server(app) as srv:
        assert live._thread is not None and live._thread.is_alive()
        threads = [threading.Thread(target=client, args=(srv.url,)) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            while time.monotonic() - t0 < 90 and not failures:
                if fleet.canary_percent() == 0.0:
                    if not rolled_back_at:
                        rolled_back_at.append(time.monotonic())
                    elif time.monotonic() - rolled_back_at[0] > 2.0:
                        break  # traffic kept flowing for 2 s after the rollback
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        deadline = time.monotonic() + 30  # the fleet hands finished requests over on its thread
        while live.counters.submitted < len(answered) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.drain(60)
        status = httpx.get(srv.url + "/dashboard/status.json", timeout=30).json()
    assert live._thread is None  # stopped with the app

    assert not failures, failures[:5]
    assert rolled_back_at, f"no rollback after {len(answered)} requests: {status['queue']}"
    canary_answers = [h for _, h in answered if h.startswith("demo:2@")]
    assert canary_answers, "the canary answered nothing"
    late = [h for t, h in answered if t > rolled_back_at[0] + 0.5]  # in-flight ones finished
    assert late and all(h.startswith("demo:1@") for h in late), late[:5]

    stored = IncidentStore(str(db)).list()
    acted = [i for i in stored if i.action_result == "canary demo:2 set to 0% of traffic"]
    assert acted, [(i.detector, i.version, i.action_result) for i in stored]
    inc = acted[0]
    assert inc.version == "demo:2" and inc.role == "canary" and inc.model == "demo"
    assert inc.window["last_request"] <= 2 * WINDOW  # within two windows of canary traffic
    assert inc.digest == d2 and inc.dataset_manifest_sha256 == "b2" * 32
    served = {v["key"]: v for v in status["served"]}
    assert inc.profile_ref and inc.profile_ref.startswith(served["demo:2"]["eval_dir"])
    assert not [i for i in stored if i.version == "demo:1"], "production drifted from its own profile"
    assert served["demo:1"]["digest"] == d1
    assert status["canary_percent"] == 0.0 and status["queue"]["dropped"] == 0
    assert status["queue"]["observed"] == len(answered)  # every request reached the monitor
    assert any(i["id"] == inc.id for i in status["incidents"])
