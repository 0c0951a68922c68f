"""signing.py: Ed25519 over the manifest; any change to a file or the manifest breaks it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustmoe.io import TrustmoeError
from trustmoe.security.integrity import SIGNATURE, IntegrityError, check_on_load, verify_dir, write_manifest
from trustmoe.security.signing import generate_key, load_public_key, sign_dir


@pytest.fixture()
def signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    d = tmp_path / "art"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"\x00" * 100)
    (d / "config.json").write_text("{}")
    write_manifest(d)
    generate_key(tmp_path / "k.pem", tmp_path / "k.pub")
    sign_dir(d, tmp_path / "k.pem")
    return d, tmp_path / "k.pem", tmp_path / "k.pub"


def test_sign_and_verify(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    d, _, pub = signed
    res = verify_dir(d, pub)
    assert res.ok and res.signed and res.signature_ok and res.signer
    assert verify_dir(d).signature_ok is None  # no key given: present but not judged
    check_on_load(d, pubkey=pub)
    other_priv = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives import serialization as ser

    raw = other_priv.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    (tmp_path / "other.pub").write_text(base64.b64encode(raw).decode())  # raw base64 form
    res = verify_dir(d, tmp_path / "other.pub")
    assert not res.ok and res.signature_ok is False
    with pytest.raises(IntegrityError, match="signature"):
        check_on_load(d, pubkey=tmp_path / "other.pub")


def test_tampering_breaks_it(signed: tuple[Path, Path, Path]) -> None:
    d, _, pub = signed
    m = json.loads((d / "integrity.json").read_text())
    (d / "weights.bin").write_bytes(b"\x01" * 100)  # attacker also fixes the manifest...
    import hashlib

    m["files"]["weights.bin"]["sha256"] = hashlib.sha256(b"\x01" * 100).hexdigest()
    (d / "integrity.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    assert verify_dir(d).ok  # ...so the hashes alone agree,
    res = verify_dir(d, pub)
    assert not res.ok and res.signature_ok is False  # but the signature does not


def test_missing_signature_when_required(signed: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    d, _, pub = signed
    (d / SIGNATURE).unlink()
    monkeypatch.setenv("TRUSTMOE_PUBKEY", str(pub))
    with pytest.raises(IntegrityError, match=r"signature: integrity\.sig"):
        check_on_load(d)


def test_key_errors(tmp_path: Path, signed: tuple[Path, Path, Path]) -> None:
    d, priv, _ = signed
    with pytest.raises(TrustmoeError, match="exists"):
        generate_key(priv, tmp_path / "x.pub")
    with pytest.raises(TrustmoeError, match="not found"):
        sign_dir(d, tmp_path / "none.pem")
    (tmp_path / "bad.pem").write_text("hello")
    with pytest.raises(TrustmoeError, match="PEM private key"):
        sign_dir(d, tmp_path / "bad.pem")
    with pytest.raises(TrustmoeError, match="not an Ed25519 public key"):
        load_public_key(tmp_path / "bad.pem")
    (d / "new.txt").write_text("x")
    with pytest.raises(TrustmoeError, match="refusing to sign"):
        sign_dir(d, priv)
