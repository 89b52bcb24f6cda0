"""The ``lit-longctx serve`` command: load a checkpoint and serve it with uvicorn on 127.0.0.1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    max_prompt_tokens: int | None = None,
    max_new_tokens: int = 1024,
    max_samples: int = 16,
    max_body_bytes: int = 1 << 20,
    max_concurrent: int = 16,
    request_timeout: float = 600.0,
    max_batch: int = 8,
    session: dict[str, Any] | None = None,
) -> None:
    """Serve a checkpoint over HTTP (completions, embeddings, tokens, OpenAI-compatible API, a web page at /).

    Endpoints: POST /completions, /embeddings, /tokens, /v1/completions, /v1/chat/completions; GET /health,
    /v1/models, /. Requests run through the method's decoding session, queued up to --max_concurrent; queued
    single-sample generations are decoded together as one left-padded batch of up to --max_batch, and the samples
    of a multi-sample request (num_samples / n) as rows of one batch, --max_batch at a time.

    Args:
        checkpoint: an HF directory, a lit-longctx checkpoint, a fit .ckpt or a run directory.
        host: address to bind; the default serves this machine only.
        port: TCP port.
        name: model id reported by /v1/models (default: the checkpoint's file or directory name).
        device: cpu, cuda, or auto.
        dtype: compute dtype (default float32 on CPU, bfloat16 on CUDA).
        max_prompt_tokens: longest prompt accepted; default what the method supports (max_seq_len, or unbounded
            for memory methods: FoT, landmark, LoLCATs); 0 = unbounded.
        max_new_tokens: largest max_new_tokens / max_tokens a request may ask for.
        max_samples: largest num_samples / n.
        max_body_bytes: largest request body (413 beyond).
        max_concurrent: requests being served or queued at once (429 beyond).
        request_timeout: seconds a request may take from admission, queueing included (504 beyond).
        max_batch: most queued single-sample generations decoded together in one padded batch, and most samples of
            one request decoded together (1 = one at a time).
        session: options for the model's decoding session (e.g. FoT's last_context_length).
    """
    import uvicorn

    app = build_server(checkpoint, host=host, port=port, name=name, device=device, dtype=dtype,
                       max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens, max_samples=max_samples,
                       max_body_bytes=max_body_bytes, max_concurrent=max_concurrent, request_timeout=request_timeout,
                       max_batch=max_batch, session=session)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


def build_server(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
                 device: str = "auto", dtype: str | None = None, max_prompt_tokens: int | None = None,
                 max_new_tokens: int = 1024, max_samples: int = 16, max_body_bytes: int = 1 << 20,
                 max_concurrent: int = 16, request_timeout: float = 600.0, max_batch: int = 8,
                 session: dict[str, Any] | None = None) -> Any:
    """Check the options, load the checkpoint and return the FastAPI app (what :func:`serve` runs)."""

    from lit_longctx.checkpoint import load_for_inference
    from lit_longctx.serve.app import Limits, build_app
    from lit_longctx.serve.engine import Engine, read_chat_template

    for option, value in (("max_new_tokens", max_new_tokens), ("max_samples", max_samples),
                          ("max_body_bytes", max_body_bytes), ("max_concurrent", max_concurrent),
                          ("max_batch", max_batch)):
        if value < 1:
            raise ValueError(f"--{option}={value} must be >= 1")
    if request_timeout <= 0:
        raise ValueError(f"--request_timeout={request_timeout} must be > 0 seconds")
    if max_prompt_tokens is not None and max_prompt_tokens < 0:
        raise ValueError(f"--max_prompt_tokens={max_prompt_tokens} must be >= 0 (0 = unbounded)")
    if not 0 <= port < 65536:
        raise ValueError(f"--port={port} is not a TCP port (0-65535)")
    model, tokenizer, loaded, device = load_for_inference(checkpoint, device, dtype)
    engine = Engine(model, tokenizer, name=name or Path(checkpoint).name or str(checkpoint), method=loaded.method,
                    max_prompt_tokens=max_prompt_tokens, session_kwargs=session,
                    chat_template=read_chat_template(loaded), max_batch=max_batch)
    limits = Limits(max_new_tokens, max_samples, max_body_bytes, max_concurrent, request_timeout)
    app = build_app(engine, limits)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {host} serves other machines too; the server has no authentication", file=sys.stderr)
    limit = engine.max_prompt_tokens if engine.max_prompt_tokens is not None else "unbounded"
    print(f"lit-longctx serve: {engine.name} ({loaded.method}, {engine.session_name}, prompts up to {limit} tokens) "
          f"on http://{host}:{port}", file=sys.stderr, flush=True)
    return app
