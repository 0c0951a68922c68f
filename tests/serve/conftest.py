"""Fixtures for server and export tests: a tiny random-weight model directory."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn

from trustmoe.config import get_preset
from trustmoe.model.hf import save_model
from trustmoe.model.transformer import Transformer


def make_model_dir(out: Path, data_dir: Path, preset: str = "tiny", seed: int = 0,
                   std: float = 0.2) -> Path:
    """A model with random weights (std large enough that greedy text varies) and a tokenizer."""
    cfg = get_preset(preset).model.replace(eos_token_id=0, bos_token_id=0)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    save_model(model, out, tokenizer_file=data_dir / "tokenizer.json", metadata={"test": True})
    shutil.copyfile(data_dir / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve") / "tiny-moe", tiny_data_dir)


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory: pytest.TempPathFactory, tiny_data_dir: Path) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve") / "tiny-dense", tiny_data_dir,
                          preset="tiny-dense")


class LiveServer:
    """A real uvicorn server for `app` on a free loopback port, in a background thread."""

    def __init__(self, app: Any, timeout: float = 30.0) -> None:
        self.app, self.timeout = app, timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture(scope="session")
def live_server() -> type[LiveServer]:
    """`with live_server(app) as srv:` runs `app` on a free 127.0.0.1 port (srv.url)."""
    return LiveServer


@pytest.fixture(scope="session")
def shared_engine(tiny_model_dir: Path) -> Any:
    """One engine for the server tests (building one costs seconds). Only one server at a
    time may drive it: each test module's server is shut down before the next starts."""
    from trustmoe.engine import Engine

    return Engine(tiny_model_dir, kv_cache_mb=32, max_num_seqs=32, max_queue=64)


@pytest.fixture(scope="session")
def small_engine(tiny_model_dir: Path) -> Any:
    """One running sequence and one waiting: the engine's own queue fills at the third."""
    from trustmoe.engine import Engine

    return Engine(tiny_model_dir, kv_cache_mb=8, max_num_seqs=1, max_queue=1)


@pytest.fixture(scope="session")
def model_dir_factory(tiny_data_dir: Path) -> Any:
    """`model_dir_factory(out, seed=...)`: another tiny model dir (different random weights)."""
    def make(out: Path, seed: int = 0, preset: str = "tiny") -> Path:
        return make_model_dir(out, tiny_data_dir, preset=preset, seed=seed)
    return make
