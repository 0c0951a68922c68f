"""OpenAI request bodies (pydantic), the error body, and request -> SamplingParams.

Every client error about a request's content is 400, as OpenAI answers; the body says which
(`{"error": {"message", "type", "param", "code"}}`, `code` one of OpenAI's strings):

- body is not JSON, not UTF-8, or not a JSON object                -> 400 `invalid_json` / `invalid_type`
- a field has the wrong type, or a required field is missing       -> 400 `invalid_type` /
                                                                      `missing_required_parameter`
- a field's value is out of range (negative `max_tokens`, `n` over the limit, empty
  `messages`, bad `response_format` schema, ...)                   -> 400 `invalid_value` (or
                                                                      `integer_above_max_value`, ...)
- prompt + `max_tokens` longer than the model's context           -> 400 `context_length_exceeded`
- missing or wrong API key                                         -> 401 `invalid_api_key`
- unknown `model`                                                  -> 404 `model_not_found`
- body over the byte limit (checked on Content-Length, before the
  body is read, as a proxy in front of OpenAI's API answers)       -> 413
- server at its concurrency / queue limit                          -> 429 with Retry-After
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 8  # choices per request
MAX_STOP = 16  # stop strings per request
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_BODY_BYTES = 4 << 20

# pydantic error types that mean "wrong type"; "missing" has its own code; the rest are values
TYPE_ERRORS = {
    "int_type", "int_parsing", "float_type", "float_parsing", "string_type",
    "bool_type", "bool_parsing", "list_type", "dict_type", "model_type", "model_attributes_type",
    "union_tag_invalid", "union_tag_not_found", "int_from_float", "literal_error",
    "is_instance_of", "none_required", "tuple_type", "bytes_type",
}
# pydantic value errors with a more precise OpenAI code
VALUE_CODES = {
    "greater_than": "below_min_value", "greater_than_equal": "below_min_value",
    "less_than": "above_max_value", "less_than_equal": "above_max_value",
    "too_short": "empty_array", "too_long": "array_above_max_length",
}
# codes OpenAI gives whole status classes when nothing more precise is known
DEFAULT_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


class APIError(Exception):
    """An error that becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code or DEFAULT_CODES.get(status)
        self.type = type_ or {
            404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
            503: "service_unavailable", 500: "internal_server_error",
        }.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def context_length_error(prompt_tokens: int, max_tokens: int | None, context: int,
                         param: str = "max_tokens") -> APIError:
    """400 `context_length_exceeded`, as OpenAI answers a prompt that does not fit."""
    asked = f" + max_tokens ({max_tokens})" if max_tokens is not None else ""
    return APIError(400, f"prompt ({prompt_tokens} tokens){asked} exceeds the model's context "
                    f"of {context} tokens; shorten the prompt or lower max_tokens", param,
                    code="context_length_exceeded")


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", strict=False)


class StreamOptions(_Base):
    include_usage: bool = False


class JsonSchemaSpec(_Base):
    name: str = "schema"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class _Sampling(_Base):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, b in (v or {}).items():
            if not k.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
            if not -100 <= b <= 100:
                raise ValueError("logit_bias values must be in [-100, 100]")
        return v

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if len(v) > MAX_N * 16:
                raise ValueError(f"at most {MAX_N * 16} prompts per request")
            if isinstance(v[0], list) and any(not p for p in v):
                raise ValueError("token-id prompts must not be empty")
        return v


class ContentPart(_Base):
    type: Literal["text"]
    text: str


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    chat_template: str | None = None
    # OpenAI tools; validated against the guard's tool policy (serve/guarding.py)
    tools: list[Any] | None = Field(default=None, max_length=1024)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


def pydantic_error_to_api(errors: list[dict[str, Any]]) -> APIError:
    """The first validation error as one clear message: 400, with OpenAI's code for its kind."""
    if not errors:
        return APIError(400, "invalid request", code="invalid_value")
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x not in ("body",)]
    # union members are reported as extra loc parts like 'str' / 'list[int]': drop them
    loc = [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float")]
    param = ".".join(loc) or None
    msg = str(e.get("msg", "invalid value"))
    etype = str(e.get("type", ""))
    if etype == "json_invalid":
        why = e.get("ctx", {}).get("error", msg)
        return APIError(400, f"request body is not valid JSON: {why}", code="invalid_json")
    if etype == "missing":
        code = "missing_required_parameter"
    elif etype in TYPE_ERRORS:
        code = "invalid_type"
    else:
        code = VALUE_CODES.get(etype, "invalid_value")
        if code.endswith(("min_value", "max_value")):  # integer_above_max_value, decimal_...
            code = ("decimal_" if isinstance(e.get("input"), float) else "integer_") + code
    return APIError(400, f"{param + ': ' if param else ''}{msg}", param=param, code=code)


def logprob_token_text(decode: Any, token_id: int) -> str:
    """One token's text for logprob listings (may contain U+FFFD for a partial UTF-8 byte)."""
    return str(decode([token_id]))
