"""The content-addressed blob store: dedup, verification on read, shared trees, refusals, gc."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import time
import zipfile
from pathlib import Path

import pytest
from registry_helpers import make_model

from trustmoe.deploy.blobs import (
    BlobError,
    BlobStore,
    FileEntry,
    collect_dir,
    manifest_digest,
    safe_relpath,
)
from trustmoe.deploy.db import RegistryError


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    s = BlobStore(tmp_path / "blobs")
    s.claim("reg-1")
    return s


def _put_dir(store: BlobStore, d: Path) -> list[FileEntry]:
    out = []
    for rel, p in collect_dir(d, "model"):
        sha, size = store.put(p)
        out.append(FileEntry(rel, sha, size))
    return out


def test_put_is_content_addressed_and_deduplicated(store: BlobStore, tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"hello")
    b.write_bytes(b"hello")
    sha, size = store.put(a)
    assert (sha, size) == (hashlib.sha256(b"hello").hexdigest(), 5)
    assert store.put(b) == (sha, size)
    assert store.all_blobs() == [sha]
    blob = store.blob_path(sha)
    assert blob == store.root / "sha256" / sha[:2] / sha and blob.read_bytes() == b"hello"
    assert not os.stat(blob).st_mode & 0o222  # read-only
    assert list((store.root / "tmp").iterdir()) == []


def test_manifest_digest_is_sha256sum_format() -> None:
    es = [FileEntry("b.json", "2" * 64, 1), FileEntry("a.safetensors", "1" * 64, 2)]
    want = hashlib.sha256(f"{'1' * 64}  a.safetensors\n{'2' * 64}  b.json\n".encode()).hexdigest()
    assert manifest_digest(es) == want == manifest_digest(reversed(es))


def test_changed_or_missing_blob_is_refused_by_name(store: BlobStore, tmp_path: Path) -> None:
    entries = _put_dir(store, make_model(tmp_path / "m"))
    digest = manifest_digest(entries)
    tree = store.materialize(digest, entries, "demo@1 model")
    assert sorted(p.name for p in tree.iterdir()) == sorted(e.path for e in entries)
    weights = next(e for e in entries if e.path == "model.safetensors")
    blob = store.blob_path(weights.sha256)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1  # same size, one bit flipped
    blob.write_bytes(bytes(data))
    with pytest.raises(BlobError, match=r"demo@1 model: file model\.safetensors .* has changed"):
        store.materialize(digest, entries, "demo@1 model")
    blob.unlink()
    with pytest.raises(BlobError, match=r"model\.safetensors .* is missing from the blob store"):
        store.materialize(digest, entries, "demo@1 model")


def test_tampered_tree_is_rebuilt_from_verified_blobs(store: BlobStore, tmp_path: Path) -> None:
    entries = _put_dir(store, make_model(tmp_path / "m"))
    digest = manifest_digest(entries)
    tree = store.materialize(digest, entries, "v")
    os.chmod(tree, 0o755)
    (tree / "evil.pkl").write_bytes(b"\x80\x04junk")  # dropped into the served dir
    os.unlink(tree / "config.json")
    again = store.materialize(digest, entries, "v")
    assert again == tree
    assert sorted(p.name for p in again.iterdir()) == sorted(e.path for e in entries)
    with pytest.raises(BlobError, match="do not add up to its digest"):
        store.materialize("0" * 64, entries, "v")


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../x", "", "a//b", "./a", "a\\b"])
def test_paths_outside_are_refused(bad: str) -> None:
    with pytest.raises(BlobError, match="outside the registry"):
        safe_relpath(bad, "record")
    assert str(safe_relpath("sub/dir/f.json", "record")) == "sub/dir/f.json"


def _torch_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
    return buf.getvalue()


@pytest.mark.parametrize("name,data,why", [
    ("pytorch_model.bin", b"anything", "pickle weights file"),
    ("weights.pt", b"x", "pickle weights file"),
    ("w.pth", b"x", "pickle weights file"),
    ("state.pkl", b"x", "pickle weights file"),
    ("extra.safetensors.json", pickle.dumps([1, 2]), "pickle stream"),
    ("sneaky.dat", _torch_zip(), "torch zip"),
])
def test_pickle_weights_are_refused(tmp_path: Path, name: str, data: bytes, why: str) -> None:
    d = make_model(tmp_path / "m", extra={name: data})
    with pytest.raises(RegistryError, match=f"{name.replace('.', '[.]')} is .*{why}.*safetensors"):
        collect_dir(d, "model")


def test_model_dir_checks(tmp_path: Path) -> None:
    d = make_model(tmp_path / "m")
    (d / ".model.safetensors.tmp").write_bytes(b"half-written")  # a crashed writer's temp file
    assert ".model.safetensors.tmp" not in {rel for rel, _ in collect_dir(d, "model")}
    (d / "link.json").symlink_to(d / "config.json")
    with pytest.raises(RegistryError, match="symbolic link"):
        collect_dir(d, "model")
    (d / "link.json").unlink()
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(RegistryError, match="not a valid safetensors file"):
        collect_dir(d, "model")
    (d / "model.safetensors").unlink()
    with pytest.raises(RegistryError, match=r"no \*\.safetensors"):
        collect_dir(d, "model")
    with pytest.raises(RegistryError, match="not found"):
        collect_dir(tmp_path / "nowhere", "model")


def test_store_belongs_to_one_registry(tmp_path: Path) -> None:
    s = BlobStore(tmp_path / "b")
    s.claim("reg-1")
    s.claim("reg-1")
    with pytest.raises(RegistryError, match="belongs to another registry"):
        BlobStore(tmp_path / "b").claim("reg-2")
    other = tmp_path / "other"
    other.mkdir()
    (other / "file.txt").write_text("mine")
    with pytest.raises(RegistryError, match="not a trustmoe blob store"):
        BlobStore(other).claim("reg-1")


def test_gc_removes_only_old_unreferenced(store: BlobStore, tmp_path: Path) -> None:
    entries = _put_dir(store, make_model(tmp_path / "m"))
    orphan = tmp_path / "orphan"
    orphan.write_bytes(b"orphan")
    osha, _ = store.put(orphan)
    (store.root / "tmp" / "put-crashed").write_bytes(b"partial")
    keep = {e.sha256 for e in entries}
    rep = store.gc(keep, set(), grace_s=3600)  # everything is young: nothing goes
    assert rep.blobs_removed == 0 and osha in store.all_blobs()
    old = time.time() - 7200
    os.utime(store.blob_path(osha), (old, old))
    os.utime(store.root / "tmp" / "put-crashed", (old, old))
    rep = store.gc(keep, set(), grace_s=3600)
    assert (rep.blobs_removed, rep.bytes_freed, rep.tmp_removed) == (1, 6, 1)
    assert set(store.all_blobs()) == keep
