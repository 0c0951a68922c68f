"""The async bridge: one background thread drives `Engine.step()`; HTTP handlers talk to it.

`Engine` is not thread-safe, so only the engine thread ever touches it. Handlers send
commands (`_Add` / `_Abort`) through a thread-safe queue and wake the thread; each request's
`RequestOutput`s come back on an asyncio queue owned by the handler's event loop
(`call_soon_threadsafe`). An abort removes the request from the engine at the next command
drain, which happens before every step, so a disconnected client frees its batch slot and KV
blocks within one step. When the engine raises, every request in flight gets the error and
the thread keeps serving new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from tokenizers import Tokenizer

from trustmoe.engine import EngineStats, RequestOutput, SamplingParams
from trustmoe.serve.metrics import ServerMetrics

log = logging.getLogger("trustmoe.serve")

StreamItem = RequestOutput | BaseException  # what a request's queue carries


class SteppedEngine(Protocol):
    """What the bridge drives (engine thread only): `trustmoe.engine.Engine` is one."""

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None) -> str: ...

    def abort(self, request_id: str) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished(self) -> bool: ...

    def stats(self) -> EngineStats: ...


class ServedEngine(SteppedEngine, Protocol):
    """What a server needs besides stepping: the tokenizer, the context, names and EOS."""

    @property
    def tokenizer(self) -> Tokenizer | None: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def model_name(self) -> str: ...

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]: ...


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    out: asyncio.Queue[StreamItem]  # shared by a request's choices
    loop: asyncio.AbstractEventLoop
    arrival: float
    n_tokens: int = 0
    last_time: float = 0.0
    first_seen: bool = False


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: _Stream
    done: asyncio.Future[None]


@dataclass
class _Abort:
    request_id: str


def _put_all(items: list[tuple[_Stream, StreamItem]]) -> None:
    for s, o in items:
        s.out.put_nowait(o)


class AsyncEngine:
    def __init__(self, engine: SteppedEngine, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._cmds: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self.fatal: BaseException | None = None
        self.steps = 0
        self.in_flight = 0  # requests known to the engine thread (for tests and /health)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="trustmoe-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ handler side (event loop)

    async def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                  out: asyncio.Queue[StreamItem], arrival: float | None = None) -> None:
        """Hand a request to the engine; raises what `Engine.add_request` raised."""
        if not self.alive:
            raise EngineDeadError("the engine thread is not running")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        stream = _Stream(out=out, loop=loop, arrival=arrival or time.monotonic())
        self._cmds.put(_Add(request_id, prompt_ids, params, stream, done))
        self._wake.set()
        await done

    def abort(self, request_id: str) -> None:
        """Thread-safe; harmless for finished or unknown ids."""
        self._cmds.put(_Abort(request_id))
        self._wake.set()

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain()
            if self._streams and self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception as e:  # keep serving: fail what was in flight
                    log.exception("engine step failed")
                    self._fail_all(e)
                    continue
                self.steps += 1
                now = time.monotonic()
                batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, StreamItem]]] = {}
                for o in outputs:
                    s = self._deliver(o, now)
                    if s is not None:
                        batches.setdefault(s.loop, []).append((s, o))
                for loop, items in batches.items():  # one wake-up per event loop per step
                    with contextlib.suppress(RuntimeError):  # that loop already closed
                        loop.call_soon_threadsafe(_put_all, items)
                self._gauges()
            else:
                self._gauges()
                self._wake.wait(0.25)
                self._wake.clear()
        self._drain()
        self._fail_all(EngineDeadError("server is shutting down"))

    def _drain(self) -> None:
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                try:
                    self.engine.add_request(cmd.prompt_ids, cmd.params, request_id=cmd.request_id)
                except BaseException as e:  # QueueFullError, PromptTooLongError, ValueError
                    self._resolve(cmd.stream.loop, cmd.done, e)
                    continue
                self._streams[cmd.request_id] = cmd.stream
                self.in_flight = len(self._streams)
                self._resolve(cmd.stream.loop, cmd.done, None)
            else:
                rid = cmd.request_id
                s = self._streams.pop(rid, None)
                if s is not None:
                    with contextlib.suppress(Exception):
                        self.engine.abort(rid)
                    if self.metrics:
                        self.metrics.finished("abort")
                    self.in_flight = len(self._streams)

    def _deliver(self, o: RequestOutput, now: float) -> _Stream | None:
        """Record metrics for one output; the stream it belongs to (None if aborted)."""
        s = self._streams.get(o.request_id)
        if s is None:
            return None
        m = self.metrics
        if m is not None:
            if not s.first_seen:
                m.prompt_tokens.inc(len(o.prompt_token_ids))
                m.prefix_queries.inc(len(o.prompt_token_ids))
                m.prefix_hits.inc(o.num_cached_prompt_tokens)
            new = len(o.new_token_ids)
            if new:
                if s.n_tokens == 0:
                    m.ttft.observe(now - s.arrival)
                else:
                    m.itl.observe(now - s.last_time)
                m.generation_tokens.inc(new)
            if o.finished:
                m.e2e.observe(now - s.arrival)
                m.finished(o.finish_reason)
        s.first_seen = True
        if o.new_token_ids:
            s.n_tokens += len(o.new_token_ids)
            s.last_time = now
        if o.finished:
            del self._streams[o.request_id]
            self.in_flight = len(self._streams)
        return s

    def _put(self, s: _Stream, item: StreamItem) -> None:
        with contextlib.suppress(RuntimeError):  # the handler's loop already closed
            s.loop.call_soon_threadsafe(s.out.put_nowait, item)

    @staticmethod
    def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None],
                 err: BaseException | None) -> None:
        def set_it() -> None:
            if fut.done():
                return
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(set_it)

    def _fail_all(self, err: BaseException) -> None:
        for rid, s in list(self._streams.items()):
            with contextlib.suppress(Exception):
                self.engine.abort(rid)
            self._put(s, err)
        self._streams.clear()
        self.in_flight = 0

    def _gauges(self) -> None:
        if self.metrics is None:
            return
        try:
            st = self.engine.stats()
        except Exception:
            return
        self.metrics.running.set(st.running)
        self.metrics.waiting.set(st.waiting)
        self.metrics.kv_usage.set(st.kv_usage)
