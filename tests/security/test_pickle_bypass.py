"""Pickle is never unpickled: the bypasses that beat blocklist scanners are refused unread.

Samples rebuilt from public reports against picklescan/modelscan (payloads only create a
marker file): memo confusion with BINPUT (picklescan#14), BUILD on a safe global to smuggle
`os.system` (modelscan#85), nested `pickle.loads` (modelscan#267), `importlib` and `marshal`
(picklescan#74: `builtins.exec`, `runpy._run_code`), the `functools.partial` wrapper
(fickling#210), the profiler family (`cProfile.run`, GHSA-46h3), and a torch zip holding
`archive/data.pkl`.
Each is placed where trustmoe would read weights (model.safetensors, a shard named by the
index, pytorch_model.bin, train_state.safetensors, a quantized dir, a guard model) and every
loader refuses it with one clear error; the marker never appears. A positive control shows
each payload *does* run under `pickle.loads` — in a separate process, outside trustmoe.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import trustmoe
from trustmoe.config import get_preset
from trustmoe.io import TrustmoeError
from trustmoe.model import Transformer, save_model


def _unicode(s: str) -> bytes:
    return pickle.UNICODE + s.encode() + b"\n"


def samples(marker: Path) -> dict[str, bytes]:
    cmd = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    P = pickle
    out: dict[str, bytes] = {}
    # plain reduce of os.system, protocol 0 (GLOBAL) and 4 (STACK_GLOBAL)
    out["os_system_p0"] = b"cos\nsystem\n(" + P.STRING + repr(cmd).encode() + b"\ntR."
    out["posix_system_p4"] = (P.PROTO + b"\x04" + _unicode("posix") + _unicode("system") + P.STACK_GLOBAL
                              + _unicode(cmd) + P.TUPLE1 + P.REDUCE + P.STOP)
    # picklescan#14: names reach STACK_GLOBAL through BINPUT/BINGET memo slots
    out["memo_confusion"] = (P.PROTO + b"\x04" + _unicode("os") + P.BINPUT + b"\x00" + _unicode("system")
                             + P.BINPUT + b"\x01" + P.POP + P.POP + P.BINGET + b"\x00" + P.BINGET + b"\x01"
                             + P.STACK_GLOBAL + _unicode(cmd) + P.TUPLE1 + P.REDUCE + P.STOP)
    # modelscan#267: the dangerous call is inside a nested pickle.loads
    inner = out["os_system_p0"]
    out["nested_loads"] = b"cpickle\nloads\n(" + P.BINBYTES + len(inner).to_bytes(4, "little") + inner + b"tR."
    # picklescan#74: builtins.exec via importlib-free route and marshal'd code
    out["builtins_exec"] = b"cbuiltins\nexec\n(" + P.STRING + repr(code).encode() + b"\ntR."
    out["runpy_run_code"] = b"crunpy\n_run_code\n(" + P.STRING + repr(code).encode() + b"\n(dtR."
    # _operator.methodcaller / functools.partial wrappers (GHSA-955r, fickling#210)
    out["functools_partial"] = (b"cfunctools\npartial\n(cos\nsystem\n" + P.STRING + repr(cmd).encode()
                                + b"\ntR)R.")
    # profiler family (GHSA-46h3): cProfile.run(statement) executes the statement
    out["cprofile_run"] = b"ccProfile\nrun\n(" + P.STRING + repr(code).encode() + b"\ntR."
    # modelscan#85: BUILD's slot state setattr()s "os" and "system" onto the allow-listed
    # global numpy.prod; GLOBAL numpy prod.a / prod.b (dotted names, protocol >= 4) read them
    # back, PUT/GET carry them to STACK_GLOBAL, so no dangerous name sits next to a GLOBAL
    def slot(attr: str, value: str) -> bytes:  # (None, {attr: value}) BUILD on the stack top
        return P.NONE + P.MARK + _unicode(attr) + _unicode(value) + P.DICT + P.TUPLE2 + P.BUILD
    out["build_on_safe_global"] = (
        P.PROTO + b"\x05" + P.GLOBAL + b"numpy\nprod\n" + slot("a", "os") + slot("b", "system")
        + P.POP + P.GLOBAL + b"numpy\nprod.a\n" + P.PUT + b"0\n" + P.GLOBAL + b"numpy\nprod.b\n"
        + P.PUT + b"1\n" + P.POP + P.POP + P.GET + b"0\n" + P.GET + b"1\n" + P.STACK_GLOBAL
        + _unicode(cmd) + P.TUPLE1 + P.REDUCE + P.STOP)
    return out


def _torch_zip(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pk") / "m"
    save_model(Transformer(get_preset("tiny").model), d)
    return d


def test_payloads_are_live_in_a_separate_process(tmp_path: Path) -> None:
    """Positive control: each sample really runs code when unpickled (outside trustmoe)."""
    for name, data in samples(tmp_path / "MARK").items():
        mark = tmp_path / f"mark-{name}"
        blob = samples(mark)[name]
        (tmp_path / "p.pkl").write_bytes(blob)
        subprocess.run([sys.executable, "-c", "import pickle,sys; pickle.loads(open(sys.argv[1],'rb').read())",
                        str(tmp_path / "p.pkl")], capture_output=True, timeout=60, check=False)
        assert mark.exists(), f"{name}: the sample does not run; the test would prove nothing"
        assert data  # the same generator feeds the refusal test


def _placements(model: Path, dst: Path, blob: bytes) -> list[tuple[str, Path]]:
    import shutil

    out = []
    for where in ("model.safetensors", "model.safetensors(zip)", "pytorch_model.bin", "shard",
                  "model.safetensors(no manifest)"):
        d = dst / where.replace("(", "_").replace(")", "")
        shutil.copytree(model, d)
        if where == "pytorch_model.bin":
            (d / "model.safetensors").unlink()
            (d / "integrity.json").unlink()
            (d / "pytorch_model.bin").write_bytes(blob)
        elif where == "shard":
            (d / "integrity.json").unlink()
            (d / "model.safetensors").unlink()
            (d / "model-00001.bin").write_bytes(blob)
            (d / "model.safetensors.index.json").write_text(json.dumps(
                {"weight_map": {"embed_tokens.weight": "model-00001.bin"}}))
        else:
            data = _torch_zip(blob) if "zip" in where else blob
            (d / "model.safetensors").write_bytes(data)
            if "no manifest" in where:
                (d / "integrity.json").unlink()
        out.append((where, d))
    return out


def test_every_sample_is_refused_without_running(model_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    from trustmoe.engine import Engine
    from trustmoe.train.checkpoint import read_train_state

    marker = tmp_path / "MARKER"
    for name, blob in samples(marker).items():
        for where, d in _placements(model_dir, tmp_path / name, blob):
            with pytest.raises(TrustmoeError) as e:
                trustmoe.load(d)
            assert str(e.value), (name, where)
            with pytest.raises(TrustmoeError):
                Engine(d, kv_cache_mb=4)
        st = tmp_path / name / "ckpt"
        st.mkdir()
        (st / "train_state.safetensors").write_bytes(blob)
        with pytest.raises(TrustmoeError, match="corrupt"):
            read_train_state(st)
        g = tmp_path / name / "guard"
        g.mkdir()
        (g / "guard.json").write_text(json.dumps({"format": "trustmoe-guard-linear/1", "features": {
            "bits": 10, "char_ns": [3], "words": True, "window": 256}, "threshold": 0.5}))
        (g / "guard.safetensors").write_bytes(blob)
        from trustmoe.security.classifier import GuardClassifier

        with pytest.warns(UserWarning), pytest.raises(TrustmoeError, match="not a safetensors file"):
            GuardClassifier.load(g)
    assert not marker.exists()
