"""signatures.py: the registry can require models signed by a trusted Ed25519 key, at `add`
(what is stored must be exactly what was signed) and at `promote` (against the keys trusted
now); on SQLite and PostgreSQL, through the API and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from registry_helpers import Backend, assert_clean_failure, cli_env, make_model, run_cli

from trustmoe.deploy.db import RegistryError
from trustmoe.deploy.gates import parse_policy
from trustmoe.deploy.registry import Registry
from trustmoe.deploy.signatures import SignaturePolicy
from trustmoe.security.integrity import write_manifest
from trustmoe.security.signing import generate_key, sign_dir

OPEN_GATES = '[gates.ece]\nmax = 1e9\nmissing = "skip"\n'


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, str]]:
    """Two key pairs: "trusted" and "other" -> (private, public, fingerprint)."""
    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("trusted", "other"):
        fp = generate_key(d / f"{name}.pem", d / f"{name}.pub")
        out[name] = (d / f"{name}.pem", d / f"{name}.pub", fp)
    return out


def _model(d: Path, seed: int = 1, key: Path | None = None) -> Path:
    make_model(d, seed=seed)
    write_manifest(d)
    if key is not None:
        sign_dir(d, key)
    return d


def test_add_requires_a_trusted_signature_over_exactly_the_stored_files(
        reg: Registry, tmp_path: Path, keys: dict[str, tuple[Path, Path, str]]) -> None:
    pol = SignaturePolicy(True, (str(keys["trusted"][1]),))
    fp = keys["trusted"][2]
    blobs_before = set(reg.store.all_blobs())
    with pytest.raises(RegistryError, match=rf"not signed \(no integrity.sig.*\({fp}\)"):
        reg.add(_model(tmp_path / "unsigned"), "demo", signatures=pol)
    with pytest.raises(RegistryError, match=rf"does not verify with any trusted key \({fp}\)"):
        reg.add(_model(tmp_path / "other", key=keys["other"][0]), "demo", signatures=pol)
    no_manifest = make_model(tmp_path / "bare")
    with pytest.raises(RegistryError, match=r"no integrity\.json"):
        reg.add(no_manifest, "demo", signatures=pol)
    changed = _model(tmp_path / "changed", key=keys["trusted"][0])
    cfg = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**cfg, "hidden_size": 8}))
    with pytest.raises(RegistryError, match=r"config\.json is not the file that was signed"):
        reg.add(changed, "demo", signatures=pol)
    extra = _model(tmp_path / "extra", key=keys["trusted"][0])
    (extra / "notes.txt").write_text("added after signing")
    with pytest.raises(RegistryError, match=r"notes\.txt is not in the signed manifest"):
        reg.add(extra, "demo", signatures=pol)
    # nothing of the refused adds was kept
    assert reg.models() == [] and set(reg.store.all_blobs()) == blobs_before

    v = reg.add(_model(tmp_path / "good", key=keys["trusted"][0]), "demo", signatures=pol)
    assert v.metadata["signature"] == {"signed": True, "verified": True, "key": fp, "signer": fp}
    assert reg.get("demo@1").metadata["signature"]["key"] == fp
    # without a requirement a signature is recorded as the fingerprint it names, unverified
    w = reg.add(_model(tmp_path / "loose", seed=2, key=keys["other"][0]), "demo")
    assert w.metadata["signature"] == {"signed": True, "verified": False, "key": None,
                                       "signer": keys["other"][2]}
    assert "signature" not in reg.add(_model(tmp_path / "plain", seed=3), "demo").metadata


def test_gates_file_requires_signatures_at_add_and_promote(
        backend: Backend, tmp_path: Path, keys: dict[str, tuple[Path, Path, str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    gates = tmp_path / "conf" / "gates.toml"
    gates.parent.mkdir()
    (gates.parent / "trusted.pub").write_bytes(keys["trusted"][1].read_bytes())
    monkeypatch.setenv("TRUSTMOE_GATES", str(gates))
    gates.write_text(OPEN_GATES)
    with backend.open() as reg:
        old = reg.add(_model(tmp_path / "old"), "demo")  # registered before the requirement
        gates.write_text(OPEN_GATES + '[signatures]\nrequire = true\nkeys = ["trusted.pub"]\n')
        with pytest.raises(RegistryError, match="not signed"):
            reg.add(_model(tmp_path / "new-unsigned", seed=2), "demo")
        with pytest.raises(RegistryError, match="not signed"):
            reg.promote("demo", old.version, "production", force=True, why="hotfix")  # not forceable
        assert reg.alias_holder("demo", "production") is None
        signed = reg.add(_model(tmp_path / "signed", seed=3, key=keys["trusted"][0]), "demo")
        assert signed.metadata["signature"]["key"] == keys["trusted"][2]
        assert reg.promote("demo", signed.version, "production").event.version == signed.version
        # the key is no longer trusted: the same version cannot be promoted again
        (gates.parent / "trusted.pub").write_bytes(keys["other"][1].read_bytes())
        with pytest.raises(RegistryError, match="does not verify with any trusted key"):
            reg.promote("demo", signed.version, "canary")


@pytest.mark.parametrize("table, msg", [
    ("require = 1\nkeys = ['k.pub']", "require must be true or false"),
    ("require = true", "needs at least one trusted key"),
    ("require = true\nkeys = 'k.pub'", "keys must be a list"),
    ("require = true\nkeys = ['k.pub']\nalgo = 'rsa'", "unknown key 'algo'"),
])
def test_malformed_signatures_table_is_one_clear_error(table: str, msg: str) -> None:
    with pytest.raises(RegistryError, match=msg):
        parse_policy(OPEN_GATES + "[signatures]\n" + table + "\n", "gates.toml")
    only = parse_policy("[signatures]\nrequire = true\nkeys = ['/k.pub']\n", "x")  # no gates needed
    assert only.signatures == SignaturePolicy(True, ("/k.pub",)) and only.gates == ()


def test_cli_add_with_pubkey(tmp_path: Path, keys: dict[str, tuple[Path, Path, str]]) -> None:
    env = cli_env(str(tmp_path / "registry.db"), tmp_path / "blobs")
    unsigned = _model(tmp_path / "unsigned")
    proc = run_cli(env, "add", str(unsigned), "--name", "demo", "--pubkey", str(keys["trusted"][1]))
    assert_clean_failure(proc, "is not signed")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli(env, "add", str(_model(tmp_path / "s", key=keys["trusted"][0])), "--name", "demo",
                   "--pubkey", str(keys["other"][1]), "--pubkey", str(keys["trusted"][1]))
    assert proc.returncode == 0, proc.stderr
    assert "demo v1  sha256:" in proc.stdout and f"signed by {keys['trusted'][2]}" in proc.stdout
    proc = run_cli(env, "add", str(unsigned), "--name", "demo", "--pubkey", str(tmp_path / "nope.pub"))
    assert_clean_failure(proc, "public key file not found")
