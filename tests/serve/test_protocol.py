"""Request validation, error mapping, chat templates and metric names, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from trustmoe.serve.chat import ChatTemplate, end_of_turn_ids
from trustmoe.serve.metrics import ServerMetrics
from trustmoe.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    context_length_error,
    pydantic_error_to_api,
)


def _error(model: type, body: dict) -> APIError:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    return pydantic_error_to_api([dict(x) for x in e.value.errors()])


def test_like_errors_get_like_statuses_as_openai() -> None:
    """Wrong type, missing and out of range are all 400 (OpenAI's status), told apart by code."""
    cases = [
        (CompletionRequest, {"prompt": "x", "max_tokens": "ten"}, "invalid_type"),
        (CompletionRequest, {"prompt": "x", "stream": "maybe"}, "invalid_type"),
        (CompletionRequest, {}, "missing_required_parameter"),
        (CompletionRequest, {"prompt": "x", "max_tokens": -1}, "integer_below_min_value"),
        (CompletionRequest, {"prompt": "x", "n": 9}, "integer_above_max_value"),
        (CompletionRequest, {"prompt": "x", "top_p": 1.5}, "decimal_above_max_value"),
        (CompletionRequest, {"prompt": []}, "invalid_value"),
        (CompletionRequest, {"prompt": "x", "stop": ["a"] * 17}, "invalid_value"),
        (ChatCompletionRequest, {"messages": []}, "empty_array"),
    ]
    for model, body, code in cases:
        err = _error(model, body)
        assert (err.status, err.code, err.type) == (400, code, "invalid_request_error"), body


def test_context_length_error_is_400() -> None:
    e = context_length_error(250, 10, 256)
    assert e.status == 400 and e.code == "context_length_exceeded" and e.param == "max_tokens"
    assert "250" in e.message and "256" in e.message


def test_valid_requests_parse() -> None:
    r = CompletionRequest.model_validate({"prompt": [[1, 2], [3]], "stop": "\n", "n": 2,
                                          "stream_options": {"include_usage": True}})
    assert r.stop_list() == ["\n"] and r.include_usage() and r.n == 2
    c = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}}})
    assert c.messages[0].text() == "ab"
    assert c.response_format is not None and c.response_format.json_schema is not None
    assert c.response_format.json_schema.schema_ == {}


def test_error_body_is_openai_shaped() -> None:
    e = APIError(429, "busy", headers={"Retry-After": "1"})
    assert e.body() == {"error": {"message": "busy", "type": "rate_limit_error", "param": None,
                                  "code": "rate_limit_exceeded"}}
    assert APIError(400, "bad", "n", code="invalid_value").body()["error"]["code"] == "invalid_value"


def test_chat_template_from_model_dir_and_errors(tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    assert ChatTemplate.from_model_dir(tmp_path).render(msgs) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "chat_template":
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}[{{ m['content'] }}]{% endfor %}"}))
    t = ChatTemplate.from_model_dir(tmp_path)
    assert t.render(msgs) == "<s>[hi]"
    with pytest.raises(APIError) as e:
        t.render([{"role": "system", "content": "x"}])
    assert e.value.status == 400 and "no system role" in e.value.message
    with pytest.raises(APIError):  # the sandbox refuses attribute tricks
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(msgs)
    assert end_of_turn_ids({"<|im_end|>": 2, "<|endoftext|>": 0}.get) == [2, 0]


def test_metric_names_follow_vllm() -> None:
    m = ServerMetrics("m1")
    m.ttft.observe(0.1)
    m.finished("length")
    m.rejected(429)
    text = m.render().decode()
    for name in ("trustmoe:time_to_first_token_seconds_bucket", "trustmoe:inter_token_latency_seconds",
                 "trustmoe:e2e_request_latency_seconds", "trustmoe:num_requests_running",
                 "trustmoe:num_requests_waiting", "trustmoe:kv_cache_usage_perc",
                 "trustmoe:prompt_tokens_total", "trustmoe:generation_tokens_total",
                 'trustmoe:request_success_total{finished_reason="length",model_name="m1"} 1.0',
                 'trustmoe:request_rejected_total{model_name="m1",status="429"} 1.0'):
        assert name in text, name
