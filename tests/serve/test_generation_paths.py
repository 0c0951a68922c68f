"""One sampler, one seed rule: the same prompt, settings and seed give the same text from
`trustmoe generate`, from `trustmoe.generate()` and from the server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import trustmoe

PROMPT = "def func_1(x, y):"
KW: dict[str, Any] = {"temperature": 1.0, "top_p": 0.9, "seed": 1234, "max_tokens": 12}


@pytest.fixture(scope="module")
def client(shared_engine: Any, live_server: Any) -> Iterator[openai.OpenAI]:
    from trustmoe.serve.app import create_app

    with live_server(create_app(shared_engine)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                            timeout=60)


def test_same_seed_same_text_everywhere(tiny_model_dir: Path, client: openai.OpenAI) -> None:
    cli = subprocess.run(
        [sys.executable, "-m", "trustmoe.cli", "generate", str(tiny_model_dir), PROMPT,
         "--temperature", "1.0", "--top-p", "0.9", "--seed", "1234", "--max-tokens", "12",
         "--json"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    from_cli = json.loads(cli.stdout)["text"]
    from_python = trustmoe.generate(tiny_model_dir, PROMPT, **KW)
    served = client.completions.create(model=tiny_model_dir.name, prompt=PROMPT, **KW)
    assert from_cli == from_python == served.choices[0].text
    assert len(from_cli) > 0
    other = trustmoe.generate(tiny_model_dir, PROMPT, **{**KW, "seed": 99})
    assert other != from_python  # the seed matters
