"""The one device rule, `trustmoe.config.resolve_device`."""

from __future__ import annotations

import pytest
import torch

from trustmoe.config import ConfigError, resolve_device


def test_auto_is_cuda_when_available_else_cpu() -> None:
    want = "cuda" if torch.cuda.is_available() else "cpu"
    for spec in ("auto", None, "", " auto "):
        assert resolve_device(spec).type == want
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec, needle", [
    ("gpu", "unknown device 'gpu'"),
    ("cuda:x", "unknown device"),
    ("meta", "unsupported device"),
])
def test_bad_spellings_are_one_clear_error(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_unavailable_cuda_is_refused() -> None:
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_missing_cuda_index_is_refused() -> None:
    with pytest.raises(ConfigError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
