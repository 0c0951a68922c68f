"""Signed registrations: the registry can require that a model is signed by a trusted key.

The policy lives in the gates file (`gates.toml`), next to the promotion gates:

    [signatures]
    require = true
    keys = ["keys/release.pub"]   # Ed25519 public keys (PEM or base64), relative to the file

or comes from `trustmoe registry add --pubkey KEY` (repeatable; it turns the requirement on
and adds KEY to the trusted keys). With it, `add` refuses a model dir whose `integrity.sig`
(`trustmoe sign`) is missing or does not verify under a trusted key, or whose stored files are
not exactly the ones its signed `integrity.json` lists; `promote` checks the stored version the
same way against the keys trusted *now* (versions registered before the policy, or signed by a
key since removed, are refused; `--force` does not override a signature requirement).
What was checked is recorded in the version's metadata under `signature`:
`{"signed": true, "verified": true, "key": "<fingerprint of the trusted key>", "signer": ...}`
(an unchecked signature is recorded with `"verified": false` and the fingerprint it names).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustmoe.deploy.blobs import FileEntry
from trustmoe.deploy.db import RegistryError
from trustmoe.io import TrustmoeError
from trustmoe.security.integrity import MANIFEST, RESERVED, SIGNATURE, parse_manifest

Reader = Callable[[FileEntry], bytes]


@dataclass(frozen=True)
class SignaturePolicy:
    require: bool = False
    keys: tuple[str, ...] = ()  # public key files

    def with_keys(self, keys: Iterable[str | Path]) -> SignaturePolicy:
        """This policy with more trusted keys (given on the command line): required from now."""
        more = tuple(str(k) for k in keys)
        return SignaturePolicy(True, self.keys + more) if more else self


def parse_signatures(table: Any, source: str) -> SignaturePolicy:
    """The `[signatures]` table of a gates file (key paths relative to the file's folder)."""
    where = f"gates file {source}: [signatures]"
    if not isinstance(table, dict):
        raise RegistryError(f"{where} must be a table")
    bad = set(table) - {"require", "keys"}
    if bad:
        raise RegistryError(f"{where}: unknown key {sorted(bad)[0]!r} (known: keys, require)")
    require = table.get("require", False)
    keys = table.get("keys", [])
    if not isinstance(require, bool):
        raise RegistryError(f"{where}: require must be true or false")
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise RegistryError(f"{where}: keys must be a list of public key files")
    if require and not keys:
        raise RegistryError(f"{where}: require = true needs at least one trusted key in keys")
    base = Path(source).parent if Path(source).is_file() else Path(".")
    return SignaturePolicy(require, tuple(str(k if Path(k).is_absolute() else base / k) for k in keys))


def check_signed(entries: list[FileEntry], read: Reader, policy: SignaturePolicy, where: str,
                 skipped: Iterable[str] = ()) -> dict[str, Any] | None:
    """The `signature` record of a model's files (`entries`, contents through `read`); with
    `policy.require`, RegistryError (one line) unless they are signed by a trusted key and
    are exactly the files the signed manifest lists (`skipped`: listed but left out on purpose)."""
    by_path = {e.path: e for e in entries}
    man, sig = by_path.get(MANIFEST), by_path.get(SIGNATURE)
    if not policy.require:
        return None if sig is None else {"signed": True, "verified": False, "key": None,
                                         "signer": _named_signer(read(sig))}
    from trustmoe.security.signing import key_fingerprint, trusted_signer

    try:
        trusted = ", ".join(key_fingerprint(k) for k in policy.keys)
        if man is None or sig is None:
            missing = MANIFEST if man is None else SIGNATURE
            raise RegistryError(f"refusing {where}: it is not signed (no {missing}; `trustmoe sign DIR "
                                f"--key KEY`) and this registry requires a signature by a trusted key "
                                f"({trusted})")
        body = read(man)
        key = trusted_signer(body, read(sig), list(policy.keys), where)
        listed = parse_manifest(body, where)
    except RegistryError:
        raise
    except TrustmoeError as e:  # a bad key file, a malformed or foreign signature or manifest
        raise RegistryError(f"refusing {where}: {e}") from None
    stored = {p: e for p, e in by_path.items() if p not in RESERVED}
    skip = set(skipped)
    for name, ent in sorted(listed.items()):
        got = stored.get(name)
        if got is None and name not in skip:
            raise RegistryError(f"refusing {where}: {name} is in the signed manifest but not in the dir")
        if got is not None and (got.sha256 != ent["sha256"] or got.size != ent["size"]):
            raise RegistryError(f"refusing {where}: {name} is not the file that was signed "
                                "(its SHA-256 differs from the signed manifest)")
    extra = sorted(set(stored) - set(listed))
    if extra:
        raise RegistryError(f"refusing {where}: {extra[0]} is not in the signed manifest")
    return {"signed": True, "verified": True, "key": key, "signer": key}


def _named_signer(raw: bytes) -> str | None:
    """The fingerprint an integrity.sig names for itself (not a proof of anything)."""
    try:
        fp = json.loads(raw).get("fingerprint")
    except (ValueError, AttributeError, RecursionError):
        return None
    return fp if isinstance(fp, str) and len(fp) <= 64 else None
