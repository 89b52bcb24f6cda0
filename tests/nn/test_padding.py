"""Padded batches (attention_mask, HF convention 1 = token, 0 = pad, left padding) give every row what it gives alone.

Oracle: each prompt run alone (batch of one, no mask) through the same session: per row, the logits of every real
token and the greedy continuation must agree — for the plain KV cache, FoT's memory schedule, landmark retrieval and
LoLCATs' hybrid state. Pads are filled with an id that is not the pad of any row alone, so attending to them would show.
"""

from __future__ import annotations

import pytest
import torch

from lit_longctx.nn import ModelConfig, Transformer, generate, session_for
from lit_longctx.nn.session import left_pad

BASE = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
LENGTHS = (23, 9, 40, 1)
ATOL = 2e-5


def model_of(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**BASE, **overrides}))
    with torch.no_grad():  # larger weights than the init: differences from attending to a pad are not tiny
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model.eval()


def prompts(vocab: int = 60, lengths=LENGTHS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def alone_and_batched(model, rows, **session_kwargs):
    """Per-row logits of every real token: (alone, batched) lists of (n, V) tensors."""
    alone = []
    with torch.no_grad():
        for row in rows:
            s = session_for(model, 1, **session_kwargs)
            alone.append(s.forward_logits(torch.tensor([row]))[0])
        ids, mask = left_pad(rows, pad_id=0)
        ids = ids.masked_fill(~mask, 61)  # a token id the rows never use
        s = session_for(model, len(rows), **session_kwargs)
        out = s.forward_logits(ids, attention_mask=mask.long())
    batched = [out[i][mask[i]] for i in range(len(rows))]
    return alone, batched


def check_rows(model, rows, steps=6, **session_kwargs):
    alone, batched = alone_and_batched(model, rows, **session_kwargs)
    for a, b in zip(alone, batched):
        torch.testing.assert_close(b, a, rtol=0, atol=ATOL)
    want = [generate(model, row, steps, **session_kwargs)[0] for row in rows]
    assert generate(model, rows, steps, **session_kwargs) == want
    return alone


def test_causal_padded_batch_equals_rows_alone():
    model = model_of()
    check_rows(model, prompts())
    check_rows(model, prompts(), prefill_chunk=7)  # pads spanning several prefill chunks
    ids, mask = left_pad(prompts(), pad_id=0)
    full = model(ids.masked_fill(~mask, 61), attention_mask=mask).logits  # no cache, one forward
    for i, row in enumerate(prompts()):
        torch.testing.assert_close(full[i][mask[i]], model(torch.tensor([row])).logits[0], rtol=0, atol=ATOL)


def test_padding_matters():
    """Without the mask the pads change the rows' logits (the oracle can fail)."""
    model = model_of()
    rows = prompts()
    ids, mask = left_pad(rows, pad_id=0)
    plain = model(ids.masked_fill(~mask, 61)).logits
    alone = model(torch.tensor([rows[1]])).logits[0]
    assert (plain[1][mask[1]] - alone).abs().max() > 1e-2


def test_attention_mask_of_the_wrong_shape_or_values():
    model = model_of()
    ids = torch.randint(0, 60, (2, 5))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\) but the input_ids.*shape \(2, 5\)"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="1 \\(token\\) and 0 \\(pad\\) only"):
        model(ids, attention_mask=torch.full((2, 5), 2))
    session = session_for(model, 2)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 5\)"):
        session.prefill(ids, attention_mask=torch.ones(1, 5, dtype=torch.long))


FOT = dict(layer_attention={1: "fot"}, max_seq_len=16,
           attention_options={"fot": {"last_context_length": 8, "mem_dtype": "float32"}})


@pytest.mark.parametrize("grouping", [None, [2, 3]])
def test_fot_memory_session_padded_batch_equals_rows_alone(grouping):
    """Rows longer than the window (memory used), shorter than Lc, and generation past the window (evictions at
    different steps per row)."""
    opts = {**FOT["attention_options"]["fot"], "mem_attention_grouping": grouping}
    model = model_of(**{**FOT, "attention_options": {"fot": opts}})
    check_rows(model, prompts(lengths=(37, 5, 20, 1)), steps=12)


def test_fot_memory_holds_pads_masked_with_the_float32_minimum():
    model = model_of(**FOT)
    rows = prompts(lengths=(30, 3))
    ids, mask = left_pad(rows, pad_id=0)
    session = session_for(model, 2)
    with torch.no_grad():
        session.prefill(ids, attention_mask=mask)
    _, _, masks = session.state.caches[1].memory()
    minimum = torch.finfo(torch.float32).min
    assert masks[1].eq(minimum).all()  # row 1 (3 tokens) has nothing in memory: every slot of its memory is a pad
    assert int(masks[0].eq(0).sum()) == 30 - 8 and bool(masks[0].eq(minimum).any()) is False


def landmark(**options) -> dict:
    return dict(attention="landmark", attention_options={"landmark": {"landmark_id": 63, "mem_freq": 3, "top_k": 2,
                                                                       **options}})


@pytest.mark.parametrize(("chunk", "selection"), [(6, "per_token_and_head"), (5, "max_over_heads")])
def test_landmark_session_padded_batch_equals_rows_alone(chunk, selection):
    """Landmarks inserted on each row's own grid, pad blocks never retrieved (rows with fewer blocks than top_k, and
    more), chunked prefill whose chunks are (6) or are not (5) multiples of mem_freq."""
    model = model_of(**landmark(selection=selection))
    rows = prompts(lengths=(23, 8, 17, 2, 11))
    check_rows(model, rows, steps=7, prefill_chunk=chunk)


@pytest.mark.parametrize(("size", "chunk"), [(1, 6), (3, 6), (2, 5)])
def test_landmark_bounded_memory_of_a_padded_batch_is_each_rows_own(size, chunk):
    """mem_cache_size (a FIFO of blocks): every row keeps its own newest ``size`` token blocks, as alone, although
    the rows' pad blocks (leading chunks and pads between chunks) sit in one stream with their tokens."""
    model = model_of(**landmark(mem_cache_size=size))
    rows = prompts(lengths=(23, 8, 17, 2, 11))  # one grid (n mod 3 equal): pads between the chunks of short rows
    check_rows(model, rows, steps=9, prefill_chunk=chunk)
    ids, mask = left_pad(rows, pad_id=0)
    session = session_for(model, len(rows), prefill_chunk=chunk)
    with torch.no_grad():
        session.prefill(ids, attention_mask=mask)
        for _ in range(3 * 6):  # 6 blocks of tokens for every row: no row keeps an older block
            session.step(torch.ones(len(rows), 1, dtype=torch.long))
    caches = [c for _, child in session._groups for c in child.state.caches]
    assert caches and all(c.n_blocks == size for c in caches)  # the memory stays bounded (blocks no row keeps go)
    with pytest.raises(ValueError, match="record_retrieval.*one prompt at a time"):
        session_for(model, len(rows), record_retrieval=True).prefill(ids, attention_mask=mask)


def lolcats(**options) -> dict:
    return dict(layer_attention={0: "hybrid_linear"}, attention_options={"hybrid_linear": {
        "feature_dim": 4, "window_size": 4, "feature_map_init": "kaiming_uniform", **options}})


@pytest.mark.parametrize("options", [{"window": "sw"}, {"window": "tk", "prefill": "decode_window"},
                                     {"window": "none"},
                                     {"window": "sw", "path": "quadratic", "affine_attention_factors": True}])
def test_lolcats_hybrid_state_padded_batch_equals_rows_alone(options):
    """Pads are kept out of the window and of the linear state (S, z), through chunked prefill and decoding."""
    model = model_of(**lolcats(**options))
    check_rows(model, prompts(), steps=6, prefill_chunk=7)


@pytest.mark.parametrize("alignment", ["start", "end"])
def test_lolcats_forward_prefill_of_a_padded_batch_is_each_rows_own(alignment):
    """prefill=forward (the default): each row's prompt runs the terrace forward over its own tokens (blocks aligned
    to them), then the sliding decode window; the prompt in one chunk (the default, max_seq_len) equals each row
    alone. A padded prompt split over chunks equals each row alone with the same chunks (the session tells the
    layer each row's first-chunk length; 13 leaves a last chunk of one column, fed without a mask)."""
    model = model_of(**lolcats(window="tk", block_alignment=alignment))
    alone = check_rows(model, prompts(), steps=6)
    sliding = model_of(**lolcats(window="tk", block_alignment=alignment, prefill="decode_window"))
    with torch.no_grad():  # the prompt really is the terrace forward, not the sliding window
        diff = (session_for(sliding, 1).forward_logits(torch.tensor([prompts()[0]]))[0] - alone[0]).abs().max()
    assert float(diff) > 1e-3
    for chunk in (7, 13):
        check_rows(model, prompts(), steps=6, prefill_chunk=chunk)


@pytest.mark.parametrize("window", ["tk", "sw"])
def test_lolcats_full_forward_of_a_padded_batch(window):
    """Without a cache, each row's terrace blocks start at its first token (start alignment) or end at its last."""
    for alignment in ("start", "end"):
        model = model_of(**lolcats(window=window, block_alignment=alignment))
        rows = prompts()
        ids, mask = left_pad(rows, pad_id=0)
        full = model(ids.masked_fill(~mask, 61), attention_mask=mask).logits
        for i, row in enumerate(rows):
            torch.testing.assert_close(full[i][mask[i]], model(torch.tensor([row])).logits[0], rtol=0, atol=ATOL)


def test_lolcats_padding_errors():
    model = model_of(**lolcats(window="tk"))
    ids, mask = left_pad(prompts(), pad_id=0)
    state = model.new_state(len(LENGTHS))  # a cache fed by hand: the layer does not know the rows' prompt lengths
    model(ids[:, :7], state=state, attention_mask=mask[:, :7])
    with pytest.raises(ValueError, match=r"split over several calls through session_for\(model, batch_size\)"):
        model(ids[:, 7:], state=state, attention_mask=mask[:, 7:])
    with pytest.raises(ValueError, match="needs left padding"):
        model(ids, attention_mask=mask.flip(1))


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [{"attn_backend": "sdpa"}, {"attn_backend": "flash_attn"}, FOT, landmark(),
                                       landmark(mem_cache_size=2), lolcats(window="sw"), lolcats(window="tk"),
                                       lolcats(window="tk", decode_window="terrace")])
def test_padded_batch_on_cuda(overrides):
    """The masked kernels on CUDA (fp32): padded rows equal rows alone; flash_attn falls back to sdpa with pads."""
    model = model_of(**overrides).cuda()
    rows = prompts(lengths=(37, 5, 20, 1))
    ids, mask = left_pad(rows, pad_id=0, device="cuda")
    with torch.no_grad():
        batched = session_for(model, len(rows)).forward_logits(ids.masked_fill(~mask, 61), attention_mask=mask)
        for i, row in enumerate(rows):
            alone = session_for(model, 1).forward_logits(torch.tensor([row], device="cuda"))[0]
            finite = torch.isfinite(alone)
            torch.testing.assert_close(batched[i][mask[i]][finite], alone[finite], rtol=0, atol=1e-4)
    want = [generate(model, row, 6)[0] for row in rows]
    assert generate(model, rows, 6) == want
