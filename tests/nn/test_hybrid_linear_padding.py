"""LoLCATs terrace decoding (``decode_window=terrace``) of left-padded batches: every row's terrace blocks follow its
own positions, so it folds its oldest block into (S, z) when IT crosses a block boundary.

Oracles, row by row: the same prompt decoded alone with batch size 1 (the unpadded lockstep path, another code path)
through prefill and greedy decoding, logits at every step and the greedy tokens; the start-aligned ``tk`` forward of
the whole decoded sequence (terrace decoding reproduces it); the window sizes the terrace rule gives each row.
"""

from __future__ import annotations

import pytest
import torch

from lit_longctx.nn import generate, session_for
from lit_longctx.nn.session import left_pad
from tests.nn.test_padding import ATOL, check_rows, lolcats, model_of, prompts

W = 4  # lolcats(): window_size 4
ROWS = (23, 9, 40, 1)  # mod w: 3, 1, 0, 1 -- the rows cross their block boundaries at different decoding steps
STEPS = 12  # three blocks' worth of greedy decoding


def greedy_trace(session, ids, mask, steps, on_step=None):
    """Prefill, then ``steps`` greedy steps: float32 logits (B, steps + 1, V) and the tokens (B, steps)."""
    logits = session.prefill(ids, attention_mask=mask)
    out, tokens = [logits], []
    for _ in range(steps):
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        logits = session.step(nxt[:, None])
        out.append(logits)
        if on_step is not None:
            on_step(session)
    return torch.stack(out, 1), torch.stack(tokens, 1)


def held_keys(session) -> torch.Tensor:
    """(B,) keys each row holds in the hybrid layer's window buffer."""
    cache = session.state.caches[0]
    return cache.mask.sum(1)


@pytest.mark.parametrize("prefill", ["forward", "decode_window"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_terrace_decoding_of_a_padded_batch_equals_each_row_alone(prefill, chunk):
    model = model_of(**lolcats(window="tk", decode_window="terrace", prefill=prefill))
    rows = prompts(lengths=ROWS)
    ids, mask = left_pad(rows, pad_id=0)
    ids = ids.masked_fill(~mask, 61)  # a token id the rows never use
    positions = torch.tensor(ROWS)  # each row's position of the last token fed
    sizes = []

    def record(session):
        positions.add_(1)
        sizes.append(held_keys(session).clone())

    with torch.no_grad():
        batched, tokens = greedy_trace(session_for(model, len(rows), prefill_chunk=chunk), ids, mask, STEPS, record)
        for i, row in enumerate(rows):
            alone, alone_tokens = greedy_trace(session_for(model, 1, prefill_chunk=chunk), torch.tensor([row]), None,
                                               STEPS)
            torch.testing.assert_close(batched[i], alone[0], rtol=0, atol=1e-5)
            assert tokens[i].tolist() == alone_tokens[0].tolist()
            # terrace decoding is the start-aligned tk forward of the whole sequence
            full = model(torch.tensor([row + tokens[i].tolist()])).logits[0, len(row) - 1 :]
            torch.testing.assert_close(batched[i], full, rtol=0, atol=ATOL)
    # each row holds its own window: the previous full block plus its current partial one, (p mod w) + w + 1 keys
    # once past the first block (p = the row's newest position), so the rows fold at different steps
    expected = [torch.tensor(ROWS) + s for s in range(STEPS)]
    for got, last in zip(sizes, expected):
        assert got.tolist() == [n % W + W + 1 if n >= W else n + 1 for n in last.tolist()]
    assert len({tuple(s.tolist()) for s in sizes}) > 1
    assert torch.stack(sizes).lt(2 * W + 1).all()

    sliding = model_of(**lolcats(window="tk", prefill=prefill))  # same weights, sliding decode
    with torch.no_grad():
        other, _ = greedy_trace(session_for(sliding, len(rows), prefill_chunk=chunk), ids, mask, STEPS)
    assert float((other - batched).abs().max()) > 1e-3  # the terrace window really is not the sliding one


def test_terrace_padded_batch_through_generate():
    """The public path: ``generate`` with a padded batch (and ``forward_logits`` over the padded prompts) equals the
    rows alone, prompt chunks included."""
    model = model_of(**lolcats(window="tk", decode_window="terrace"))
    check_rows(model, prompts(lengths=ROWS), steps=STEPS, prefill_chunk=5)
    rows = prompts(lengths=(6, 2))
    assert generate(model, rows, 9) == [generate(model, r, 9)[0] for r in rows]


def test_a_pad_after_a_rows_first_token_is_refused():
    model = model_of(**lolcats(window="tk", decode_window="terrace"))
    session = session_for(model, 2)
    with torch.no_grad():
        session.prefill(torch.tensor([[61, 5], [3, 4]]), attention_mask=torch.tensor([[0, 1], [1, 1]]))
        with pytest.raises(ValueError, match="a pad after a row's first token.*left-padded"):
            session.forward(torch.tensor([[7], [8]]), attention_mask=torch.tensor([[0], [1]]))
