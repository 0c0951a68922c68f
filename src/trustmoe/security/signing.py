"""Ed25519 signatures over an artifact's manifest (`cryptography`, the `security` extra).

`integrity.sig` is JSON: {"algorithm": "ed25519", "public_key": base64 raw key,
"fingerprint": sha256 of the raw key (hex, first 16), "signature": base64 over the exact
bytes of integrity.json}. Since the manifest holds every file's SHA-256, the signature covers
every file. Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public) or, for a public
key, the raw 32 bytes in base64 on one line.

    generate_key("signing.pem", "signing.pub")
    sign_dir("runs/demo/model", "signing.pem")
    verify_dir("runs/demo/model", pubkey="signing.pub").ok
    trusted_signer(manifest_bytes, sig_bytes, ["a.pub", "b.pub"])   # fingerprint, or raises
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustmoe.io import TrustmoeError, atomic_write_bytes, atomic_write_text
from trustmoe.security.integrity import MANIFEST, SIGNATURE, Problem, VerifyResult, read_manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise TrustmoeError("signing needs the `cryptography` package: pip install "
                            "'trustmoe[security]'") from None
    return serialization


def fingerprint(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key(private_path: str | os.PathLike[str], public_path: str | os.PathLike[str]) -> str:
    """Write a new Ed25519 key pair (private key file mode 0600); returns its fingerprint."""
    ser = _crypto()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if Path(private_path).exists():
        raise TrustmoeError(f"{private_path} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    atomic_write_bytes(private_path, pem)
    os.chmod(private_path, 0o600)
    pub = key.public_key()
    atomic_write_bytes(public_path, pub.public_bytes(ser.Encoding.PEM,
                                                     ser.PublicFormat.SubjectPublicKeyInfo))
    return fingerprint(pub.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    ser = _crypto()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = ser.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise TrustmoeError(f"key file not found: {path}") from None
    except (ValueError, TypeError) as e:
        raise TrustmoeError(f"{path} is not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise TrustmoeError(f"{path} is not an Ed25519 key")
    return key


def load_public_key(src: str | os.PathLike[str] | bytes) -> Ed25519PublicKey:
    """A PEM file, a file with the base64 raw key, or the raw 32 bytes."""
    ser = _crypto()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(src, bytes) and len(src) == 32:
        return Ed25519PublicKey.from_public_bytes(src)
    what = "the given key" if isinstance(src, bytes) else str(src)
    try:
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
    except FileNotFoundError:
        raise TrustmoeError(f"public key file not found: {what}") from None
    try:
        if b"-----BEGIN" in data:
            key = ser.load_pem_public_key(data)
            if not isinstance(key, Ed25519PublicKey):
                raise TrustmoeError(f"{what} is not an Ed25519 public key")
            return key
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(data.strip(), validate=True))
    except TrustmoeError:
        raise
    except (ValueError, TypeError) as e:
        raise TrustmoeError(f"{what} is not an Ed25519 public key ({e})") from None


def sign_dir(path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> str:
    """Sign the dir's manifest (it must exist and match the files); returns the fingerprint."""
    from trustmoe.security.integrity import verify_dir

    ser = _crypto()
    root = Path(path)
    res = verify_dir(root, full=True)
    if not res.has_manifest:
        raise TrustmoeError(f"{root} has no {MANIFEST}; write one first (`trustmoe verify --write`)")
    if res.problems:
        raise TrustmoeError(f"refusing to sign {root}: {res.problems[0]}")
    key = load_private_key(key_path)
    raw = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    body = (root / MANIFEST).read_bytes()
    sig = {"algorithm": "ed25519", "public_key": base64.b64encode(raw).decode(),
           "fingerprint": fingerprint(raw), "signature": base64.b64encode(key.sign(body)).decode()}
    atomic_write_text(root / SIGNATURE, json.dumps(sig, indent=1, sort_keys=True) + "\n")
    return fingerprint(raw)


def check_signature(root: Path, pubkey: str | os.PathLike[str] | bytes | None,
                    res: VerifyResult) -> None:
    """Fill res.signed / signature_ok / signer; with `pubkey` a bad or absent one is a problem."""
    from cryptography.exceptions import InvalidSignature

    ser = _crypto()
    path = root / SIGNATURE
    if not path.is_file():
        if pubkey is not None:
            res.signature_ok = False
            res.problems.append(Problem("signature", SIGNATURE, "missing"))
        return
    res.signed = True
    try:
        sig = json.loads(path.read_bytes())
        signature = base64.b64decode(sig["signature"], validate=True)
        embedded = base64.b64decode(sig["public_key"], validate=True)
        res.signer = fingerprint(embedded)
    except (ValueError, KeyError, TypeError) as e:
        res.signature_ok = False if pubkey is not None else None
        res.problems.append(Problem("signature", SIGNATURE, f"malformed ({e})"))
        return
    if pubkey is None:
        return
    key = load_public_key(pubkey)
    try:
        read_manifest(root)
        key.verify(signature, (root / MANIFEST).read_bytes())
        res.signature_ok = True
        res.signer = fingerprint(key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))
    except (InvalidSignature, TrustmoeError):
        res.signature_ok = False
        res.problems.append(Problem("signature", SIGNATURE, "does not verify with the given key"))


def key_fingerprint(src: str | os.PathLike[str] | bytes) -> str:
    """Fingerprint of a public key (a PEM file, a base64 file, or the raw 32 bytes)."""
    ser = _crypto()
    return fingerprint(load_public_key(src).public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))


def trusted_signer(manifest: bytes, sig: bytes, keys: list[str | os.PathLike[str] | bytes],
                   where: str = "the artifact") -> str:
    """The fingerprint of the first of `keys` under which `sig` (integrity.sig's bytes) signs
    `manifest` (integrity.json's exact bytes); TrustmoeError with one line if none does."""
    from cryptography.exceptions import InvalidSignature

    if not keys:
        raise TrustmoeError("no trusted public key to check the signature with")
    try:
        doc = json.loads(sig)
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise TrustmoeError(f"{where}: {SIGNATURE} is malformed ({e})") from None
    for k in keys:
        key = load_public_key(k)
        try:
            key.verify(signature, manifest)
        except InvalidSignature:
            continue
        return key_fingerprint(k)
    fps = ", ".join(key_fingerprint(k) for k in keys)
    raise TrustmoeError(f"{where}: {SIGNATURE} does not verify with any trusted key ({fps})")
