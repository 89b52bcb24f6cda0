"""Every endpoint of a real ``lit-longctx serve`` process against the same weights in the test process.

Oracles: ``generate()`` (greedy token for token; sampling with generators seeded as documented), the model's own
final hidden states (embeddings), the byte tokenizer (tokens), a hand-rendered chat prompt, the non-streaming answer
(streaming), the OpenAI Python client (compatibility).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from lit_longctx.nn import generate
from tests.serve.helpers import CHAT_TEMPLATE

PROMPTS = ["The for statement", "Once upon a time, ", "déjà vu"]
EOS = [257]


def expected_greedy(reference, prompt: str, n: int) -> list[int]:
    model, tok = reference
    return generate(model, tok.encode(prompt, bos=True), n, stop_tokens=EOS)[0]


def expected_samples(reference, prompt: str, n: int, k: int, seed: int, **sampling) -> list[list[int]]:
    """``num_samples`` = k: sample i alone with its own generator seeded ``seed + i``."""
    model, tok = reference
    return [generate(model, tok.encode(prompt, bos=True), n, stop_tokens=EOS,
                     generator=torch.Generator().manual_seed(seed + i), **sampling)[0] for i in range(k)]


def sse_events(response: httpx.Response) -> list[dict]:
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completions_equal_generate(server, reference, prompt):
    expected = expected_greedy(reference, prompt, 40)
    assert len(set(expected)) > 5  # the oracle is not a degenerate repetition
    body = server.post("/completions", {"prompt": prompt, "max_new_tokens": 40}).json()
    [completion] = body["completions"]
    assert completion["token_ids"] == expected
    assert completion["text"] == reference[1].decode(expected)
    assert completion["finish_reason"] == "length" and body["prompt_tokens"] == len(prompt.encode()) + 1
    v1 = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 40, "temperature": 0}).json()
    assert v1["choices"][0]["text"] == completion["text"] and v1["usage"]["completion_tokens"] == 40


def test_num_samples_with_a_seed_are_reproducible(server, reference):
    sampling = {"temperature": 1.2, "top_k": 40, "top_p": 0.9}
    request = {"prompt": "Once upon", "max_new_tokens": 24, "num_samples": 3, "seed": 11, **sampling}
    first = [c["token_ids"] for c in server.post("/completions", request).json()["completions"]]
    again = [c["token_ids"] for c in server.post("/completions", request).json()["completions"]]
    other = [c["token_ids"] for c in server.post("/completions", {**request, "seed": 12}).json()["completions"]]
    assert first == again == expected_samples(reference, "Once upon", 24, 3, 11, **sampling)
    assert len({tuple(s) for s in first}) == 3 and other != first


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_yields_the_non_streaming_text(server, path):
    body = {"max_tokens": 30, "n": 2, "seed": 5, "temperature": 0.8}
    body |= {"prompt": "déjà vu, again"} if "chat" not in path else {"messages": [{"role": "user", "content": "hi"}]}
    whole = server.post(path, body).json()
    events = sse_events(server.post(path, {**body, "stream": True}))
    for i, choice in enumerate(whole["choices"]):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        if "chat" in path:
            streamed = "".join(c["delta"]["content"] for c in mine)
            assert mine[0]["delta"]["role"] == "assistant" and streamed == choice["message"]["content"]
        else:
            assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"] == "length"
        assert len(mine) == 30 + 1  # one event per token, then the finishing one
    assert events[-1]["usage"] == whole["usage"]


def test_embeddings_equal_mean_final_hidden_states(server, reference):
    model, tok = reference
    text = "Mean-pooled, then L2-normalised."
    ids = torch.tensor([tok.encode(text, bos=True)])
    with torch.no_grad():
        hidden = model(ids, return_hidden=True).hidden[0]  # (T, dim), after the final RMSNorm
    expected = torch.nn.functional.normalize(hidden.double().mean(0), dim=0)
    body = server.post("/embeddings", {"prompt": text}).json()
    assert body["dim"] == model.config.dim and body["prompt_tokens"] == ids.shape[1] and body["normalized"]
    got = torch.tensor(body["embedding"], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert abs(got.norm().item() - 1) < 1e-6


def test_tokens_round_trip(server, reference):
    tok = reference[1]
    text = "Grüße, 世界! tabs\tand\nnewlines"
    body = server.post("/tokens", {"text": text}).json()
    assert body["ids"] == tok.encode(text) == list(text.encode()) and body["count"] == len(text.encode())
    assert body["text"] == text
    back = server.post("/tokens", {"ids": body["ids"]}).json()
    assert back["text"] == text and back["ids"] == body["ids"]
    ascii_body = server.post("/tokens", {"text": "plain ascii", "bos": True}).json()
    assert ascii_body["ids"][0] == tok.bos_id and "".join(ascii_body["pieces"]) == "plain ascii"


def test_chat_uses_the_checkpoint_template(server, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    rendered = "<|system|>Be brief.\n<|user|>Hello\n<|assistant|>"  # CHAT_TEMPLATE written out by hand
    assert "messages" in CHAT_TEMPLATE
    expected = reference[1].decode(expected_greedy(reference, rendered, 20))
    body = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 20, "temperature": 0}).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["usage"]["prompt_tokens"] == len(rendered.encode()) + 1


def test_health_and_models(server, reference):
    health = server.health()
    assert health["status"] == "ok" and health["session"] == "DecodingSession" and health["method"] == "causal"
    assert health["max_prompt_tokens"] == reference[0].config.max_seq_len == 256
    [model] = httpx.get(server.url + "/v1/models").json()["data"]
    assert model["id"] == "tiny-llama" and model["chat_template"] is True


def test_openai_client(server, reference):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    expected = reference[1].decode(expected_greedy(reference, "The for statement", 25))
    out = client.completions.create(model="tiny-llama", prompt="The for statement", max_tokens=25, temperature=0)
    assert out.choices[0].text == expected and out.usage.completion_tokens == 25
    stream = client.completions.create(model="tiny-llama", prompt="The for statement", max_tokens=25,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=10, temperature=0)
    assert chat.choices[0].message.content == reference[1].decode(
        expected_greedy(reference, "<|user|>Hello\n<|assistant|>", 10))
