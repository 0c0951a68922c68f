"""safetensors_check.py: headers validated before use; fuzzed headers and config.json never
crash the loader and never load."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import trustmoe
from trustmoe.config import ConfigError, get_preset
from trustmoe.io import TrustmoeError
from trustmoe.model import Transformer, save_model
from trustmoe.security.safetensors_check import HeaderError, check_file


def _file(tmp: Path, header: dict[str, Any], data: bytes) -> Path:
    h = json.dumps(header).encode()
    p = tmp / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return p


def test_valid_file(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.int64)}, str(tmp_path / "v.safetensors"))
    got = check_file(tmp_path / "v.safetensors", {"a": ((2, 3), "F32")}, exact=False)
    assert got == {"a": ((2, 3), "F32"), "b": ((4,), "I64")}
    with pytest.raises(HeaderError, match="shape"):
        check_file(tmp_path / "v.safetensors", {"a": ((3, 2), None)}, exact=False)
    with pytest.raises(HeaderError, match="unexpected tensor 'b'"):
        check_file(tmp_path / "v.safetensors", {"a": ((2, 3), "F32")})


@pytest.mark.parametrize("header, data, msg", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "need 12"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "bad shape"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 8, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "no tensor accounts"),
    ({"__metadata__": {"k": 1}}, b"", "strings"),
    ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "exactly dtype"),
])
def test_bad_headers(tmp_path: Path, header: dict[str, Any], data: bytes, msg: str) -> None:
    with pytest.raises(HeaderError, match=msg):
        check_file(_file(tmp_path, header, data))


def test_bad_framing(tmp_path: Path) -> None:
    p = tmp_path / "f.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(HeaderError, match="only 2 bytes"):
        check_file(p)
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(HeaderError, match="does not fit"):
        check_file(p)
    h = b'{"a": 1, "a": 2}'
    p.write_bytes(struct.pack("<Q", len(h)) + h)
    with pytest.raises(HeaderError, match="duplicate key"):
        check_file(p)
    h = b"[" * 5000 + b"]" * 5000
    p.write_bytes(struct.pack("<Q", len(h)) + h)
    with pytest.raises(HeaderError, match=r"not valid JSON|not a JSON object"):
        check_file(p)


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz") / "m"
    save_model(Transformer(get_preset("tiny").model), d)
    (d / "integrity.json").unlink()  # a foreign dir: the header and config checks must answer
    return d


LOAD_ERRORS = (TrustmoeError, ConfigError)

header_edits = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(["F16", "I8", "F64", "X", "", 3])),
    st.tuples(st.just("shape"), st.lists(st.integers(-3, 300), max_size=4) | st.just("x")),
    st.tuples(st.just("data_offsets"), st.lists(st.integers(-10, 1 << 22), max_size=3)),
    st.tuples(st.just("drop"), st.sampled_from(["dtype", "shape", "data_offsets"])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edit=header_edits, which=st.integers(0, 50), cut=st.integers(0, 64))
def test_fuzzed_headers_never_crash_never_load(good_model: Path, tmp_path_factory: pytest.TempPathFactory,
                                               edit: tuple[str, Any], which: int, cut: int) -> None:
    import shutil

    d = tmp_path_factory.mktemp("f") / "m"
    shutil.copytree(good_model, d)
    p = d / "model.safetensors"
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    name = names[which % len(names)]
    key, value = edit
    if key == "drop":
        del header[name][value]
    else:
        if header[name].get(key) == value:
            return
        header[name][key] = value
    h = json.dumps(header).encode()
    body = raw[8 + n:]
    p.write_bytes(struct.pack("<Q", len(h)) + h + body[: len(body) - cut])
    with pytest.raises(LOAD_ERRORS):
        trustmoe.load(d)


config_edits = st.sampled_from(["hidden_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "intermediate_size", "vocab_size",
                                "num_local_experts", "num_experts_per_tok", "model_type",
                                "tie_word_embeddings", "head_dim"])
values = st.one_of(st.integers(-5, 200), st.text(max_size=5), st.none(), st.booleans(),
                   st.lists(st.integers(), max_size=2), st.floats(allow_nan=True))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=config_edits, value=values)
def test_fuzzed_config_never_crashes_and_never_loads_wrong(good_model: Path, key: str, value: Any,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    import shutil

    d = tmp_path_factory.mktemp("c") / "m"
    shutil.copytree(good_model, d)
    cfg = json.loads((d / "config.json").read_text())
    original = cfg.get(key, "<absent>")
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    try:
        model = trustmoe.load(d)
    except LOAD_ERRORS:
        return
    # a load may only succeed when the edit did not change the model's shape
    ref = trustmoe.load(good_model)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()}, (key, value, original)
