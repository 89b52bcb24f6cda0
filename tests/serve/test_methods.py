"""FoT, landmark and LoLCATs checkpoints served with prompts longer than their training length, through each method's
own decoding session; cancellation by closing the connection and the request timeout free the session.

Oracles: ``generate()`` on the same checkpoint loaded in the test process (which picks the session through
``session_for``); the session type and cache types the model asks for; the server's /health counters.
"""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import pytest
import torch

from lit_longctx.checkpoint import load_model
from lit_longctx.nn import generate, session_for
from lit_longctx.nn.attention.hybrid_linear import HybridLinearCache
from tests.serve.helpers import method_checkpoint, serving_in_thread, wait_until

SESSIONS = {"fot": "FoTSession", "landmark": "LandmarkSession", "lolcats_lora": "HybridLinearSession"}
TEXT = ("In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with the ends of worms "
        "and an oozy smell, nor yet a dry, bare, sandy hole with nothing in it to sit down on or to eat.")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """name -> (server, model, tokenizer) for each method; the LoLCATs server runs with --request_timeout 2 (and up to
    4096 new tokens, so that a request takes well over 2 s)."""
    with contextlib.ExitStack() as stack:
        out = {}
        for name in SESSIONS:
            path = method_checkpoint(tmp_path_factory.mktemp(name) / "model.ckpt", name)
            options = {"request_timeout": 2.0, "max_new_tokens": 4096} if name == "lolcats_lora" else {}
            server = stack.enter_context(serving_in_thread(path, **options))
            model, tok, _ = load_model(path)
            out[name] = server, model.eval(), tok
        yield out


@pytest.mark.parametrize("name", list(SESSIONS))
def test_long_prompt_through_the_method_session(servers, name):
    server, model, tok = servers[name]
    ids = tok.encode(TEXT, bos=True)
    assert len(ids) > 4 * model.config.max_seq_len  # well beyond the training length (16 or 32)
    session = session_for(model)
    assert type(session).__name__ == SESSIONS[name]
    if name == "lolcats_lora":  # LoLCATs decodes with the plain driver over its constant-size per-layer state
        assert all(isinstance(c, HybridLinearCache) for c in session.state.caches)
    expected = generate(model, ids, 30, stop_tokens=[tok.eos_id])[0]
    assert len(expected) == 30 and len(set(expected)) > 1
    body = server.post("/completions", {"prompt": TEXT, "max_new_tokens": 30}).json()
    assert body["completions"][0]["token_ids"] == expected and body["prompt_tokens"] == len(ids)
    health = server.health()
    assert health["stats"]["last_session"] == health["session"] == SESSIONS[name]
    assert health["max_prompt_tokens"] is None and health["method"] == name  # memory methods: unbounded prompts
    v1 = server.post("/v1/completions", {"prompt": TEXT, "max_tokens": 30, "temperature": 0, "stream": True})
    events = [json.loads(line[6:]) for line in v1.text.split("\n\n") if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == tok.decode(expected)


def test_chat_without_a_template_is_a_clear_400(servers):
    server = servers["landmark"][0]
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_closing_the_connection_cancels_and_frees_the_session(servers):
    server = servers["fot"][0]  # unbounded prompts, so a long generation can be asked for
    before = server.health()["stats"]
    body = {"prompt": TEXT, "max_tokens": 1000, "n": 16, "temperature": 0, "stream": True}  # 16k tokens of work
    with httpx.Client(timeout=30) as client, client.stream("POST", server.url + "/v1/completions", json=body) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:  # a few tokens arrived: hang up
                break
    # the client is gone: the worker stops at its next step and drops the session
    health = wait_until(server, lambda h: h["stats"]["cancelled"] > before["cancelled"] and h["admitted"] == 0)
    assert health["stats"]["active_sessions"] == 0
    assert health["stats"]["generated_tokens"] - before["generated_tokens"] < 8000
    assert server.post("/completions", {"prompt": "next", "max_new_tokens": 4}).status_code == 200


def test_a_client_that_gives_up_cancels_a_plain_request(servers):
    server = servers["fot"][0]
    before = server.health()["stats"]
    with pytest.raises(httpx.ReadTimeout):  # httpx closes the connection when it gives up
        server.post("/completions", {"prompt": TEXT, "max_new_tokens": 1000, "num_samples": 16}, timeout=0.5)
    health = wait_until(server, lambda h: h["stats"]["cancelled"] > before["cancelled"] and h["admitted"] == 0)
    assert health["stats"]["active_sessions"] == 0
    assert health["stats"]["generated_tokens"] - before["generated_tokens"] < 8000


def test_request_timeout_cancels_the_work(servers):
    server = servers["lolcats_lora"][0]
    before = server.health()["stats"]
    start = time.monotonic()
    r = server.post("/completions", {"prompt": TEXT * 10, "max_new_tokens": 4096, "num_samples": 16})  # ~10 s
    assert r.status_code == 504 and "--request_timeout" in r.json()["error"]["message"]
    assert 1.9 < time.monotonic() - start < 10
    health = wait_until(server, lambda h: h["stats"]["cancelled"] > before["cancelled"] and h["admitted"] == 0)
    assert health["stats"]["active_sessions"] == 0
    assert server.post("/completions", {"prompt": "next", "max_new_tokens": 4}).status_code == 200


def test_lolcats_embedding_of_a_long_prompt_equals_the_full_forward(servers):
    """LoLCATs' session equals one full-sequence forward of its window kind (hybrid_linear docs), so the served
    embedding of a prompt 6x the training length is the mean of that forward's final hidden states, L2-normalised."""
    server, model, tok = servers["lolcats_lora"]
    ids = torch.tensor([tok.encode(TEXT, bos=True)])
    with torch.no_grad():
        hidden = model(ids, return_hidden=True).hidden[0]
    expected = torch.nn.functional.normalize(hidden.double().mean(0), dim=0)
    body = server.post("/embeddings", {"prompt": TEXT}).json()
    assert body["prompt_tokens"] == ids.shape[1] > 6 * model.config.max_seq_len
    torch.testing.assert_close(torch.tensor(body["embedding"], dtype=torch.float64), expected, atol=1e-5, rtol=1e-5)
    assert server.health()["stats"]["last_session"] == "HybridLinearSession"
