"""trustmoe.io: a missing optional extra is one clear error naming the pip command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from trustmoe.io import EXTRAS, MissingExtraError, TrustmoeError, require_extra


def test_present_module_is_returned() -> None:
    mod = require_extra("json", "parquet")
    assert mod is sys.modules["json"]


def test_missing_module_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now fails
    monkeypatch.delitem(sys.modules, "pyarrow.parquet", raising=False)
    with pytest.raises(MissingExtraError) as e:
        require_extra("pyarrow.parquet", purpose="reading Parquet")
    assert isinstance(e.value, TrustmoeError)  # so the CLI prints it as one line, exit 2
    assert str(e.value) == ("reading Parquet needs the optional package 'pyarrow', which is not "
                            "installed: pip install 'trustmoe[parquet]'")
    assert (e.value.module, e.value.extra) == ("pyarrow", "parquet")


def test_every_optional_import_has_an_extra_in_pyproject() -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    root = Path(__file__).resolve().parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for module, extra in EXTRAS.items():
        assert extra in extras, (module, extra)
    base = " ".join(tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"])
    for dep in ("datasketch", "detect-secrets", "scipy", "scikit-learn", "matplotlib", "fastapi",
                "uvicorn", "prometheus-client", "sqlalchemy", "alembic", "cryptography"):
        assert dep in base, f"{dep} must be a base dependency: the chain uses it"


def test_unknown_module_without_extra_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        require_extra("no_such_module_xyz")


def test_broken_extra_is_not_reported_as_missing(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed extra whose own import fails is a different problem: the error stays."""
    (tmp_path / "fake_extra_pkg.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as e:
        require_extra("fake_extra_pkg", "export")
    assert e.value.name == "no_such_dependency_xyz"


def test_json_safe_gives_strict_json() -> None:
    import json
    import math

    import numpy as np
    import torch

    from trustmoe.io import json_safe

    x = {1: (np.float32(1.5), math.nan, torch.tensor(2.0), np.int64(3), [math.inf, -math.inf]),
         "s": "nan", "arr": np.arange(2).tolist()}
    out = json_safe(x)
    assert out == {"1": [1.5, None, 2.0, 3, [None, None]], "s": "nan", "arr": [0, 1]}
    json.dumps(out, allow_nan=False)  # strict JSON: raises on NaN/inf
