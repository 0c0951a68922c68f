"""monitor.toml: every key read, checked and explained; unknown keys refused, not ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustmoe.deploy.policy import Policy, load_policy
from trustmoe.io import TrustmoeError

FULL = """
[monitor]
window = 50
ert_requests = 5000
consecutive = 3
cooldown_requests = 200
cooldown_s = 60.5
log_prompts = true
sample_requests = 4
seed = 7

[actions]
act = ["hidden", "slo"]
action = "rollback_canary"

[detectors.tokens]
floor = 0.2
bins = 10
consecutive = 1

[detectors.scalars]
features = ["prompt_tokens", "mean_nll"]

[detectors.hidden]
enabled = false
permutations = 50

[slo]
window = 100
p99_latency_s = 2
max_error_rate = 0.01
max_guard_block_rate = 0.5
consecutive = 2

[notify]
webhook = "http://127.0.0.1:9/hook"
timeout_s = 1.5
retries = 1
secret_env = "HOOK_SECRET"
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "monitor.toml"
    p.write_text(text)
    return p


def test_full_policy_is_read(tmp_path: Path) -> None:
    p = load_policy(_write(tmp_path, FULL))
    assert (p.window, p.ert_requests, p.consecutive, p.cooldown_requests, p.cooldown_s) == (50, 5000, 3, 200, 60.5)
    assert p.log_prompts and p.sample_requests == 4 and p.seed == 7
    assert p.detectors["tokens"].floor == 0.2 and p.detectors["tokens"].options["bins"] == 10
    assert p.detectors["tokens"].consecutive == 1 and p.detectors["routing"].consecutive == 3
    assert p.detectors["scalars"].options["features"] == ["prompt_tokens", "mean_nll"]
    assert not p.detectors["hidden"].enabled
    assert p.slo.limits() == {"p99_latency_s": 2.0, "max_error_rate": 0.01, "max_guard_block_rate": 0.5}
    assert p.webhook is not None and p.webhook.timeout_s == 1.5 and p.webhook.secret_env == "HOOK_SECRET"
    assert p.action_for("hidden") == "rollback_canary" and p.action_for("slo.max_error_rate") == "rollback_canary"
    assert p.action_for("tokens") == "notify"


def test_defaults() -> None:
    p = load_policy(None)
    assert p == Policy() and p.action == "notify" and p.webhook is None
    assert p.slo.limits() == {"max_error_rate": 0.05}
    assert all(d.consecutive == 2 for d in p.detectors.values())


@pytest.mark.parametrize(("text", "needle"), [
    ("[monitor]\nwindwo = 10\n", "unknown key(s) ['windwo']"),
    ("[slo]\np99_latency = 1\n", "unknown key(s) ['p99_latency']"),
    ("[monitr]\n", "unknown key(s) ['monitr']"),
    ("[detectors.vibes]\n", "unknown detector [detectors.vibes]"),
    ("[monitor]\nwindow = -5\n", "window must be in"),
    ("[monitor]\nwindow = 'ten'\n", "window must be int"),
    ("[monitor]\nlog_prompts = 1\n", "log_prompts must be bool"),
    ("[monitor]\nwindow = true\n", "window must be int"),
    ("[monitor]\nert_requests = nan\n", "ert_requests must be"),
    ("[monitor]\nwindow = 100\nert_requests = 150\n", "must exceed window x consecutive"),
    ("[actions]\naction = 'reboot'\n", "action must be one of"),
    ("[actions]\nact = ['tokenz']\n", "unknown detector 'tokenz'"),
    ("[slo]\nmax_error_rate = 2\n", "max_error_rate must be in"),
    ("[notify]\nwebhook = 'ftp://x'\n", "must be an http(s) URL"),
    ("[detectors.scalars]\nfeatures = ['mood']\n", "unknown feature(s) ['mood']"),
    ("[monitor\n", "malformed TOML"),
])
def test_bad_policies_fail_with_one_clear_message(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(TrustmoeError) as e:
        load_policy(_write(tmp_path, text))
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TrustmoeError, match="not found"):
        load_policy(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[monitor]\nwindow = 10 # \xff\n")
    with pytest.raises(TrustmoeError, match="not valid UTF-8"):
        load_policy(bad)
