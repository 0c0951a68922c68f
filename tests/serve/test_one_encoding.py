"""One text encoding on every path: with a Llama-style tokenizer (its post-processor adds
`<s>` by itself), completions, chat, eval and generate all give the same ids for a text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from tokenizers import Tokenizer, processors

from trustmoe.config import get_preset
from trustmoe.model.hf import save_model
from trustmoe.model.transformer import Transformer
from trustmoe.security.integrity import write_manifest

TEXT = "def func_3(x, y):\n    return x"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Path:
    tok = Tokenizer.from_file(str(tiny_data_dir / "tokenizer.json"))
    tok.add_special_tokens(["<s>", "</s>"])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", bos)])
    d = tmp_path_factory.mktemp("llama") / "model"
    cfg = get_preset("tiny").model.replace(vocab_size=tok.get_vocab_size(), bos_token_id=bos,
                                           eos_token_id=eos)
    torch.manual_seed(0)
    save_model(Transformer(cfg), d)
    (d / "tokenizer.json").write_text(tok.to_str())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",  # a Llama-style template renders the BOS
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    write_manifest(d)  # files added after save_model: hash them in, or loading refuses the dir
    return d


@pytest.fixture(scope="module")
def engine(llama_dir: Path) -> Any:
    from trustmoe.engine import Engine

    return Engine(llama_dir, kv_cache_mb=16, max_num_seqs=4)


@pytest.fixture(scope="module")
def url(engine: Any, llama_dir: Path, live_server: Any) -> Iterator[str]:
    from trustmoe.serve.app import create_app
    from trustmoe.serve.chat import ChatTemplate

    app = create_app(engine, chat_template=ChatTemplate.from_model_dir(llama_dir))
    with live_server(app) as srv:
        yield srv.url + "/v1"


def test_four_paths_one_encoding(llama_dir: Path, engine: Any, url: str) -> None:
    from trustmoe.eval.backend_engine import EngineLM
    from trustmoe.eval.backend_model import ModelLM
    from trustmoe.generation import generate_with

    tok = Tokenizer.from_file(str(llama_dir / "tokenizer.json"))
    expected = tok.encode(TEXT).ids  # what the tokenizer itself does: <s> + the text's ids
    assert expected[0] == tok.token_to_id("<s>") and expected.count(expected[0]) == 1
    # completions (the echoed prompt lists its tokens)
    r = httpx.post(f"{url}/completions", json={"prompt": TEXT, "max_tokens": 1, "echo": True,
                                               "logprobs": 0, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(expected)
    echoed = body["choices"][0]["logprobs"]["tokens"][: len(expected)]
    assert echoed == [tok.decode([i], skip_special_tokens=False) for i in expected]
    # chat: the template renders "<s>" + content; no second BOS is added
    r = httpx.post(f"{url}/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": TEXT}], "max_tokens": 1,
        "add_generation_prompt": False})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(expected)
    # generate (CLI and Python share generate_with)
    assert generate_with(engine, TEXT, max_tokens=1)["prompt_token_ids"] == expected
    # eval, on the torch model and on the engine: requests are [BOS] + the text's ids
    for lm in (ModelLM.create(llama_dir), EngineLM(engine)):
        assert lm.codec is not None
        ids = lm.codec.encode(TEXT, add_bos=False)
        assert [lm.prefix_id, *ids] == expected
        (s,) = lm.loglikelihood_rolling([ids])
        assert s.targets.tolist() == expected[1:]
