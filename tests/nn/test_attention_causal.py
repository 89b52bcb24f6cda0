"""Causal attention: backends against each other and against a per-query loop, GQA, document masking, KV cache.

Oracles: a slow loop over queries that softmaxes over the keys each query may see (written from the definition),
transformers' ``repeat_kv``, and running each packed document on its own.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv

from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.nn.attention import AttentionContext, KVCache, attend
from lit_longctx.nn.attention.causal import causal_doc_mask, eager_attention, flash_attn_available, repeat_kv


def qkv(b=2, h=4, hkv=2, tq=12, s=12, d=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(b, h, tq, d, generator=g)).requires_grad_(requires_grad)
    k = (2 * torch.randn(b, hkv, s, d, generator=g)).requires_grad_(requires_grad)
    v = torch.randn(b, hkv, s, d, generator=g).requires_grad_(requires_grad)
    return q, k, v


def loop_reference(q, k, v, doc_ids=None):
    """Query i (the (S-Tq+i)-th position) attends to keys j ≤ its position [of the same document], float64."""
    b, h, tq, d = q.shape
    s, group = k.shape[2], q.shape[1] // k.shape[1]
    out = torch.zeros(b, h, tq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(tq):
                p = s - tq + i
                keys = [j for j in range(p + 1) if doc_ids is None or doc_ids[bi, j] == doc_ids[bi, p]]
                kk = k[bi, hi // group, keys].double()
                w = torch.softmax(kk @ q[bi, hi, i].double() / d**0.5, dim=0)
                out[bi, hi, i] = w @ v[bi, hi // group, keys].double()
    return out


DOCS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("tq", "s", "docs"), [(12, 12, False), (12, 12, True), (5, 12, False), (1, 12, False)],
    ids=["self", "packed", "chunk_after_cache", "one_query"],
)


@pytest.mark.parametrize("hkv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attend_matches_loop_reference(backend, tq, s, docs, hkv):
    q, k, v = qkv(hkv=hkv, tq=tq, s=s)
    doc_ids = DOCS if docs else None
    got = attend(q, k, v, backend=backend, doc_ids=doc_ids)
    torch.testing.assert_close(got.double(), loop_reference(q, k, v, doc_ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("docs", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("hkv", [4, 2])
def test_sdpa_and_eager_agree_in_values_and_gradients(docs, hkv):
    doc_ids = DOCS if docs else None
    grads = {}
    for backend in ("sdpa", "eager"):
        q, k, v = qkv(hkv=hkv, requires_grad=True)
        out = attend(q, k, v, backend=backend, doc_ids=doc_ids)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[backend] = (out.detach(), q.grad, k.grad, v.grad)
    for a, b in zip(grads["sdpa"], grads["eager"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gqa_equals_explicit_repeat():
    q, k, v = qkv(h=6, hkv=2)
    # our repeat_kv groups query heads like transformers: head h reads KV head h // (H / Hkv)
    torch.testing.assert_close(repeat_kv(k, 3), hf_repeat_kv(k, 3), atol=0, rtol=0)
    for backend in ("sdpa", "eager"):
        grouped = attend(q, k, v, backend=backend)
        repeated = attend(q, repeat_kv(k, 3), repeat_kv(v, 3), backend=backend)
        torch.testing.assert_close(grouped, repeated, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_document_masking_equals_running_documents_separately(backend):
    q, k, v = qkv(b=1)
    doc_ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2]])
    packed = attend(q, k, v, backend=backend, doc_ids=doc_ids)
    for lo, hi in ((0, 5), (5, 7), (7, 12)):
        alone = attend(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], backend=backend)
        torch.testing.assert_close(packed[:, :, lo:hi], alone, atol=1e-6, rtol=1e-6)


def test_flash_attn_backend_falls_back_to_sdpa_on_cpu():
    q, k, v = qkv()
    torch.testing.assert_close(attend(q, k, v, backend="flash_attn", doc_ids=DOCS),
                               attend(q, k, v, backend="sdpa", doc_ids=DOCS))


def test_causal_doc_mask():
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_doc_mask(3, 5, torch.device("cpu")), expected)  # queries are the last 3 positions
    docs = torch.tensor([[0, 0, 1, 1]])
    packed = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_doc_mask(4, 4, torch.device("cpu"), docs), packed.view(1, 1, 4, 4))
    with pytest.raises(ValueError, match="document masking needs queries and keys of the same length"):
        causal_doc_mask(2, 4, torch.device("cpu"), docs)


def test_eager_attention_accepts_additive_masks():
    q, k, v = qkv()
    boolean = causal_doc_mask(12, 12, torch.device("cpu"))
    additive = torch.zeros(12, 12).masked_fill(~boolean, float("-inf"))
    torch.testing.assert_close(eager_attention(q, k, v, boolean, 0.25), eager_attention(q, k, v, additive, 0.25))


# ------------------------------------------------------------------------------------------------------ KV cache
def test_kv_cache_append_grow_and_select():
    cache = KVCache(3, 2, 4, torch.device("cpu"), torch.float32)
    k_all, v_all = torch.randn(3, 2, 150, 4), torch.randn(3, 2, 150, 4)
    for lo, hi in ((0, 10), (10, 11), (11, 80), (80, 150)):  # crosses the 64-slot start and a doubling
        k, v = cache.append(k_all[:, :, lo:hi], v_all[:, :, lo:hi])
        assert torch.equal(k, k_all[:, :, :hi]) and torch.equal(v, v_all[:, :, :hi])
    assert cache.length == 150 and cache.k.shape[2] >= 150
    cache.select(torch.tensor([2, 0]))
    k, _ = cache.append(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4))
    assert torch.equal(k[:, :, :150], k_all[[2, 0]])


def tiny_model(backend: str) -> Transformer:
    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, attn_backend=backend,
                         init_std=0.2)
    return Transformer(config).eval()


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@torch.no_grad()
def test_cached_chunks_equal_one_full_forward(backend):
    model = tiny_model(backend)
    x = torch.randint(0, 64, (2, 30))
    full = model(x).logits
    state = model.new_state(2)
    pieces = [model(x[:, lo:hi], state=state).logits for lo, hi in ((0, 7), (7, 8), (8, 20), (20, 30))]
    assert state.position == 30
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_with_documents_is_refused():
    model = tiny_model("sdpa")
    layer = model.layers[0].self_attn
    x = torch.randn(1, 4, 32)
    pos = torch.tensor([[0, 1, 0, 1]])
    cos, sin = model.rope(pos)
    ctx = AttentionContext(pos, cos, sin, model.rope, doc_ids=torch.tensor([[0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="packed documents .* cannot be combined with a KV cache"):
        layer(x, ctx, layer.new_cache(1, x.device, x.dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backends_match_eager(dtype):
    q, k, v = (t.cuda().to(dtype) for t in qkv(hkv=2))
    doc_ids = DOCS.cuda()
    ref = attend(q, k, v, backend="eager", doc_ids=doc_ids).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(attend(q, k, v, backend="sdpa", doc_ids=doc_ids).float(), ref, atol=tol, rtol=tol)
    if flash_attn_available() and dtype == torch.bfloat16:
        got = attend(q, k, v, backend="flash_attn", doc_ids=doc_ids).float()
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
