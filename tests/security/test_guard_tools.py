"""tools.py: the request's tools against the policy; argument validation; call schema."""

from __future__ import annotations

from typing import Any

import pytest

from trustmoe.security.guard import ToolPolicyConfig
from trustmoe.security.tools import ToolPolicyError, call_schema, parse_tools, validate_args

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"enum": ["c", "f"]}},
                          "required": ["city"], "additionalProperties": False}}}
EMAIL = {"type": "function", "function": {"name": "send_email", "parameters": {
    "type": "object", "properties": {"to": {"type": "string"}}, "required": ["to"]}}}


def test_modes() -> None:
    pol = ToolPolicyConfig()
    assert parse_tools(None, None, pol).mode == "none"
    assert parse_tools([WEATHER], None, pol).mode == "auto"
    assert parse_tools([WEATHER], "none", pol).mode == "none"
    assert parse_tools([WEATHER], "required", pol).mode == "required"
    named = parse_tools([WEATHER, EMAIL], {"type": "function", "function": {"name": "send_email"}}, pol)
    assert named.mode == "named" and named.forced == "send_email"


@pytest.mark.parametrize("tools, choice, pol, code", [
    ([WEATHER], {"type": "function", "function": {"name": "delete_all"}}, ToolPolicyConfig(),
     "invalid_tool_choice"),
    ([WEATHER, EMAIL], None, ToolPolicyConfig(allow=("get_weather",)), "tool_not_allowed"),
    ([WEATHER] * 3, None, ToolPolicyConfig(max_tools=2), "invalid_tools"),
    ([WEATHER, WEATHER], None, ToolPolicyConfig(), "invalid_tools"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, ToolPolicyConfig(), "invalid_tools"),
    ([{"type": "code_interpreter"}], None, ToolPolicyConfig(), "invalid_tools"),
    ("get_weather", None, ToolPolicyConfig(), "invalid_tools"),
    (None, "required", ToolPolicyConfig(), "invalid_tool_choice"),
    ([WEATHER], "sometimes", ToolPolicyConfig(), "invalid_tool_choice"),
])
def test_violations(tools: Any, choice: Any, pol: ToolPolicyConfig, code: str) -> None:
    with pytest.raises(ToolPolicyError) as e:
        parse_tools(tools, choice, pol)
    assert e.value.code == code


def test_schema_limits() -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"x": deep}}
    tool = {"type": "function", "function": {"name": "f", "parameters": deep}}
    with pytest.raises(ToolPolicyError) as e:
        parse_tools([tool], None, ToolPolicyConfig())
    assert e.value.code == "tool_schema_too_deep"
    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                            for i in range(400)}}
    with pytest.raises(ToolPolicyError) as e:
        parse_tools([{"type": "function", "function": {"name": "f", "parameters": big}}], None,
                    ToolPolicyConfig())
    assert e.value.code == "tool_schema_too_large"


def test_sensitive_tools_withheld_after_flagged_tool_output() -> None:
    pol = ToolPolicyConfig(sensitive=("send_email",))
    e = parse_tools([WEATHER, EMAIL], "auto", pol, tool_output_flagged=True)
    assert [t.name for t in e.tools] == ["get_weather"] and e.dropped == ("send_email",)
    with pytest.raises(ToolPolicyError) as err:
        parse_tools([WEATHER, EMAIL], {"type": "function", "function": {"name": "send_email"}}, pol,
                    tool_output_flagged=True)
    assert err.value.code == "tool_not_allowed"
    assert len(parse_tools([WEATHER, EMAIL], "auto", pol).tools) == 2  # not flagged: both


@pytest.mark.parametrize("args, ok", [
    ({"city": "Paris"}, True), ({"city": "Paris", "unit": "c"}, True), ({}, False),
    ({"city": 3}, False), ({"city": "Paris", "unit": "k"}, False), ({"city": "P", "x": 1}, False),
])
def test_validate_args(args: dict[str, Any], ok: bool) -> None:
    err = validate_args(WEATHER["function"]["parameters"], args)
    assert (err is None) == ok, err


def test_call_schema_compiles_and_names_only_enabled_tools() -> None:
    from trustmoe.serve.jsonmode import advance, compile_schema, initial_state, is_complete

    enabled = parse_tools([WEATHER, EMAIL], "required", ToolPolicyConfig())
    root = compile_schema(call_schema(enabled))
    ok = b'{"name":"get_weather","arguments":{"city":"Oslo"}}'
    assert is_complete(advance(initial_state(root), ok))
    assert not advance(initial_state(root), b'{"name":"delete_all"')  # no path for other names
    forced = parse_tools([WEATHER, EMAIL], {"type": "function", "function": {"name": "get_weather"}},
                         ToolPolicyConfig())
    root = compile_schema(call_schema(forced))
    assert not advance(initial_state(root), b'{"name":"send_email"')
