"""The HTTP side of ``lit-longctx serve`` (FastAPI + uvicorn): endpoints, limits, streaming, cancellation.

Requests that use the model are admitted up to ``max_concurrent`` (beyond: 429) and queue for the single model
worker (:mod:`lit_longctx.serve.engine`, which decodes queued single-sample generations together as padded
batches, and the n samples of one request as rows of one batch); each has ``request_timeout`` seconds from
admission (beyond: 504, and its work is cancelled). A client that closes its connection cancels its request: the
worker stops at the next forward (a batched row: at its next token) and drops the session. Bodies above
``max_body_bytes`` get 413 before they are read in full.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lit_longctx.serve.engine import Cancelled, Engine, Job, SampleParams
from lit_longctx.serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAICompletionRequest,
    TokensRequest,
    parse_body,
)

STATIC = Path(__file__).with_name("static")
log = logging.getLogger("lit_longctx.serve")


@dataclass
class Limits:
    """Server limits (``lit-longctx serve --help`` documents each)."""

    max_new_tokens: int = 1024
    max_samples: int = 16
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 16
    request_timeout: float = 600.0


class Detokenizer:
    """Text deltas of a growing id list whose concatenation is the text of all ids (``tokenizer.decode``).

    A delta is held back while the text ends in U+FFFD (an incomplete UTF-8 sequence of a byte-level tokenizer) or
    is not an extension of what was sent (a tokenizer that rewrites earlier text); :meth:`finish` sends the rest.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids)
        return text[len(self.sent):] if text.startswith(self.sent) else ""


def render_chat(template: str, messages: list[dict[str, str]], tokenizer: Any) -> str:
    """The prompt text of ``messages`` under a Jinja chat template (sandboxed, as transformers renders them)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ApiError(422, f"messages: the chat template refused them: {message}", param="messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    piece = lambda i: tokenizer.decode([i]) if i is not None else ""
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eos_id))
    except TemplateError as e:
        raise ApiError(422, f"messages: the chat template failed to render them ({e})", param="messages") from None


def build_app(engine: Engine, limits: Limits) -> FastAPI:
    """The FastAPI application serving ``engine`` under ``limits``."""
    app = FastAPI(title="lit-longctx", docs_url=None, redoc_url=None, openapi_url=None)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lit-longctx-model")
    admitted = {"n": 0}  # only touched on the event loop's thread

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind="not_found_error").body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("request %s failed", request.url.path, exc_info=exc)
        return JSONResponse(ApiError(500, f"internal error ({type(exc).__name__}); see the server log",
                                     kind="server_error").body(), status_code=500)

    # ------------------------------------------------------------------------------------------------- plumbing
    async def read(request: Request, schema: type) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"body: {declared} bytes exceed the limit of {limits.max_body_bytes} "
                                "(server option --max_body_bytes)", param="body")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"body: more than {limits.max_body_bytes} bytes (server option --max_body_bytes)",
                               param="body")
            chunks.append(chunk)
        return parse_body(b"".join(chunks), schema)

    def prompt_ids(text: str, max_new: int, field: str, new_field: str) -> list[int]:
        if max_new > limits.max_new_tokens:
            raise ApiError(422, f"{new_field}: {max_new} exceeds the server limit of {limits.max_new_tokens} "
                                "(server option --max_new_tokens)", param=new_field)
        ids = engine.encode(text)
        if not ids:
            raise ApiError(422, f"{field}: the prompt is empty and this tokenizer has no BOS; give some text",
                           param=field)
        limit = engine.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            raise ApiError(422, f"{field}: {len(ids)} tokens exceed the {limit} this model supports "
                                "(its max_seq_len; --max_prompt_tokens lowers it)", param=field)
        if limit is not None and len(ids) + max_new > limit:
            raise ApiError(422, f"{new_field}: prompt ({len(ids)} tokens) + {max_new} new tokens exceed the "
                                f"{limit} this model supports; ask for at most {limit - len(ids)}", param=new_field)
        return ids

    def samples(n: int, field: str) -> int:
        if n > limits.max_samples:
            raise ApiError(422, f"{field}: {n} exceeds the server limit of {limits.max_samples} samples",
                           param=field)
        return n

    def admit() -> Callable[[Any], None]:
        if admitted["n"] >= limits.max_concurrent:
            raise ApiError(429, f"too many requests: {limits.max_concurrent} are being served or queued "
                                "(server option --max_concurrent); retry later", kind="rate_limit_error",
                           headers={"Retry-After": "1"})
        admitted["n"] += 1

        def release(future: asyncio.Future) -> None:
            admitted["n"] -= 1
            if not future.cancelled():
                future.exception()  # retrieved: a request that timed out or was cancelled already got its answer

        return release

    def submit(job: Job) -> asyncio.Future:
        release = admit()
        future = asyncio.wrap_future(engine.enqueue(job))
        worker.submit(engine.drain)  # one worker turn per job; a turn may run several queued jobs as one batch
        future.add_done_callback(release)  # the slot frees when the worker is done with it, not when we answer
        return future

    async def watch(request: Request, cancel: threading.Event) -> None:
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(0.05)

    async def call(request: Request, job: Job) -> Any:
        cancel = job.cancel
        future = submit(job)
        watcher = asyncio.create_task(watch(request, cancel))
        try:
            return await asyncio.wait_for(asyncio.shield(future), limits.request_timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, f"the request took longer than {limits.request_timeout} s (server option "
                                "--request_timeout) and was cancelled", kind="timeout_error") from None
        except Cancelled:
            raise ApiError(499, "the client closed the connection", kind="cancelled") from None
        finally:
            cancel.set()
            watcher.cancel()

    async def generate_all(request: Request, ids: list[int], params: SampleParams) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(params.num_samples)]
        await call(request, Job(threading.Event(), ids=ids, params=params,
                                emit=lambda sample, token: out[sample].append(token)))
        return out

    def finish_reason(tokens: list[int], params: SampleParams) -> str:
        return "length" if len(tokens) >= params.max_new_tokens else "stop"

    def usage(n_prompt: int, n_new: int) -> dict[str, int]:
        return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}

    def sse(chunks: Callable[[int, str | None, str | None, bool], dict], ids: list[int], params: SampleParams,
            n_prompt: int) -> StreamingResponse:
        """Stream OpenAI chunks as server-sent events; ``chunks(index, text, finish, first)`` builds one.

        One chunk per generated token, in the order the worker produces them (the n samples decode together, so
        each step has a chunk for every choice still open, in index order); then every choice's finishing chunk
        (its ``finish_reason``) in index order, the last one with ``usage``; then ``[DONE]``.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(sample: int, token: int) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (sample, token))

        future = submit(Job(cancel, ids=ids, params=params, emit=emit))
        future.add_done_callback(lambda f: queue.put_nowait(f))

        async def events() -> AsyncIterator[str]:
            deadline = loop.time() + limits.request_timeout
            detok = [Detokenizer(engine.tokenizer) for _ in range(params.num_samples)]
            started = [False] * params.num_samples
            try:
                while True:
                    item = await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0))
                    if isinstance(item, asyncio.Future):
                        item.result()  # re-raise a failure of the worker
                        break
                    sample, token = item
                    delta = detok[sample].push(token)
                    yield "data: " + _json(chunks(sample, delta, None, not started[sample])) + "\n\n"
                    started[sample] = True
                total = 0
                for i, d in enumerate(detok):
                    total += len(d.ids)
                    last = chunks(i, d.finish(), finish_reason(d.ids, params), not started[i])
                    if i == params.num_samples - 1:
                        last["usage"] = usage(n_prompt, total)
                    yield "data: " + _json(last) + "\n\n"
                yield "data: [DONE]\n\n"
            except asyncio.TimeoutError:
                err = ApiError(504, f"the request took longer than {limits.request_timeout} s and was cancelled",
                               kind="timeout_error")
                yield "data: " + _json(err.body()) + "\n\n"
            except Exception as e:  # the stream has started (200): the error goes into the stream
                log.error("stream failed", exc_info=e)
                yield "data: " + _json(ApiError(500, f"internal error ({type(e).__name__})", kind="server_error")
                                       .body()) + "\n\n"
            finally:
                cancel.set()  # client gone (generator closed), timed out or done: the worker stops and frees state

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.name, "method": engine.method, "session": engine.session_name,
                "max_prompt_tokens": engine.max_prompt_tokens, "admitted": admitted["n"],
                "max_concurrent": limits.max_concurrent, "max_batch": engine.max_batch, "stats": engine.stats.to_dict()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "lit-longctx", "method": engine.method,
                                            "session": engine.session_name,
                                            "max_prompt_tokens": engine.max_prompt_tokens,
                                            "chat_template": engine.chat_template is not None}]}

    @app.post("/completions")
    async def completions(request: Request) -> dict[str, Any]:
        body: CompletionRequest = await read(request, CompletionRequest)
        params = SampleParams(body.max_new_tokens, body.temperature, body.top_k, body.top_p,
                              samples(body.num_samples, "num_samples"), body.seed)
        ids = prompt_ids(body.prompt, body.max_new_tokens, "prompt", "max_new_tokens")
        out = await generate_all(request, ids, params)
        return {"model": engine.name, "prompt_tokens": len(ids),
                "completions": [{"text": engine.tokenizer.decode(t), "token_ids": t,
                                 "finish_reason": finish_reason(t, params)} for t in out]}

    @app.post("/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        body: EmbeddingRequest = await read(request, EmbeddingRequest)
        ids = prompt_ids(body.prompt, 0, "prompt", "max_new_tokens")
        vector = await call(request, Job(threading.Event(), work=lambda cancel: engine.embed(ids)))
        return {"model": engine.name, "prompt_tokens": len(ids), "dim": len(vector), "pooling": "mean",
                "normalized": True, "embedding": vector}

    @app.post("/tokens")
    async def tokens(request: Request) -> dict[str, Any]:
        body: TokensRequest = await read(request, TokensRequest)
        if (body.text is None) == (body.ids is None):
            raise ApiError(422, "text: give exactly one of text (to encode) or ids (to decode)", param="text")
        tok = engine.tokenizer
        if body.text is not None:
            ids = tok.encode(body.text, bos=body.bos and tok.bos_id is not None)
        else:
            ids = body.ids
            bad = [i for i in ids if i >= engine.model.config.vocab_size]
            if bad:
                raise ApiError(422, f"ids: {bad[0]} is not below the vocabulary size {engine.model.config.vocab_size}",
                               param="ids")
        return {"ids": ids, "pieces": [tok.decode([i]) for i in ids], "text": tok.decode(ids), "count": len(ids)}

    def openai_params(body: Any, max_new: int) -> SampleParams:
        top_p = body.top_p if body.top_p < 1 else None
        return SampleParams(max_new, body.temperature, body.top_k, top_p, samples(body.n, "n"), body.seed)

    @app.post("/v1/completions")
    async def v1_completions(request: Request) -> Any:
        body: OpenAICompletionRequest = await read(request, OpenAICompletionRequest)
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        params = openai_params(body, body.max_tokens)
        ids = prompt_ids(prompt, body.max_tokens, "prompt", "max_tokens")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                    "choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return sse(chunk, ids, params, len(ids))
        out = await generate_all(request, ids, params)
        choices = [{"index": i, "text": engine.tokenizer.decode(t), "logprobs": None,
                    "finish_reason": finish_reason(t, params)} for i, t in enumerate(out)]
        return {"id": rid, "object": "text_completion", "created": created, "model": engine.name,
                "choices": choices, "usage": usage(len(ids), sum(map(len, out)))}

    @app.post("/v1/chat/completions")
    async def v1_chat(request: Request) -> Any:
        body: ChatRequest = await read(request, ChatRequest)
        if engine.chat_template is None:
            raise ApiError(400, f"model {engine.name!r} has no chat template (no chat_template in its "
                                "tokenizer_config.json); use /v1/completions with a plain prompt", param="messages")
        max_new = next((v for v in (body.max_completion_tokens, body.max_tokens) if v is not None), 16)
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        prompt = render_chat(engine.chat_template, [m.model_dump() for m in body.messages], engine.tokenizer)
        params = openai_params(body, max_new)
        ids = prompt_ids(prompt, max_new, "messages", field)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
            delta = {"role": "assistant", "content": text or ""} if first else {"content": text or ""}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return sse(chunk, ids, params, len(ids))
        out = await generate_all(request, ids, params)
        choices = [{"index": i, "message": {"role": "assistant", "content": engine.tokenizer.decode(t)},
                    "logprobs": None, "finish_reason": finish_reason(t, params)} for i, t in enumerate(out)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": engine.name,
                "choices": choices, "usage": usage(len(ids), sum(map(len, out)))}

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.worker = worker
    return app


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))
