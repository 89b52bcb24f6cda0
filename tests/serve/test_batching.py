"""Concurrent requests decoded as one padded batch by a real server on loopback: 16 clients (greedy and seeded
sampling, streaming and not) get what they would get alone, a row cancelled mid-way leaves the others' answers
alone, LoLCATs' terrace decoding and end-aligned prompts over several prefill chunks batch, and a session that
refuses a padded batch (landmark ``record_retrieval``) falls back to one request at a time.

To queue requests deterministically, a streaming 256-sample request (its samples decoded --max_batch at a time) holds
the worker until every client is admitted and is then cancelled by closing its connection.

Oracles: ``generate()`` of each prompt alone on the same weights (seeded samplers: the same seed); the server's
/health counters (batches run, largest batch, forwards over a batch) against the number of forwards the batch needs.
"""

from __future__ import annotations

import contextlib
import json
import threading

import httpx
import pytest
import torch

from lit_longctx.checkpoint import load_model, save_checkpoint
from lit_longctx.nn import ModelConfig, generate
from lit_longctx.tokenizers import ByteTokenizer
from tests.serve.helpers import BASE, method_checkpoint, random_model, serving_in_thread, wait_until

HOLD = {"max_samples": 256}  # server option: the hold below may ask for 256 samples
LONG = " ".join(f"line {i} of a prompt several landmark chunks long." for i in range(5))  # 250 tokens


@contextlib.contextmanager
def worker_held(server, prompt: str = "hold"):
    """Keep the model worker busy with a long streaming request until the block exits, then hang it up."""
    release = threading.Event()

    def hold() -> None:
        body = {"prompt": prompt, "max_tokens": 150, "n": 256, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", server.url + "/v1/completions", json=body) as r:
            for _ in r.iter_lines():
                if release.is_set():
                    break

    thread = threading.Thread(target=hold)
    thread.start()
    wait_until(server, lambda h: h["stats"]["active_sessions"] >= 1)
    try:
        yield
    finally:
        release.set()
        thread.join()


def streamed_ids(response: httpx.Response) -> str:
    events = [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: {")]
    return "".join(e["choices"][0]["text"] for e in events)


def oracle(model, ids: list[int], max_new: int, eos: int, temperature: float = 0.0, seed: int | None = None) -> list:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    kwargs = {"temperature": temperature, "top_k": 20} if temperature else {}
    return generate(model, ids, max_new, stop_tokens=[eos], generator=generator, **kwargs)[0]


def queued(server, prompts: list[str], max_new: int) -> tuple[dict, list[list[int]], dict]:
    """Greedy /completions of ``prompts`` sent together while the worker is held: (stats before, the token ids of
    each answer, stats after)."""
    before = server.health()["stats"]
    results: dict[int, httpx.Response] = {}

    def client(i: int) -> None:
        results[i] = server.post("/completions", {"prompt": prompts[i], "max_new_tokens": max_new})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    with worker_held(server):
        for t in threads:
            t.start()
        wait_until(server, lambda h: h["admitted"] == len(prompts) + 1)
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results.values()), results
    return before, [results[i].json()["completions"][0]["token_ids"] for i in range(len(prompts))], server.health()[
        "stats"]


def test_16_concurrent_clients_run_as_one_batch_and_equal_generate_alone(hf_dir, reference):
    model, tok = reference
    with serving_in_thread(hf_dir, max_batch=16, max_concurrent=17, **HOLD) as server:
        before = server.health()["stats"]
        results: dict[int, httpx.Response] = {}

        def request(i: int) -> dict:
            prompt, max_new = f"client {i}: " + "abcdefghijklmnop"[i:], 8 + 3 * i  # different lengths
            if i % 4 == 2:
                return {"path": "/v1/completions", "body": {"prompt": prompt, "max_tokens": max_new, "stream": True,
                                                            "temperature": 0}}
            body = {"prompt": prompt, "max_new_tokens": max_new}
            if i % 4 == 1:  # sampled per row with the request's own seeded generator
                body.update(temperature=0.8, top_k=20, seed=100 + i)
            return {"path": "/completions", "body": body}

        def client(i: int) -> None:
            r = request(i)
            results[i] = server.post(r["path"], r["body"])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        with worker_held(server):
            for t in threads:
                t.start()
            wait_until(server, lambda h: h["admitted"] == 17)  # all 16 queued behind the held worker
            assert not results
        for t in threads:
            t.join()
        health = server.health()
    stats = health["stats"]
    for i in range(16):
        r = request(i)
        body, response = r["body"], results[i]
        assert response.status_code == 200, response.text
        ids = tok.encode(body["prompt"], bos=True)
        if r["path"] == "/v1/completions":
            assert streamed_ids(response) == tok.decode(oracle(model, ids, body["max_tokens"], tok.eos_id))
        else:
            expected = oracle(model, ids, body["max_new_tokens"], tok.eos_id, body.get("temperature", 0.0),
                              body.get("seed"))
            assert response.json()["completions"][0]["token_ids"] == expected, i
    assert stats["largest_batch"] == 16 and stats["batches"] - before["batches"] == 1
    # one prefill forward (every prompt fits one chunk) + one step per token of the longest (greedy) row but its last
    assert stats["batched_forwards"] - before["batched_forwards"] == 8 + 3 * 15
    assert stats["completed"] - before["completed"] == 16 and stats["active_sessions"] == 0 and stats["failed"] == 0
    assert health["admitted"] == 0 and health["max_batch"] == 16


def test_a_row_cancelled_mid_batch_leaves_the_others_alone(tmp_path):
    path = method_checkpoint(tmp_path / "fot.ckpt", "fot")  # FoT: unbounded prompts, memory over several chunks
    model, tok, _ = load_model(path)
    prompts = ["short", "a prompt longer than two FoT windows of sixteen tokens", "medium length"]
    with serving_in_thread(path, **HOLD) as server:
        before = server.health()["stats"]
        results: dict[int, httpx.Response] = {}
        seen = []

        def client(i: int) -> None:
            results[i] = server.post("/completions", {"prompt": prompts[i], "max_new_tokens": 300})

        def hang_up() -> None:  # a streaming row of the same batch that closes its connection after a few tokens
            body = {"prompt": "to be cancelled", "max_tokens": 1000, "temperature": 0, "stream": True}
            with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    seen.append(line)
                    if sum(s.startswith("data: ") for s in seen) == 5:
                        break

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)] + [threading.Thread(target=hang_up)]
        with worker_held(server):
            for t in threads:
                t.start()
            wait_until(server, lambda h: h["admitted"] == 5)
        for t in threads:
            t.join()
        health = wait_until(server, lambda h: h["admitted"] == 0)
    stats = health["stats"]
    for i, prompt in enumerate(prompts):
        expected = generate(model, tok.encode(prompt, bos=True), 300, stop_tokens=[tok.eos_id])[0]
        assert results[i].status_code == 200 and results[i].json()["completions"][0]["token_ids"] == expected
    assert stats["batches"] - before["batches"] == 1 and stats["largest_batch"] == 4
    assert stats["cancelled"] - before["cancelled"] == 2  # the held request and the row that hung up
    # the batch ended with the 300-token rows, not with the cancelled row's 1000
    assert 300 <= stats["batched_forwards"] - before["batched_forwards"] < 1000
    assert stats["active_sessions"] == 0 and stats["failed"] == 0


def test_landmark_requests_batch_with_long_padded_prompts(tmp_path):
    """A landmark session takes padding on its first input: the batch is prefilled at once, long prompts (several
    landmark chunks) included."""
    path = method_checkpoint(tmp_path / "landmark.ckpt", "landmark")
    model, tok, _ = load_model(path)
    prompts = ["hi", LONG[:100], LONG]
    with serving_in_thread(path, **HOLD) as server:
        before, results, stats = queued(server, prompts, 20)
    for prompt, got in zip(prompts, results):
        assert got == generate(model, tok.encode(prompt, bos=True), 20, stop_tokens=[tok.eos_id])[0]
    assert stats["batches"] - before["batches"] == 1 and stats["largest_batch"] == 3 and stats["failed"] == 0


def lolcats_checkpoint(tmp_path, **options):
    options = {"window_size": 8, "feature_dim": 8, "window": "tk", **options}
    config = ModelConfig(**BASE, max_seq_len=32, attention="hybrid_linear",
                         attention_options={"hybrid_linear": options})
    return save_checkpoint(tmp_path / "lolcats.ckpt", random_model(config), tokenizer=ByteTokenizer(),
                           method="lolcats_lora")


@pytest.mark.parametrize("options", [{"block_alignment": "start", "decode_window": "terrace"},
                                     {"block_alignment": "end"}], ids=["terrace_decoding", "end_aligned_prompt"])
def test_lolcats_requests_batch_and_equal_generate_alone(tmp_path, options):
    """Each row's windows follow its own positions (terrace decoding folds each row's blocks at its own boundaries;
    the end-aligned prompt forward aligns to each row's own first chunk), so the queued requests run as one padded
    batch, a prompt longer than max_seq_len = 32 (prefilled in several chunks) included."""
    path = lolcats_checkpoint(tmp_path, **options)
    model, tok, _ = load_model(path)
    prompts = ["one", "a longer prompt here", LONG[:70]]  # 21 tokens with BOS: across the last two chunks of 32
    with serving_in_thread(path, **HOLD) as server:
        before, results, stats = queued(server, prompts, 20)
    for prompt, got in zip(prompts, results):
        assert got == generate(model, tok.encode(prompt, bos=True), 20, stop_tokens=[tok.eos_id])[0]
    assert stats["batches"] - before["batches"] == 1 and stats["largest_batch"] == 3 and stats["failed"] == 0


def test_a_session_that_refuses_padding_runs_the_queued_requests_one_by_one(tmp_path):
    """A landmark session recording retrievals keeps one stream per batch, so it refuses a padded batch: the server
    runs those requests one at a time."""
    path = method_checkpoint(tmp_path / "landmark.ckpt", "landmark")
    model, tok, _ = load_model(path)
    prompts = ["one", "a longer prompt", "mid"]
    encoded = [tok.encode(p, bos=True) for p in prompts]
    with pytest.raises(ValueError, match="record_retrieval"):  # why the server cannot batch them
        generate(model, encoded, 4, record_retrieval=True)
    with serving_in_thread(path, session={"record_retrieval": True}, **HOLD) as server:
        before, results, stats = queued(server, prompts, 20)
    for i, ids in enumerate(encoded):
        expected = generate(model, ids, 20, stop_tokens=[tok.eos_id], record_retrieval=True)[0]
        assert results[i] == expected
    assert stats["batches"] == before["batches"] == 0 and stats["failed"] == 0
    assert stats["completed"] - before["completed"] == 3 and stats["active_sessions"] == 0
