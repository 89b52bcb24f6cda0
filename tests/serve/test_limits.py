"""Concurrency, limits and bad input against a real server: 16 clients at once are all answered correctly, the 17th
gets 429; every malformed or over-limit request is a 4xx JSON error naming the field, and the server keeps working.

Oracles: sequential ``generate()`` on the same weights; the server's own /health counters; a follow-up request.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from lit_longctx.cli import main
from lit_longctx.nn import generate
from lit_longctx.serve import serve


def test_16_concurrent_clients_are_all_correct_and_the_17th_gets_429(server, reference):
    model, tok = reference
    prompts = [f"client {i}: " + "abcdefghijklmnop"[i:] for i in range(16)]
    results: dict[int, httpx.Response] = {}

    def client(i: int) -> None:  # client 0 keeps the model busy (64 greedy samples, 8 batches) while the others queue
        body = {"prompt": prompts[i], "max_new_tokens": 200 if i == 0 else 60, "num_samples": 64 if i == 0 else 1}
        results[i] = server.post("/completions", body)

    def wait_for(admitted: int, running: int) -> None:
        deadline = time.monotonic() + 30
        while (h := server.health())["admitted"] < admitted or h["stats"]["active_sessions"] < running:
            assert time.monotonic() < deadline and not results, "the requests were not all in flight at once"
            time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    threads[0].start()
    wait_for(1, 1)
    for t in threads[1:]:
        t.start()
    wait_for(16, 1)  # one running, 15 queued for the model
    over = server.post("/completions", {"prompt": "one too many", "max_new_tokens": 1})
    assert not results, "client 0 finished before the 17th request was refused; the test is too short"
    assert over.status_code == 429 and over.headers["retry-after"] == "1"
    assert over.json()["error"]["type"] == "rate_limit_error" and "--max_concurrent" in over.json()["error"]["message"]
    for t in threads:
        t.join()
    assert sorted(results) == list(range(16))
    for i, prompt in enumerate(prompts):
        expected = generate(model, tok.encode(prompt, bos=True), 200 if i == 0 else 60, stop_tokens=[257])[0]
        got = [c["token_ids"] for c in results[i].json()["completions"]]
        assert results[i].status_code == 200 and got == [expected] * (64 if i == 0 else 1)
    health = server.health()
    assert health["admitted"] == 0  # the 15 queued behind client 0 ran as padded batches of --max_batch 8 at most
    assert health["stats"]["largest_batch"] == health["max_batch"] == 8
    assert server.post("/completions", {"prompt": "after", "max_new_tokens": 2}).status_code == 200


LONG = "x" * 300  # 301 tokens with BOS > max_seq_len 256

BAD = [
    # (path, body or raw bytes, status, field named, words in the message)
    ("/completions", b"{not json", 400, None, "malformed JSON"),
    ("/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/completions", {"prompt": "a", "max_new_tokens": "5"}, 422, "max_new_tokens", "integer"),
    ("/completions", {"prompt": 3}, 422, "prompt", "string"),
    ("/completions", {"prompt": "a", "temperature": True}, 422, "temperature", "number"),
    ("/completions", {"prompt": "a", "max_new_tokens": -1}, 422, "max_new_tokens", "greater than or equal to 0"),
    ("/completions", {"prompt": "a", "temperature": -0.5}, 422, "temperature", "greater than or equal to 0"),
    ("/completions", {"prompt": "a", "top_k": 0}, 422, "top_k", "greater than or equal to 1"),
    ("/completions", {"prompt": "a", "top_p": 1.5}, 422, "top_p", "less than or equal to 1"),
    ("/completions", {"prompt": "a", "seed": -3}, 422, "seed", "greater than or equal to 0"),
    ("/completions", {"prompt": "a", "num_samples": 0}, 422, "num_samples", "greater than or equal to 1"),
    ("/completions", {"prompt": "a", "num_samples": 65}, 422, "num_samples", "server limit of 64"),
    ("/completions", {"prompt": "a", "max_tokens": 5}, 422, "max_tokens", "unknown field"),
    ("/completions", {}, 422, "prompt", "Field required"),
    ("/completions", {"prompt": LONG}, 422, "prompt", "301 tokens exceed the 256"),
    ("/completions", {"prompt": "a", "max_new_tokens": 2000}, 422, "max_new_tokens", "server limit of 1024"),
    ("/completions", {"prompt": "a" * 200, "max_new_tokens": 100}, 422, "max_new_tokens", "at most 55"),
    ("/embeddings", {"prompt": LONG}, 422, "prompt", "exceed"),
    ("/embeddings", {"text": "a"}, 422, "text", "unknown field"),
    ("/tokens", {"ids": [1, -2]}, 422, "ids", ">= 0"),
    ("/tokens", {"ids": [300]}, 422, "ids", "vocabulary size 259"),
    ("/tokens", {"text": "a", "ids": [1]}, 422, "text", "exactly one"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 422, "prompt", "one prompt"),
    ("/v1/completions", {"prompt": "a", "stop": "\n"}, 422, "stop", "None"),
    ("/v1/completions", {"prompt": "a", "n": 99}, 422, "n", "server limit"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 5000}, 422, "max_tokens", "server limit"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 422, "messages[0].role", "'user'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 422, "messages", "exceed"),
]


@pytest.mark.parametrize("path,body,status,field,words", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_naming_the_field(server, path, body, status, field, words):
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = server.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["code"] == status and words in error["message"], error
    if field:
        assert error["message"].startswith(field)


def test_body_size_limit_and_routes(server):
    big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    r = httpx.post(server.url + "/completions", content=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body" and "--max_body_bytes" in r.text

    def chunked():  # no Content-Length: the limit holds while reading
        for _ in range(20):
            yield b"a" * 65536

    r = httpx.post(server.url + "/embeddings", content=chunked(), timeout=30)
    assert r.status_code == 413
    assert httpx.get(server.url + "/nope").status_code == 404 and "error" in httpx.get(server.url + "/nope").json()
    assert httpx.get(server.url + "/completions").status_code == 405
    assert server.post("/completions", {"prompt": "still fine", "max_new_tokens": 3}).status_code == 200
    stats = server.health()["stats"]
    assert stats["failed"] == 0 and stats["active_sessions"] == 0


def test_command_line_errors(hf_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # the real command, in this process
        main(["serve", "--checkpoint", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: checkpoint {str(tmp_path / 'missing')!r} not found")
    for option, value, words in [("max_concurrent", 0, "must be >= 1"), ("max_batch", 0, "must be >= 1"),
                                 ("request_timeout", 0, "must be > 0"),
                                 ("port", 70000, "is not a TCP port"), ("max_prompt_tokens", -1, "0 = unbounded")]:
        with pytest.raises(ValueError, match=f"--{option}={value} ") as info:
            serve(str(hf_dir), **{option: value})
        assert words in str(info.value)
