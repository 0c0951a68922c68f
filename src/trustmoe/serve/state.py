"""What one server holds: the engine and its bridge, limits, and admission of requests.

`ServerState.admit` is the one door into the engine: it takes concurrency slots without
waiting (429 when none are free), hands every choice of a request to the engine thread, and
returns a `Lease` whose `close()` aborts whatever has not finished and gives the slots back.
Handlers close their lease in `finally`, so a request that ends any way at all — finished,
client gone, error — leaves nothing behind.

Several states (one per engine of a `Fleet`: production, canary, shadow) share one
`Admission`, the server-wide count of choices in flight against `max_concurrency`. A request
that runs under a `RequestTracker` (`serve/tracking.py`, set by the route) has its lease
attached to it, so the tracker sees the outputs (TTFT, tokens) and the end of a stream.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from trustmoe.config import SERVER_MAX_CONCURRENCY
from trustmoe.engine import PromptTooLongError, QueueFullError, RequestOutput, SamplingParams
from trustmoe.serve.bridge import AsyncEngine, EngineDeadError, ServedEngine, StreamItem
from trustmoe.serve.chat import ChatTemplate
from trustmoe.serve.metrics import ServerMetrics
from trustmoe.serve.protocol import APIError
from trustmoe.serve.tracking import CURRENT_TRACKER, RequestTracker

if TYPE_CHECKING:
    from trustmoe.serve.jsonmode import State
    from trustmoe.serve.vocab import TokenTrie

RETRY_AFTER_S = 1


@dataclass
class SubRequest:
    request_id: str
    index: int  # choice index in the response
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # what the client asked for (0 allowed: prompt only)


@dataclass
class Lease:
    state: ServerState
    subs: list[SubRequest]
    queue: asyncio.Queue[StreamItem]
    arrival: float
    unfinished: set[str] = field(default_factory=set)
    closed: bool = False
    tracker: RequestTracker | None = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        complete = not self.unfinished
        for rid in self.unfinished:
            self.state.bridge.abort(rid)
        self.unfinished.clear()
        self.state.active -= len(self.subs)
        self.state.admission.active -= len(self.subs)
        if self.tracker is not None:
            self.tracker.lease_closed(complete)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutputs of all choices until every one has finished."""
        while self.unfinished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                if self.tracker is not None:
                    self.tracker.error_status = 500
                raise APIError(500, f"generation failed: {type(item).__name__}: {item}")
            if item.finished:
                self.unfinished.discard(item.request_id)
            if self.tracker is not None:
                self.tracker.observe(item)
            yield item


@dataclass
class Admission:
    """The server-wide count of choices in flight, shared by every engine's state."""

    max_concurrency: int
    active: int = 0


class ServerState:
    def __init__(self, engine: ServedEngine, *, model_name: str | None = None,
                 served_names: list[str] | None = None,
                 max_concurrency: int = SERVER_MAX_CONCURRENCY,
                 chat_template: ChatTemplate | None = None, api_key: str | None = None,
                 metrics: ServerMetrics | None = None, admission: Admission | None = None) -> None:
        self.engine = engine
        self.model_name = model_name or engine.model_name or "trustmoe"
        self.served_names = set(served_names or []) | {self.model_name}
        self.metrics = metrics if metrics is not None else ServerMetrics(self.model_name)
        self.bridge = AsyncEngine(engine, self.metrics)
        self.max_concurrency = max_concurrency
        self.admission = admission if admission is not None else Admission(max_concurrency)
        self.active = 0  # choices of this engine in flight (admission.active: all engines')
        self.chat_template = chat_template or ChatTemplate()
        self.api_key = api_key
        self.created = int(time.time())
        if engine.tokenizer is None:
            raise ValueError("the engine has no tokenizer: a server needs one (tokenizer.json)")
        self.tokenizer = engine.tokenizer
        self.vocab_size = int(self.tokenizer.get_vocab_size(with_added_tokens=True))
        self.max_model_len = int(engine.max_model_len)
        self._trie: TokenTrie | None = None
        self.mask_cache: OrderedDict[State, torch.Tensor] = OrderedDict()  # JSON-mode masks
        self._counter = 0

    def new_id(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}-{int(time.time() * 1000):x}{self._counter:06x}"

    @property
    def trie(self) -> TokenTrie:
        if self._trie is None:
            from trustmoe.serve.vocab import TokenTrie

            self._trie = TokenTrie(self.tokenizer)
        return self._trie

    def release_engine(self) -> None:
        """Drop this state's engine (a retired slot): its weights and KV cache are freed once
        nothing else holds them."""
        self.bridge.engine = None  # type: ignore[assignment]
        self.engine = None  # type: ignore[assignment]
        self.mask_cache.clear()
        self._trie = None

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_names:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                           f"{', '.join(sorted(self.served_names))}.", "model",
                           type_="not_found_error", code="model_not_found")

    def reject(self, status: int, message: str) -> APIError:
        self.metrics.rejected(status)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
        return APIError(status, message, headers=headers)

    async def admit(self, subs: list[SubRequest]) -> Lease:
        """Take slots and submit every choice; on any failure nothing stays behind."""
        if len(subs) > self.max_concurrency:
            raise APIError(400, f"this request asks for {len(subs)} generations (prompts × n); "
                           f"the server allows {self.max_concurrency} at once")
        busy = self.admission.active
        if busy + len(subs) > self.max_concurrency:
            raise self.reject(429, f"server busy: {busy} requests in flight "
                              f"(--max-concurrency {self.max_concurrency}); retry shortly")
        self.active += len(subs)
        self.admission.active += len(subs)
        tracker = CURRENT_TRACKER.get()
        lease = Lease(self, subs, asyncio.Queue(), time.monotonic(), tracker=tracker)
        if tracker is not None:
            tracker.attach(lease)
        try:
            for s in subs:
                lease.unfinished.add(s.request_id)
                await self.bridge.add(s.request_id, s.prompt_ids, s.params, lease.queue,
                                      arrival=lease.arrival)
        except QueueFullError:
            lease.close()
            msg = "the request queue is full (--max-queue); retry shortly"
            raise self.reject(429, msg) from None
        except PromptTooLongError as e:
            lease.close()
            raise APIError(400, str(e), "prompt", code="context_length_exceeded") from None
        except EngineDeadError as e:
            lease.close()
            raise APIError(503, str(e)) from None
        except ValueError as e:
            lease.close()
            raise APIError(400, str(e)) from None
        except BaseException:
            lease.close()
            raise
        return lease
