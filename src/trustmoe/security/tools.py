"""Tool policy: which tools a turn may call, with which arguments.

The set of callable tools is fixed by the request's `tools` / `tool_choice` (what the user's
turn enabled), intersected with the operator's allow-list (`[tools] allow` in guard.toml).
Nothing inside a message — least of all a `tool` message — can widen it or change the policy:
the server builds the decoding constraint from `EnabledTools` alone, so the model cannot emit a
call to any other name, and every emitted call is validated against its schema again.
A `sensitive` tool is dropped from a turn whose tool output the guard flagged.

`validate_args` checks arguments against the subset of JSON Schema the constrained decoder
supports (type, properties, required, additionalProperties, items, min/maxItems, enum, const,
anyOf/oneOf, min/maxLength, $ref/$defs).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from trustmoe.security.guard import ToolPolicyConfig

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolPolicyError(ValueError):
    """A request's tools violate the policy or are malformed (the server answers 400)."""

    def __init__(self, message: str, code: str = "invalid_tools") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class EnabledTools:
    tools: tuple[ToolSpec, ...]  # what the model may call this turn
    mode: str  # none | auto | required | named
    forced: str | None = None  # the name when mode == "named"
    dropped: tuple[str, ...] = ()  # sensitive tools withheld because tool output was flagged
    max_calls: int = 1  # calls one choice may make (parallel_tool_calls)

    def get(self, name: str) -> ToolSpec | None:
        return next((t for t in self.tools if t.name == name), None)


def _depth(x: Any, limit: int, d: int = 0) -> int:
    if d > limit:
        return d
    if isinstance(x, dict):
        return max((_depth(v, limit, d + 1) for v in x.values()), default=d)
    if isinstance(x, list):
        return max((_depth(v, limit, d + 1) for v in x), default=d)
    return d


def parse_tools(tools: Any, tool_choice: Any, policy: ToolPolicyConfig,
                tool_output_flagged: bool = False, parallel: Any = None) -> EnabledTools:
    """Validate the request's `tools` and `tool_choice` against the policy. `parallel` is the
    request's `parallel_tool_calls` (default true, as OpenAI's): up to `policy.max_calls`
    calls per choice, else one; a call forced by name is made once."""
    if parallel is not None and not isinstance(parallel, bool):
        raise ToolPolicyError("parallel_tool_calls must be a boolean", "invalid_type")
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise ToolPolicyError("tool_choice needs tools", "invalid_tool_choice")
        return EnabledTools((), "none")
    if not isinstance(tools, list):
        raise ToolPolicyError("tools must be a list")
    if len(tools) > policy.max_tools:
        raise ToolPolicyError(f"at most {policy.max_tools} tools per request, got {len(tools)}")
    specs: list[ToolSpec] = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise ToolPolicyError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolPolicyError(f"tools[{i}].function.name must match {NAME.pattern}")
        if any(s.name == name for s in specs):
            raise ToolPolicyError(f"tool {name!r} is declared twice")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolPolicyError(f"tools[{i}].function.parameters must be a JSON schema object")
        size = len(json.dumps(params))
        if size > policy.max_schema_bytes:
            raise ToolPolicyError(f"tool {name!r}: parameters schema is {size} bytes, over the "
                                  f"limit of {policy.max_schema_bytes}", "tool_schema_too_large")
        if _depth(params, policy.max_schema_depth) > policy.max_schema_depth:
            raise ToolPolicyError(f"tool {name!r}: parameters schema nests deeper than "
                                  f"{policy.max_schema_depth}", "tool_schema_too_deep")
        if params.get("type", "object") != "object":
            raise ToolPolicyError(f"tool {name!r}: parameters must describe an object")
        desc = fn.get("description", "")
        specs.append(ToolSpec(name, desc if isinstance(desc, str) else "", params))
    if policy.allow:
        denied = [s.name for s in specs if s.name not in policy.allow]
        if denied:
            raise ToolPolicyError(f"tool {denied[0]!r} is not on this server's allow-list",
                                  "tool_not_allowed")
    dropped: tuple[str, ...] = ()
    if tool_output_flagged and policy.sensitive:
        dropped = tuple(s.name for s in specs if s.name in policy.sensitive)
        specs = [s for s in specs if s.name not in policy.sensitive]
    mode, forced = _choice(tool_choice, specs, dropped)
    most = 1 if parallel is False or mode == "named" else policy.max_calls
    return EnabledTools(tuple(specs), mode, forced, dropped, most)


def _choice(tc: Any, specs: list[ToolSpec], dropped: tuple[str, ...]) -> tuple[str, str | None]:
    if tc is None:
        return ("auto" if specs else "none"), None
    if tc in ("none", "auto", "required"):
        if tc == "required" and not specs:
            raise ToolPolicyError("tool_choice is required but no tool may be called",
                                  "tool_not_allowed" if dropped else "invalid_tool_choice")
        return (tc if specs or tc == "none" else "none"), None
    name = tc.get("function", {}).get("name") if isinstance(tc, dict) and tc.get("type") == "function" \
        and isinstance(tc.get("function"), dict) else None
    if not isinstance(name, str):
        raise ToolPolicyError('tool_choice must be "none", "auto", "required" or '
                              '{"type": "function", "function": {"name": ...}}', "invalid_tool_choice")
    if name in dropped:
        raise ToolPolicyError(f"tool {name!r} is disabled for this turn: the tool output it follows "
                              "was flagged by the guard", "tool_not_allowed")
    if not any(s.name == name for s in specs):
        raise ToolPolicyError(f"tool_choice names {name!r}, which is not among the request's tools",
                              "invalid_tool_choice")
    return "named", name


def call_schema(enabled: EnabledTools) -> dict[str, Any]:
    """The JSON schema of one call {"name": ..., "arguments": {...}} to an enabled tool."""
    tools = [t for t in enabled.tools if enabled.forced in (None, t.name)]

    def one(t: ToolSpec) -> dict[str, Any]:
        params = {k: v for k, v in t.parameters.items() if k not in ("$defs", "definitions")}
        return {"type": "object", "properties": {"name": {"const": t.name}, "arguments": params},
                "required": ["name", "arguments"], "additionalProperties": False}

    defs: dict[str, Any] = {}
    for t in tools:
        defs.update(t.parameters.get("$defs", {}))
        defs.update(t.parameters.get("definitions", {}))
    schema: dict[str, Any] = one(tools[0]) if len(tools) == 1 else {"anyOf": [one(t) for t in tools]}
    if defs:
        schema["$defs"] = defs
    return schema


def validate_args(schema: Any, value: Any, defs: dict[str, Any] | None = None, path: str = "$",
                  depth: int = 0) -> str | None:
    """Why `value` does not fit `schema` (None when it does)."""
    if depth > 64:
        return f"{path}: schema nests too deeply"
    if schema is True or schema == {} or schema is None:
        return None
    if not isinstance(schema, dict):
        return f"{path}: bad schema"
    defs = {**(defs or {}), **schema.get("$defs", {}), **schema.get("definitions", {})}
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return validate_args(defs.get(name), value, defs, path, depth + 1)
    if "const" in schema and value != schema["const"]:
        return f"{path}: must be {schema['const']!r}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path}: must be one of {schema['enum']!r}"
    for key in ("anyOf", "oneOf"):
        if key in schema and all(validate_args(s, value, defs, path, depth + 1) for s in schema[key]):
            return f"{path}: matches none of {key}"
    t = schema.get("type")
    types = t if isinstance(t, list) else [t] if t else []
    if types and not any(_is(value, x) for x in types):
        return f"{path}: expected {'/'.join(types)}"
    if isinstance(value, str) and not schema.get("minLength", 0) <= len(value) <= schema.get(
            "maxLength", 1 << 62):
        return f"{path}: string length out of bounds"
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 62):
            return f"{path}: array length out of bounds"
        for i, v in enumerate(value):
            err = validate_args(schema.get("items", True), v, defs, f"{path}[{i}]", depth + 1)
            if err:
                return err
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for r in schema.get("required", []):
            if r not in value:
                return f"{path}: missing required property {r!r}"
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            sub = props.get(k, extra)
            if sub is False:
                return f"{path}: unexpected property {k!r}"
            err = validate_args(sub, v, defs, f"{path}.{k}", depth + 1)
            if err:
                return err
    return None


def _is(v: Any, t: str) -> bool:
    return {
        "object": isinstance(v, dict), "array": isinstance(v, list), "string": isinstance(v, str),
        "boolean": isinstance(v, bool), "null": v is None,
        "integer": isinstance(v, int) and not isinstance(v, bool),
        "number": isinstance(v, int | float) and not isinstance(v, bool),
    }.get(t, False)
