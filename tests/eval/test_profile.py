"""The reference profile: written by `trustmoe eval`, read back exactly, refused when damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from trustmoe.data.tokenizer import TextCodec
from trustmoe.engine.features import MAX_SCORED, features_from_model
from trustmoe.eval.corpus import load_corpus
from trustmoe.eval.profile import build_profile, load_profile, save_profile, write_eval_profile
from trustmoe.eval.runner import Sizes, run_eval
from trustmoe.io import TrustmoeError, sha256_bytes, sha256_file
from trustmoe.model.transformer import Transformer

SMALL = Sizes(n_val=8, n_train=6, max_tokens=48, n_task=4, n_robust=2, n_attack=1,
              attack_subs=1, attack_candidates=2, n_calib_docs=2, calib_tokens=16)


@pytest.fixture(scope="module")
def prof_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Transformer, model_dir: Path,
             data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("profile")
    write_eval_profile(tiny_model, model_dir, data_dir, data_dir / "tokenizer.json", out, quick=True)
    return out


def test_eval_profile_holds_the_held_out_prompts_and_their_features(
        prof_dir: Path, tiny_model: Transformer, model_dir: Path, data_dir: Path) -> None:
    p = load_profile(prof_dir)
    docs = load_corpus(data_dir, TextCodec.from_dir(data_dir), n_train=0, n_val=128, seed=104729,
                       max_tokens=256).val
    assert p.n_requests == len(docs) == 40  # every held-out document of the fixture
    assert p.prompt_tokens.tolist() == [len(d) for d in docs]
    assert int(p.token_counts.sum()) == p.token_ids.size == sum(len(d) for d in docs)
    want = features_from_model(tiny_model, docs[:3])
    for i, f in enumerate(want):
        got = p.request(i)
        assert got.token_ids.tolist() == docs[i]
        assert got.mean_nll == pytest.approx(f.mean_nll) and got.n_scored == f.n_scored == MAX_SCORED
        np.testing.assert_allclose(got.hidden, f.hidden, rtol=1e-6)
        np.testing.assert_array_equal(got.routing, f.routing)  # type: ignore[arg-type]
    src = p.meta["source"]
    assert src["kind"] == "eval" and src["model_sha256"] == sha256_file(model_dir / "model.safetensors")
    assert p.meta["routing_shape"] == [2, 4] and p.meta["max_scored"] == MAX_SCORED
    assert set(p.meta["summary"]) >= {"prompt_tokens", "mean_nll", "routing_load", "top_tokens"}
    assert p.ref.endswith(sha256_file(prof_dir / "profile.safetensors"))


@pytest.mark.slow
def test_run_eval_writes_the_profile(tmp_path: Path, model_dir: Path, data_dir: Path) -> None:
    m = tmp_path / "model"
    shutil.copytree(model_dir, m)
    run_eval(m, data_dir, tmp_path / "eval", progress=False, sizes=SMALL, quick=True, store_temperature=False)
    p = load_profile(tmp_path / "eval")
    assert (tmp_path / "eval" / "eval.json").exists() and p.n_requests == 40
    assert p.meta["source"]["eval_dir"] == str(tmp_path / "eval")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_damaged_profiles_are_refused_with_one_clear_line(prof_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrustmoeError, match="not found"):
        load_profile(tmp_path / "nowhere")
    d = _copy(prof_dir, tmp_path / "a")
    blob = bytearray((d / "profile.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (d / "profile.safetensors").write_bytes(bytes(blob))
    with pytest.raises(TrustmoeError, match="does not match the sha256"):
        load_profile(d)
    d = _copy(prof_dir, tmp_path / "b")
    (d / "profile.json").write_text("{not json")
    with pytest.raises(TrustmoeError, match="malformed JSON"):
        load_profile(d)
    d = _copy(prof_dir, tmp_path / "c")
    meta = json.loads((d / "profile.json").read_text())
    (d / "profile.json").write_text(json.dumps({**meta, "schema": 99}))
    with pytest.raises(TrustmoeError, match="unknown profile schema"):
        load_profile(d)
    d = _copy(prof_dir, tmp_path / "d")
    (d / "profile.json").unlink()
    (d / "eval.json").write_text("{}")
    with pytest.raises(TrustmoeError, match="re-run `trustmoe eval`"):
        load_profile(d)
    # self-consistent file (sha matches) whose tensors disagree with each other
    d = _copy(prof_dir, tmp_path / "e")
    t = st_load((d / "profile.safetensors").read_bytes())
    t["token_offsets"] = t["token_offsets"][::-1].copy()
    blob2 = st_save(t)
    (d / "profile.safetensors").write_bytes(blob2)
    (d / "profile.json").write_text(json.dumps({**meta, "safetensors_sha256": sha256_bytes(blob2)}))
    with pytest.raises(TrustmoeError, match="token_offsets"):
        load_profile(d)
    d = _copy(prof_dir, tmp_path / "f")
    t = st_load((d / "profile.safetensors").read_bytes())
    del t["hidden"]
    blob3 = st_save(t)
    (d / "profile.safetensors").write_bytes(blob3)
    (d / "profile.json").write_text(json.dumps({**meta, "safetensors_sha256": sha256_bytes(blob3)}))
    with pytest.raises(TrustmoeError, match="no tensor 'hidden'"):
        load_profile(d)


def test_build_refuses_too_few_or_out_of_vocabulary(prof_dir: Path, tmp_path: Path) -> None:
    p = load_profile(prof_dir)
    with pytest.raises(TrustmoeError, match="at least 2"):
        build_profile([p.request(0)], p.vocab_size, {})
    with pytest.raises(TrustmoeError, match="vocabulary"):
        build_profile([p.request(0), p.request(1)], 3, {})
    q = build_profile([p.request(i) for i in range(5)], p.vocab_size, {"kind": "test"})
    save_profile(q, tmp_path / "q")
    assert load_profile(tmp_path / "q" / "profile.json").n_requests == 5  # a file path works too
