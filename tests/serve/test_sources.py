"""What a served model is resolved from: registry refs, plain dirs, and one-line refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustmoe.io import TrustmoeError, sha256_file
from trustmoe.serve.sources import parse_source, resolve_source


def test_parse_source_kinds(tmp_path: Path, tiny_model_dir: Path) -> None:
    s = parse_source("production", "registry:demo@production", bare_is_registry=False)
    assert (s.registry_ref, s.path, s.follows) == ("demo@production", None, True)
    assert not parse_source("production", "registry:demo@3", bare_is_registry=False).follows
    assert parse_source("production", "registry:demo", bare_is_registry=False).follows  # latest
    s = parse_source("canary", "demo@canary", bare_is_registry=True)
    assert s.registry_ref == "demo@canary" and s.role == "canary"
    s = parse_source("production", str(tiny_model_dir), bare_is_registry=False)
    assert s.path == tiny_model_dir and not s.follows
    with pytest.raises(TrustmoeError, match="model directory not found"):
        parse_source("production", "demo@production", bare_is_registry=False)
    with pytest.raises(TrustmoeError, match=r"no config\.json"):
        parse_source("production", str(tmp_path), bare_is_registry=False)
    with pytest.raises(TrustmoeError, match="versions start at 1"):
        parse_source("production", "registry:demo@0", bare_is_registry=False)


def test_plain_dir_digest_is_the_weights_sha256(tiny_model_dir: Path) -> None:
    src = parse_source("production", str(tiny_model_dir), bare_is_registry=False)
    v = resolve_source(src, lambda: pytest.fail("a plain dir needs no registry"))
    assert v.digest == sha256_file(tiny_model_dir / "model.safetensors")
    assert v.key == v.name == "tiny-moe" and v.version is None and v.role == "production"
    assert v.header == f"tiny-moe@sha256:{v.digest[:12]}"
