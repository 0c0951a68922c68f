"""Chat prompts: the model's chat template (tokenizer_config.json) in a Jinja2 sandbox.

Where the model directory has no template, the documented default is ChatML, the same one
`trustmoe` writes for its own tokenizers (`trustmoe.data.tokenizer.DEFAULT_CHAT_TEMPLATE`):

    <|im_start|>{role}\\n{content}<|im_end|>\\n ... <|im_start|>assistant\\n

A chat turn ends at `<|im_end|>` (a stop token when the vocabulary has it) or at EOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from trustmoe.data.tokenizer import DEFAULT_CHAT_TEMPLATE, EOS_TOKEN
from trustmoe.serve.protocol import APIError

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", EOS_TOKEN)


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or DEFAULT_CHAT_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(self.source)
        except TemplateError as e:
            raise ValueError(f"chat template does not compile: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | None) -> ChatTemplate:
        """The model's template, or the ChatML default when it has none."""
        if model_dir is None:
            return cls()
        p = Path(model_dir) / "tokenizer_config.json"
        if not p.exists():
            return cls()
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return cls()
        tmpl = cfg.get("chat_template")
        if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default")
        return cls(tmpl if isinstance(tmpl, str) else None,
                   bos_token=_token_str(cfg.get("bos_token")),
                   eos_token=_token_str(cfg.get("eos_token")))

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            msg = f"messages do not fit the chat template: {e}"
            raise APIError(400, msg, "messages") from None
        except Exception as e:  # a template bug must not become a 500 with a traceback
            msg = f"chat template failed: {type(e).__name__}: {e}"
            raise APIError(400, msg, "messages") from None


def _token_str(t: Any) -> str:
    if isinstance(t, dict):
        return str(t.get("content", ""))
    return t if isinstance(t, str) else ""


def end_of_turn_ids(token_to_id: Any) -> list[int]:
    """Ids of the end-of-turn tokens present in the vocabulary."""
    ids = [token_to_id(t) for t in END_OF_TURN_TOKENS]
    return [i for i in ids if i is not None]


def chat_prompt_ids(state: Any, rendered: str) -> list[int]:
    """Ids of a rendered chat prompt: the engine's one text encoding (`TextCodec`), so a
    template that renders `{{ bos_token }}` itself and one that does not both start with
    exactly one BOS. `state` is the server's `ServerState`."""
    return list(state.engine.encode(rendered))
