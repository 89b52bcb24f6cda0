"""SessionLM with batch_size > 1: every request scored in a left-padded batch equals the request scored alone (the
batch_size=1 path), for plain, FoT, landmark and LoLCATs (hybrid_linear) models on inputs longer than their windows."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is part of the dev extra")

from lit_longctx.checkpoint import save_checkpoint  # noqa: E402
from lit_longctx.eval.harness import SessionLM  # noqa: E402
from lit_longctx.eval.perplexity import per_token_scores, per_token_scores_batch  # noqa: E402
from lit_longctx.nn import session_for  # noqa: E402
from lit_longctx.nn.session import left_pad  # noqa: E402
from lit_longctx.tokenizers import ByteTokenizer  # noqa: E402
from tests.eval.test_harness import TEXT, fot_model, landmark_model, mc_task, request, tiny  # noqa: E402


def lolcats_model():
    opts = {"feature_dim": 8, "window_size": 4, "block_alignment": "end"}  # tk forward prompt, sliding decode
    return tiny(attention="hybrid_linear", max_seq_len=32, attention_options={"hybrid_linear": opts})


MODELS = {"causal": tiny, "fot": fot_model, "landmark": landmark_model, "lolcats": lolcats_model}
SESSIONS = {"causal": "DecodingSession", "fot": "FoTSession", "landmark": "LandmarkSession",
            "lolcats": "HybridLinearSession"}
# contexts of very different lengths (2 to ~150 bytes: past FoT's 16, landmark's blocks and LoLCATs' 32-token chunk);
# the two longest requests have equal length mod mem_freq, so a landmark session can put them on one grid (one batch)
PAIRS = [(TEXT[:n], cont) for n, cont in [(3, " x"), (69, " over"), (135, " and runs away."), (17, "ab"),
                                            (40, " dog."), (1, "Z")]]
GENS = [(TEXT[:n], {"until": ["."], "max_gen_toks": k}) for n, k in [(5, 6), (90, 6), (30, 6), (120, 4), (12, 4)]]


def batch_dims(model):
    """A spy: the batch dimension of every forward the model runs."""
    dims: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: dims.append(
        (args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)
    return dims, handle


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_requests_equal_requests_alone(name):
    model, tok = MODELS[name](), ByteTokenizer()
    alone, batched = SessionLM(model, tok), SessionLM(model, tok, batch_size=3)
    ll = [request("loglikelihood", c, x) for c, x in PAIRS]
    rolling = [request("loglikelihood_rolling", c + x) for c, x in PAIRS[:4]]
    gens = [request("generate_until", c, g) for c, g in GENS]
    expected = (alone.loglikelihood(ll), alone.loglikelihood_rolling(rolling), alone.generate_until(gens))
    got, dims = [], []
    for call, reqs in [(batched.loglikelihood, ll), (batched.loglikelihood_rolling, rolling),
                       (batched.generate_until, gens)]:
        seen, handle = batch_dims(model)
        try:
            got.append(call(reqs))
        finally:
            handle.remove()
        dims.append(max(seen))
    assert min(dims) > 1  # each kind ran batched forwards (landmark sessions split a batch into rows sharing a grid)
    for (lp, greedy), (lp1, greedy1) in zip(got[0], expected[0]):
        assert lp == pytest.approx(lp1, abs=1e-5) and greedy == greedy1
    assert got[1] == pytest.approx(expected[1], abs=1e-5)
    assert got[2] == expected[2]
    assert batched.session_types == alone.session_types == {SESSIONS[name]}


def test_per_token_scores_batch_rows_equal_per_token_scores():
    model, tok = fot_model(), ByteTokenizer()
    rows = [[tok.bos_id] + tok.encode(TEXT[:n]) for n in (60, 3, 41)]
    ids, mask = left_pad(rows, 0)
    nll, greedy = per_token_scores_batch(session_for(model, batch_size=3), ids, mask)
    for b, row in enumerate(rows):
        one_nll, one_greedy = per_token_scores(session_for(model), torch.tensor([row]))
        k = len(row) - 1
        torch.testing.assert_close(nll[b, -k:], one_nll, atol=1e-5, rtol=0)
        assert torch.equal(greedy[b, -k:], one_greedy)
        assert not nll[b, : ids.shape[1] - 1 - k].any()  # pads predict nothing


def test_a_session_refusing_padded_batches_falls_back_to_one_at_a_time():
    model, tok = landmark_model(), ByteTokenizer()
    kwargs = {"record_retrieval": True}  # a landmark session then refuses a padded batch (ValueError)
    expected = SessionLM(model, tok, session_kwargs=kwargs).loglikelihood([request("loglikelihood", c, x)
                                                                           for c, x in PAIRS])
    got = SessionLM(model, tok, session_kwargs=kwargs, batch_size=4).loglikelihood(
        [request("loglikelihood", c, x) for c, x in PAIRS])
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-5)
    assert [g[1] for g in got] == [e[1] for e in expected]


def test_bad_batch_size_is_refused():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        SessionLM(tiny(), ByteTokenizer(), batch_size=0)
    from lit_longctx.callbacks.harness_eval import HarnessEvalCallback

    with pytest.raises(ValueError, match="HarnessEvalCallback batch_size must be >= 1 requests, got 0"):
        HarnessEvalCallback(tasks="arc_easy", batch_size=0)


def test_evaluate_batch_size_gives_the_batch_size_1_table(tmp_path, capsys):
    from lit_longctx.cli import main

    tasks_dir = mc_task(tmp_path, n=12)
    ckpt = save_checkpoint(tmp_path / "model.ckpt", tiny(), tokenizer=ByteTokenizer())
    tables = []
    for b in (1, 4):
        out = tmp_path / f"out{b}"
        main(["evaluate", "--checkpoint", str(ckpt), "--tasks", "tiny_mc", "--include_path", str(tasks_dir),
              "--output_path", str(out), "--batch_size", str(b)])
        results = json.loads((out / "results.json").read_text())["results"]["tiny_mc"]
        tables.append(((out / "results.md").read_text(), results["acc,none"], results["acc_stderr,none"]))
    capsys.readouterr()
    assert tables[0] == tables[1]


def test_bad_batch_size_on_the_command_line_is_one_line(tmp_path, capsys):
    from tests.cli_helpers import in_process_error

    ckpt = save_checkpoint(tmp_path / "model.ckpt", tiny(), tokenizer=ByteTokenizer())
    err = in_process_error(capsys, "evaluate", "--checkpoint", str(ckpt), "--tasks", "tiny_mc", "--include_path",
                           str(mc_task(tmp_path)), "--batch_size", "0")
    assert err == "error: --batch_size must be >= 1 requests, got 0"
