"""The OpenAI-compatible server, driven through a real uvicorn socket by the official client.

References are independent of the engine: greedy tokens and log-probabilities come from a
plain full-recompute forward of the same weights (`trustmoe.load`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

import trustmoe
from trustmoe.data.tokenizer import TextCodec, load_tokenizer
from trustmoe.serve.app import create_app
from trustmoe.serve.chat import ChatTemplate

PROMPT = "def func_1(x, y):\n    return"


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, live_server: Any, shared_engine: Any) -> Iterator[Any]:
    app = create_app(shared_engine, chat_template=ChatTemplate.from_model_dir(tiny_model_dir))
    with live_server(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(live: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref(tiny_model_dir: Path) -> Any:
    model, tok = trustmoe.load(tiny_model_dir), load_tokenizer(tiny_model_dir)
    codec = TextCodec.from_dir(tiny_model_dir)

    class Ref:
        name = tiny_model_dir.name

        def greedy(self, ids: list[int], n: int, stop_ids: tuple[int, ...] = (0,)) -> list[int]:
            ids, out = list(ids), []
            with torch.no_grad():
                for _ in range(n):
                    t = int(model(torch.tensor([ids]))[0, -1].argmax())
                    if t in stop_ids:
                        break
                    out.append(t)
                    ids.append(t)
            return out

        def logprobs(self, ids: list[int]) -> torch.Tensor:
            with torch.no_grad():
                return torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)  # (T, V)

        # prompts are text through the one TextCodec: the model's BOS, then the text's ids
        encode = staticmethod(lambda s: codec.encode(s, add_bos=True))
        decode = staticmethod(lambda ids: tok.decode(ids, skip_special_tokens=False))

    return Ref()


def test_completion_greedy_matches_reference(client: openai.OpenAI, ref: Any) -> None:
    r = client.completions.create(model=ref.name, prompt=PROMPT, max_tokens=12, temperature=0)
    expected = ref.greedy(ref.encode(PROMPT), 12)
    assert r.choices[0].text == ref.decode(expected)
    assert r.usage.prompt_tokens == len(ref.encode(PROMPT))
    assert r.usage.completion_tokens == len(expected)
    assert r.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")


def test_completion_stream_equals_non_stream(client: openai.OpenAI, ref: Any) -> None:
    full = client.completions.create(model=ref.name, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=ref.name, prompt=PROMPT, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == full.choices[0].finish_reason and all(x is None for x in reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens


def test_chat_uses_template_and_streams(client: openai.OpenAI, ref: Any) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=ref.name, messages=msgs, max_tokens=10,
                                       temperature=0)
    prompt = ChatTemplate().render(msgs)
    assert prompt.endswith("<|im_start|>assistant\n")
    expected = ref.greedy(ref.encode(prompt), 10, stop_ids=(0, 2))  # EOS, <|im_end|>
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.decode(expected)
    assert r.usage.prompt_tokens == len(ref.encode(prompt))
    stream = client.chat.completions.create(model=ref.name, messages=msgs, max_tokens=10,
                                            temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == r.choices[0].message.content


def test_seeded_sampling_is_reproducible_and_n_choices(client: openai.OpenAI, ref: Any) -> None:
    kw: dict[str, Any] = dict(model=ref.name, prompt=PROMPT, max_tokens=10, temperature=1.0,
                              seed=1234, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # choice i gets seed + i


def test_logprobs_match_model(client: openai.OpenAI, ref: Any) -> None:
    r = client.completions.create(model=ref.name, prompt=PROMPT, max_tokens=5, temperature=0,
                                  logprobs=3)
    ids = ref.encode(PROMPT)
    gen = ref.greedy(ids, 5)
    lp = ref.logprobs(ids + gen)  # (T, V)
    got = r.choices[0].logprobs
    assert len(got.token_logprobs) == len(gen)
    for i, t in enumerate(gen):
        assert math.isclose(got.token_logprobs[i], float(lp[len(ids) - 1 + i, t]), abs_tol=1e-3)
        assert len(got.top_logprobs[i]) >= 3
        assert math.isclose(max(got.top_logprobs[i].values()),
                            float(lp[len(ids) - 1 + i].max()), abs_tol=1e-3)


def test_echo_prompt_logprobs_for_loglikelihood(client: openai.OpenAI, ref: Any) -> None:
    """The request lm-evaluation-harness's local-completions model sends to score text."""
    ctx, cont = "def func_2(x, y):", "\n    return x + y"
    ids = ref.encode(ctx + cont)
    r = client.completions.create(model=ref.name, prompt=ids, max_tokens=1, temperature=0,
                                  echo=True, logprobs=1)
    lp = ref.logprobs(ids)
    got = r.choices[0].logprobs
    assert got.token_logprobs[0] is None
    for i in range(1, len(ids)):
        assert math.isclose(got.token_logprobs[i], float(lp[i - 1, ids[i]]), abs_tol=1e-3)
    assert r.choices[0].text.startswith(ref.decode(ids)) and ref.decode(ids).endswith(ctx + cont)
    r0 = client.completions.create(model=ref.name, prompt=ids, max_tokens=0, echo=True,
                                   logprobs=0)
    assert r0.choices[0].text == ref.decode(ids)
    assert len(r0.choices[0].logprobs.token_logprobs) == len(ids)


def test_echo_prompt_top_logprobs_are_the_models(client: openai.OpenAI, ref: Any) -> None:
    """echo + logprobs=3: each prompt position after the first lists the prompt token and the
    model's 3 most likely tokens there (lm-evaluation-harness's is_greedy reads the max)."""
    ids = ref.encode("def func_2(x, y):\n    return x + y")
    lp = ref.logprobs(ids)  # (T, V), a plain full forward
    for max_tokens in (0, 1):
        r = client.completions.create(model=ref.name, prompt=ids, max_tokens=max_tokens,
                                      temperature=0, echo=True, logprobs=3)
        got = r.choices[0].logprobs
        assert len(got.top_logprobs) == len(ids) + max_tokens and got.top_logprobs[0] is None
        for i in range(1, len(ids)):
            want = {ref.decode([ids[i]]): float(lp[i - 1, ids[i]])}
            vals, alts = lp[i - 1].topk(3)
            for t, v in zip(alts.tolist(), vals.tolist(), strict=True):
                want.setdefault(ref.decode([t]), v)
            top = got.top_logprobs[i]
            assert 3 <= len(top) <= 4 and top.keys() == want.keys(), (i, top, want)
            for k, v in want.items():
                assert math.isclose(top[k], v, abs_tol=1e-3), (i, k)
            assert math.isclose(max(top.values()), float(lp[i - 1].max()), abs_tol=1e-3)
        if max_tokens:
            assert len(got.top_logprobs[-1]) >= 3  # the generated token keeps its own top-k


def test_stop_string(client: openai.OpenAI, ref: Any) -> None:
    base = client.completions.create(model=ref.name, prompt=PROMPT, max_tokens=16, temperature=0)
    text = base.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    r = client.completions.create(model=ref.name, prompt=PROMPT, max_tokens=16, temperature=0,
                                  stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]


SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
    "count": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "null"},
                                           "maxItems": 2}},
    "required": ["ok", "color", "count", "tags"]}  # as OpenAI strict mode sends; else optional


def test_json_schema_output_is_valid(client: openai.OpenAI, ref: Any) -> None:
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(
            model=ref.name, messages=[{"role": "user", "content": "json please"}], max_tokens=150,
            temperature=temperature, seed=7,
            response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        obj = json.loads(r.choices[0].message.content)
        assert list(obj) == ["ok", "color", "count", "tags"]
        assert isinstance(obj["ok"], bool) and obj["color"] in ("red", "green", "blue")
        assert isinstance(obj["count"], int) and obj["tags"] in ([], [None], [None, None])


def test_json_object_mode(client: openai.OpenAI, ref: Any) -> None:
    r = client.completions.create(model=ref.name, prompt="{", max_tokens=40, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    text = r.choices[0].text
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_models_health_metrics(client: openai.OpenAI, live: Any, ref: Any) -> None:
    assert [m.id for m in client.models.list().data] == [ref.name]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}
    client.completions.create(model=ref.name, prompt=PROMPT, max_tokens=3, temperature=0)
    text = httpx.get(live.url + "/metrics").text
    label = f'model_name="{ref.name}"'
    for name in ("trustmoe:time_to_first_token_seconds_count", "trustmoe:inter_token_latency_seconds",
                 "trustmoe:e2e_request_latency_seconds_count", "trustmoe:num_requests_running",
                 "trustmoe:num_requests_waiting", "trustmoe:kv_cache_usage_perc",
                 "trustmoe:prompt_tokens_total", "trustmoe:generation_tokens_total"):
        assert f"{name}{{{label}}}" in text or f"{name}_bucket" in text, name
    counts = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert counts[f"trustmoe:generation_tokens_total{{{label}}}"] >= 3
    assert counts[f"trustmoe:time_to_first_token_seconds_count{{{label}}}"] >= 1
    ok = sum(v for k, v in counts.items() if k.startswith("trustmoe:request_success_total"))
    assert ok >= 1


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert "no-such-model" in str(e.value)


def test_api_key_guards_all_but_health(tiny_model_dir: Path, live_server: Any,
                                       small_engine: Any) -> None:
    with live_server(create_app(small_engine, api_key="s3cret")) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/metrics").status_code == 401
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=tiny_model_dir.name, prompt="x", max_tokens=2)
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        r = good.completions.create(model=tiny_model_dir.name, prompt="x", max_tokens=2)
        assert r.usage.completion_tokens <= 2
