"""OpenAI `/v1/completions` and `/v1/chat/completions`: request -> engine -> response / SSE.

Each choice of a request (prompts × n) is one engine request. Non-streamed responses are
collected while a watcher waits for the client to go away (then everything is aborted);
streamed responses are server-sent events whose producer closes the lease when the client
disconnects or the stream ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from trustmoe.serve import guarding
from trustmoe.serve.chat import chat_prompt_ids, end_of_turn_ids
from trustmoe.serve.jsonmode import JSONLogitsProcessor, SchemaError, compile_schema
from trustmoe.serve.logprobs import chat_logprobs, completion_logprobs
from trustmoe.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, _Sampling, context_length_error
from trustmoe.serve.state import Lease, ServerState, SubRequest

CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it


class LeaseStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its lease, even if the body never started."""

    def __init__(self, content: Any, lease: Lease) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.lease = lease

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.lease.close()


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _bias_processor(bias: dict[int, float]) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
    ids = torch.tensor(list(bias), dtype=torch.long)
    vals = torch.tensor(list(bias.values()), dtype=torch.float32)

    def apply(_: list[int], logits: torch.Tensor) -> torch.Tensor:
        return logits.index_add(0, ids.to(logits.device), vals.to(logits.device, logits.dtype))
    return apply


def build_params(state: ServerState, req: _Sampling, prompt_len: int, max_tokens: int, *,
                 logprobs: int | None, prompt_logprobs: int | None, choice: int,
                 extra_stop_ids: list[int] | None = None) -> Any:
    from trustmoe.engine import SamplingParams

    procs: list[Any] = []
    if req.logit_bias:
        bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        bad = [k for k in bias if not 0 <= k < state.vocab_size]
        if bad:
            raise APIError(400, f"logit_bias token id {bad[0]} is outside the vocabulary",
                           "logit_bias")
        procs.append(_bias_processor(bias))
    rf = req.response_format
    if rf is not None and rf.type != "text":
        schema = None
        if rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema",
                               "response_format")
            schema = rf.json_schema.schema_
        try:
            root = compile_schema(schema)
        except SchemaError as e:
            raise APIError(400, f"response_format: {e}", "response_format") from None
        eos = [state.engine.eos_token_id] if state.engine.eos_token_id is not None else []
        procs.append(JSONLogitsProcessor(root, state.trie, eos + (extra_stop_ids or []),
                                         state.mask_cache))
    seed = None if req.seed is None else (req.seed + choice) % (2**63)
    stop_ids = list(req.stop_token_ids or []) + list(extra_stop_ids or [])
    params = SamplingParams(
        max_tokens=max(max_tokens, 1),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k in (None, -1) else int(req.top_k),
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=seed,
        stop=req.stop_list(),
        stop_token_ids=stop_ids or None,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        logits_processors=procs or None,
    )
    try:
        params.validate(state.max_model_len)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return params


def check_length(state: ServerState, prompt_len: int, max_tokens: int) -> None:
    if prompt_len == 0:
        raise APIError(400, "prompt must not be empty", "prompt")
    if prompt_len + max_tokens > state.max_model_len:
        raise context_length_error(prompt_len, max_tokens, state.max_model_len)


def _tokenize_prompts(state: ServerState, prompt: Any) -> list[list[int]]:
    # text goes through the engine's TextCodec (the model's BOS in front), as every path does
    texts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt and all(
        isinstance(p, str) for p in prompt) else None
    if texts is not None:
        if any(t == "" for t in texts):  # not just a BOS: nothing was asked
            raise APIError(400, "prompt must not be empty", "prompt")
        return [state.engine.encode(t) for t in texts]
    prompts = [prompt] if prompt and isinstance(prompt[0], int) else list(prompt)
    for p in prompts:
        for t in p:
            if not 0 <= t < state.vocab_size:
                raise APIError(400, f"prompt token id {t} is outside the vocabulary "
                               f"(size {state.vocab_size})", "prompt")
    return prompts


async def _collect(lease: Lease, request: Request) -> dict[str, list[Any]] | None:
    """All outputs per request id; None (everything aborted) if the client goes away first."""
    got: dict[str, list[Any]] = {s.request_id: [] for s in lease.subs}

    async def gather() -> None:
        async for o in lease.outputs():
            got[o.request_id].append(o)

    async def disconnected() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    work = asyncio.ensure_future(gather())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        lease.close()
        return None
    work.result()
    return got


def _usage(lease: Lease, gen_tokens: int) -> dict[str, int]:
    seen: set[int] = set()
    prompt = 0
    for s in lease.subs:  # a prompt shared by n choices counts once
        key = id(s.prompt_ids)
        if key not in seen:
            seen.add(key)
            prompt += len(s.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": gen_tokens,
            "total_tokens": prompt + gen_tokens}


async def _admit_and_collect(
    state: ServerState, subs: list[SubRequest], request: Request, stream: bool, id_prefix: str,
    streamer: Callable[[Lease, str, int], AsyncIterator[str]],
) -> Response | tuple[dict[str, list[Any]], Lease, str, int]:
    """Admit `subs`; a streamed response, 499 if the client left, else (outputs, lease, id, created)."""
    rid, created = state.new_id(id_prefix), int(time.time())
    lease = await state.admit(subs)
    if stream:
        return LeaseStreamingResponse(streamer(lease, rid, created), lease)
    try:
        got = await _collect(lease, request)
    finally:
        lease.close()
    if got is None:
        return Response(status_code=CLIENT_CLOSED)
    return got, lease, rid, created


async def _flushed(lease: Lease) -> AsyncIterator[tuple[Any, SubRequest, list[int], list[Any], int]]:
    """Outputs with text to send: (output, its sub, token ids and logprobs held since the last
    send, tokens it adds to the usage count). Outputs without new text are held back (a possible
    stop string or half a character) unless they finish the choice."""
    by_id = {s.request_id: s for s in lease.subs}
    pending: dict[str, tuple[list[int], list[Any]]] = {}
    async for o in lease.outputs():
        s = by_id[o.request_id]
        held = pending.setdefault(o.request_id, ([], []))
        held[0].extend(o.new_token_ids)
        held[1].extend(o.logprobs)
        gen = min(len(o.token_ids), s.max_tokens) if o.finished else 0
        if not o.new_text and not o.finished:
            continue
        ids, lps = pending.pop(o.request_id)
        yield o, s, ids, lps, gen


async def create_completion(state: ServerState, req: CompletionRequest,
                            request: Request) -> Any:
    state.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of must equal n (beam search is not supported)", "best_of")
    gctx = guarding.completion_guard(state, req.prompt)  # 400 when the guard blocks
    prompts = _tokenize_prompts(state, req.prompt)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    subs: list[SubRequest] = []
    for pi, ids in enumerate(prompts):
        check_length(state, len(ids), max_tokens)
        for c in range(req.n):
            params = build_params(state, req, len(ids), max_tokens, logprobs=req.logprobs,
                                  prompt_logprobs=req.logprobs if req.echo else None, choice=c)
            subs.append(SubRequest(state.new_id("req"), pi * req.n + c, ids, params, max_tokens))
    done = await _admit_and_collect(
        state, subs, request, req.stream, "cmpl",
        lambda lease, rid, created: _stream_completion(state, req, lease, rid, created, gctx))
    if isinstance(done, Response):
        done.headers.update(gctx.headers())
        return done
    got, lease, rid, created = done
    choices, n_gen = [], 0
    for s in subs:
        final = got[s.request_id][-1]
        ids = final.token_ids[: s.max_tokens]
        text = final.text if s.max_tokens else ""
        lps = [lp for o in got[s.request_id] for lp in o.logprobs][: len(ids)]
        prompt_text = ""
        if req.echo:
            prompt_text = state.tokenizer.decode(s.prompt_ids, skip_special_tokens=False)
        logprobs = None
        if req.logprobs is not None:
            first = next((o for o in got[s.request_id] if o.prompt_logprobs), None)
            plps = first.prompt_logprobs if first else None
            ptops = first.prompt_top_logprobs if first else None
            echoed = s.prompt_ids if req.echo else None
            logprobs = completion_logprobs(state, ids, lps, echoed, plps, prompt_tops=ptops)
        n_gen += len(ids)
        msg, reason = gctx.finish(s.index, text, final.finish_reason if s.max_tokens else "length")
        choices.append({"index": s.index, "text": prompt_text + (msg["content"] or ""),
                        "logprobs": logprobs, "finish_reason": reason})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                         "model": state.model_name, "choices": choices,
                         "usage": _usage(lease, n_gen)}, headers=gctx.headers())


async def _stream_completion(state: ServerState, req: CompletionRequest, lease: Lease, rid: str,
                             created: int, gctx: guarding.ChatGuard | None = None
                             ) -> AsyncIterator[str]:
    n_gen, offsets = 0, {s.request_id: 0 for s in lease.subs}
    usage_null = {"usage": None} if req.include_usage() else {}
    try:
        if req.echo:
            for s in lease.subs:
                text = state.tokenizer.decode(s.prompt_ids, skip_special_tokens=False)
                offsets[s.request_id] = len(text)
                yield sse({"id": rid, "object": "text_completion", "created": created,
                           "model": state.model_name, **usage_null,
                           "choices": [{"index": s.index, "text": text, "logprobs": None,
                                        "finish_reason": None}]})
        async for o, s, ids, lps, gen in _flushed(lease):
            n_gen += gen
            logprobs = None
            if req.logprobs is not None and ids and s.max_tokens:
                logprobs = completion_logprobs(state, ids, lps, None, None, offsets[o.request_id])
            text = o.new_text if s.max_tokens else ""
            reason = (o.finish_reason if s.max_tokens else "length") if o.finished else None
            if gctx is not None:  # output guard: held-back, redacted, or cut at a block
                if guarding.stopped(lease, s, gctx):
                    continue
                delta, reason, _ = gctx.stream(s.index, text, o.finished, reason)
                text = delta.get("content") or ""
            offsets[o.request_id] += len(text)
            yield sse({"id": rid, "object": "text_completion", "created": created,
                       "model": state.model_name, **usage_null,
                       "choices": [{"index": s.index, "text": text, "logprobs": logprobs,
                                    "finish_reason": reason}]})
        if req.include_usage():
            yield sse({"id": rid, "object": "text_completion", "created": created,
                       "model": state.model_name, "choices": [],
                       "usage": _usage(lease, n_gen)})
    except APIError as e:
        yield sse(e.body())
    yield "data: [DONE]\n\n"


async def create_chat(state: ServerState, req: ChatCompletionRequest, request: Request) -> Any:
    state.check_model(req.model)
    template = state.chat_template
    if req.chat_template is not None:
        from trustmoe.serve.chat import ChatTemplate

        try:
            template = ChatTemplate(req.chat_template)
        except ValueError as e:
            raise APIError(400, str(e), "chat_template") from None
    gctx = guarding.check_chat(state, req)  # guard verdict (400 on block), tools, canary
    prompt = template.render(gctx.messages, req.add_generation_prompt)
    ids = chat_prompt_ids(state, prompt)
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = asked if asked is not None else max(state.max_model_len - len(ids), 1)
    check_length(state, len(ids), max_tokens)
    top = req.top_logprobs or 0
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    eot = end_of_turn_ids(state.tokenizer.token_to_id)
    subs = [SubRequest(state.new_id("req"), c, ids,
                       build_params(state, req, len(ids), max_tokens,
                                    logprobs=top if req.logprobs else None, prompt_logprobs=None,
                                    choice=c, extra_stop_ids=eot), max_tokens)
            for c in range(req.n)]
    eos = [state.engine.eos_token_id] if state.engine.eos_token_id is not None else []
    for sub in subs:
        gctx.constrain(sub.params, eos + eot)  # a forced/required tool call: JSON of an enabled tool
    done = await _admit_and_collect(
        state, subs, request, req.stream, "chatcmpl",
        lambda lease, rid, created: _stream_chat(state, req, lease, rid, created, gctx))
    if isinstance(done, Response):
        done.headers.update(gctx.headers())
        return done
    got, lease, rid, created = done
    choices, n_gen = [], 0
    for s in subs:
        final = got[s.request_id][-1]
        ids_out = final.token_ids[: s.max_tokens]
        lps = [lp for o in got[s.request_id] for lp in o.logprobs][: len(ids_out)]
        n_gen += len(ids_out)
        msg, reason = gctx.finish(s.index, final.text if s.max_tokens else "",
                                  final.finish_reason if s.max_tokens else "length")
        choices.append({
            "index": s.index, "message": msg,
            "logprobs": chat_logprobs(state, lps, ids_out) if req.logprobs else None,
            "finish_reason": reason})
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                         "model": state.model_name, "choices": choices,
                         "usage": _usage(lease, n_gen)}, headers=gctx.headers())


async def _stream_chat(state: ServerState, req: ChatCompletionRequest, lease: Lease, rid: str,
                       created: int, gctx: guarding.ChatGuard | None = None) -> AsyncIterator[str]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": created,
            "model": state.model_name, **({"usage": None} if req.include_usage() else {})}
    n_gen = 0
    try:
        for s in lease.subs:
            yield sse({**head, "choices": [{"index": s.index, "delta": {"role": "assistant",
                                                                         "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        async for o, s, ids, lps, gen in _flushed(lease):
            n_gen += gen
            lp = chat_logprobs(state, lps, ids) if req.logprobs else None
            delta: dict[str, Any] = {"content": o.new_text} if o.new_text and s.max_tokens else {}
            reason = (o.finish_reason if s.max_tokens else "length") if o.finished else None
            if gctx is not None:  # output guard and tool calls: held back until safe
                if guarding.stopped(lease, s, gctx):
                    continue
                delta, reason, _ = gctx.stream(s.index, o.new_text if s.max_tokens else "",
                                               o.finished, reason)
            yield sse({**head, "choices": [{
                "index": s.index, "delta": delta, "logprobs": lp, "finish_reason": reason}]})
        if req.include_usage():
            yield sse({**head, "choices": [], "usage": _usage(lease, n_gen)})
    except APIError as e:
        yield sse(e.body())
    yield "data: [DONE]\n\n"
