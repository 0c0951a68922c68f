"""Replay: a JSONL of prompts/chats through the real (tiny) model and the detectors, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from monitor_fixtures import code_docs, make_model_and_profile, prose, write_jsonl

from trustmoe.data.tokenizer import load_tokenizer
from trustmoe.deploy.monitor import VersionInfo
from trustmoe.deploy.policy import Policy
from trustmoe.deploy.replay import read_requests, replay
from trustmoe.eval.profile import load_profile
from trustmoe.io import TrustmoeError
from trustmoe.model.hf import load


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_model_and_profile(tmp_path_factory.mktemp("replay"))


def test_code_then_prose_opens_incidents_after_the_switch(setup: tuple[Path, Path], tmp_path: Path) -> None:
    mdir, edir = setup
    code = code_docs(30, seed=7) + code_docs(30, seed=8)  # like the profile's func_0..29 docs
    rows: list[dict[str, object]] = [{"prompt": d, "id": f"c{i}", "latency_s": 0.1} for i, d in enumerate(code)]
    rows += [{"messages": [{"role": "user", "content": t}], "latency_s": 0.1} for t in prose(40, 1)]
    rows.append({"prompt": ""})
    reqs = read_requests(write_jsonl(tmp_path / "r.jsonl", rows), lambda m: "<chat>" + m[0]["content"])
    pol = Policy(window=10, ert_requests=500, consecutive=2, cooldown_requests=1000)
    rep = replay(reqs, load(mdir), load_tokenizer(mdir), load_profile(edir), pol, VersionInfo("tiny:1"),
                 batch_size=8, chunk=32)
    assert rep.requests == 101 and rep.scored == 100 and rep.skipped == [{"line": 101, "reason": "empty prompt"}]
    assert rep.incidents, rep.explain
    first = min(i.window["last_request"] for i in rep.incidents)
    assert 60 < first <= 80  # within two windows of the switch at request 60
    inc = next(i for i in rep.incidents if i.detector == "tokens")
    assert inc.dataset_manifest_sha256 == "ab" * 32  # from the profile's chain
    assert inc.action == "notify" and inc.action_result == "notify only"
    v = rep.status["versions"]["tiny:1"]
    assert v["windows"] == 10 and v["slo"]["pending"] == 100  # SLO windows are 200 requests
    assert rep.to_dict()["incidents"][0]["id"] == rep.incidents[0].id


@pytest.mark.parametrize(("content", "needle"), [
    (b'{"prompt": "a"}\n{"prompt": \n', "r.jsonl:2: malformed JSON"),
    (b'{"prompt": "a"}\n\n[1, 2]\n', "r.jsonl:3: expected a JSON object"),
    (b'{"text": "a"}\n', 'r.jsonl:1: expected a string "prompt" or a "messages" list'),
    (b'{"messages": [{"role": "user"}]}\n', 'r.jsonl:1: "messages" must be'),
    (b'{"prompt": "a", "latency_s": "fast"}\n', "r.jsonl:1: field 'latency_s'"),
    (b'{"prompt": "a", "error": 1}\n', "r.jsonl:1: field 'error'"),
    (b'{"prompt": "ok"}\n{"prompt": "\xff"}\n', "r.jsonl:2: not valid UTF-8"),
    (b"\n\n", "holds no requests"),
])
def test_bad_lines_name_their_line(tmp_path: Path, content: bytes, needle: str) -> None:
    p = tmp_path / "r.jsonl"
    p.write_bytes(content)
    with pytest.raises(TrustmoeError) as e:
        read_requests(p, lambda m: "x")
    assert needle in str(e.value)


def test_chat_without_template_and_missing_file(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TrustmoeError, match="need a chat template"):
        read_requests(p, None)
    with pytest.raises(TrustmoeError, match="not found"):
        read_requests(tmp_path / "none.jsonl")
