"""The lm-evaluation-harness wrapper against direct computations, through plain, FoT and landmark sessions, and
`lit-longctx evaluate` on local tasks with models whose answers are fixed by construction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-eval is part of the dev extra")

from lm_eval.api.instance import Instance  # noqa: E402

from lit_longctx.checkpoint import save_checkpoint  # noqa: E402
from lit_longctx.eval.harness import SessionLM, cut_at_stop  # noqa: E402
from lit_longctx.eval.perplexity import per_token_nll  # noqa: E402
from lit_longctx.nn import ModelConfig, Transformer, generate, session_for  # noqa: E402
from lit_longctx.tokenizers import ByteTokenizer  # noqa: E402
from tests.cli_helpers import in_process_error, one_line_error, run_subprocess  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. " * 3


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    base = dict(vocab_size=260, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    base.update(overrides)
    model = Transformer(ModelConfig(**base))
    model.init_weights()
    return model.eval()


def fot_model() -> Transformer:
    return tiny(n_layers=3, max_seq_len=16, layer_attention={1: "fot"},
                attention_options={"fot": {"mem_dtype": "float32", "last_context_length": 6}})


def landmark_model() -> Transformer:
    return tiny(attention="landmark", max_seq_len=32,
                attention_options={"landmark": {"landmark_id": 259, "mem_freq": 4, "top_k": 2}})


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@torch.no_grad()
def hand_logprob(model, ids, n_cont):
    """Sum of log p(token t | tokens < t) over the last n_cont tokens, from one full forward (no session)."""
    logits = model(torch.tensor([ids])).logits[0].float()
    logp = F.log_softmax(logits, dim=-1)
    total = sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n_cont, len(ids)))
    greedy = all(int(logits[t - 1].argmax()) == ids[t] for t in range(len(ids) - n_cont, len(ids)))
    return total, greedy


@torch.no_grad()
def chunked_logprob(model, ids, n_cont):
    """The same from a fresh session of the model fed ``prefill_chunk`` tokens per ``forward_logits`` call (how a
    method scores a long input: FoT's memory, landmark retrieval), summed here by hand."""
    session = session_for(model, batch_size=1)
    chunk = session.prefill_chunk
    logits = torch.cat([session.forward_logits(torch.tensor([ids[s : s + chunk]]))[0]
                        for s in range(0, len(ids), chunk)])
    logp = F.log_softmax(logits.float(), dim=-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n_cont, len(ids)))


def test_loglikelihood_equals_hand_summed_logprobs():
    model, tok = tiny(), ByteTokenizer()
    lm = SessionLM(model, tok)
    pairs = [("The quick brown", " fox"), ("Hello", " world!"), ("a", "bcdef")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ids = [tok.bos_id] + tok.encode(context + continuation)
        expected, expected_greedy = hand_logprob(model, ids, len(tok.encode(continuation)))
        assert logprob == pytest.approx(expected, abs=1e-5)
        assert greedy == expected_greedy
    assert lm.session_types == {"DecodingSession"}


def test_trailing_space_of_context_moves_to_continuation():
    lm = SessionLM(tiny(), ByteTokenizer())
    ctx, cont = lm.encode_pair("Answer: ", "yes")
    assert ctx[1:] == list(b"Answer:") and cont == list(b" yes")


def test_loglikelihood_rolling_equals_perplexity_evaluator():
    model, tok = tiny(), ByteTokenizer()
    lm = SessionLM(model, tok)
    (got,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", TEXT)])
    ids = torch.tensor([[tok.bos_id] + tok.encode(TEXT)])
    nll = per_token_nll(session_for(model, prefill_chunk=17), ids)  # other chunking than the harness's
    assert len(tok.encode(TEXT)) == nll.shape[0]  # with BOS every text token is scored
    assert got == pytest.approx(-float(nll.double().sum()), abs=1e-3)


def test_generate_until_equals_generate_cut_at_stop_strings():
    model, tok = tiny(), ByteTokenizer()
    lm = SessionLM(model, tok)
    context, until = "The quick", ["o", "\n"]
    (got,) = lm.generate_until([request("generate_until", context, {"until": until, "max_gen_toks": 12})])
    new = generate(model, [tok.bos_id] + tok.encode(context), 12, stop_tokens=[tok.eos_id])[0]
    text = tok.decode(new)
    cuts = [text.index(s) for s in until if s in text]
    assert got == text[: min(cuts)] if cuts else got == text
    assert cut_at_stop("abcXdefY", ["Y", "X"]) == "abc" and cut_at_stop("abc", []) == "abc"


@pytest.mark.parametrize("build", [fot_model, landmark_model], ids=["fot", "landmark"])
def test_methods_are_scored_through_their_sessions_beyond_their_window(build):
    model, tok = build(), ByteTokenizer()
    lm = SessionLM(model, tok)
    context, continuation = TEXT, " and runs away."  # ~150 tokens: several windows of 16/32
    ctx_ids, cont_ids = lm.encode_pair(context, continuation)
    assert len(ctx_ids) + len(cont_ids) > 4 * model.config.max_seq_len
    ((logprob, _),) = lm.loglikelihood([request("loglikelihood", context, continuation)])
    expected = chunked_logprob(model, ctx_ids + cont_ids, len(cont_ids))
    assert logprob == pytest.approx(expected, abs=1e-3)
    session_name = {fot_model: "FoTSession", landmark_model: "LandmarkSession"}[build]
    assert lm.session_types == {session_name}
    (text,) = lm.generate_until([request("generate_until", context, {"until": ["\n"], "max_gen_toks": 6})])
    new = generate(model, [tok.bos_id] + tok.encode(context), 6, stop_tokens=[tok.eos_id])[0]
    assert text == cut_at_stop(tok.decode(new), ["\n"])


# ------------------------------------------------------------------------------------------ the CLI on local tasks
def mc_task(tmp_path, n=8):
    """A 4-way multiple-choice task over a local jsonl; the gold answer is the all-'A' choice, at every position
    equally often (so a model that cannot tell the choices apart, and picks the first on ties, scores exactly 1/4)."""
    docs = []
    for i in range(n):
        choices = ["BBBB", "CCCC", "DDDD"]
        gold = i % 4
        choices.insert(gold, "AAAA")
        docs.append({"question": f"Question {i}: pick one.", "choices": choices, "gold": gold})
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} Answer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
""")
    return tmp_path / "tasks"


def constant_model(prefer: int | None) -> Transformer:
    """Every position predicts byte ``prefer`` with probability ~1 (None: a uniform distribution), whatever the input.

    Attention and MLP outputs are zero, so the last hidden state is the normalised input embedding; all embeddings
    are one vector, and the output row of ``prefer`` is that vector scaled up.
    """
    model = tiny()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight.copy_(torch.ones_like(model.model.embed_tokens.weight))
        model.lm_head.weight.zero_()
        if prefer is not None:
            model.lm_head.weight[prefer] = 20.0
    return model


def check_scored(out, expected, stdout):
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(expected)
    assert results["lit_longctx"]["sessions"] == ["DecodingSession"]
    row = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("|tiny_mc"))
    assert float(row.split("|")[7]) == pytest.approx(expected) and row in stdout


@pytest.mark.slow
def test_evaluate_cli_scores_a_forced_model_100_percent(tmp_path):
    tasks_dir = mc_task(tmp_path)
    ckpt = save_checkpoint(tmp_path / "model.ckpt", constant_model(ord("A")), tokenizer=ByteTokenizer())
    out = tmp_path / "out"
    proc = run_subprocess(["evaluate", "--checkpoint", str(ckpt), "--tasks", "tiny_mc", "--include_path",
                           str(tasks_dir), "--output_path", str(out)], cwd=tmp_path)
    check_scored(out, 1.0, proc.stdout)


def test_evaluate_scores_a_uniform_model_at_chance(tmp_path, capsys):
    from lit_longctx.eval.evaluate import evaluate

    tasks_dir = mc_task(tmp_path)
    ckpt = save_checkpoint(tmp_path / "model.ckpt", constant_model(None), tokenizer=ByteTokenizer())
    evaluate(str(ckpt), "tiny_mc", include_path=str(tasks_dir), output_path=str(tmp_path / "out"))
    check_scored(tmp_path / "out", 0.25, capsys.readouterr().out)


def test_constant_model_is_what_it_claims():
    model = constant_model(ord("A"))
    probs = torch.softmax(model(torch.tensor([[1, 2, 3, 200]])).logits[0].float(), -1)
    assert probs[:, ord("A")].min() > 0.99
    uniform = torch.softmax(constant_model(None)(torch.tensor([[1, 2, 3]])).logits[0].float(), -1)
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / 260))


@pytest.mark.slow
def test_unknown_task_is_one_clear_line(tmp_path):
    ckpt = save_checkpoint(tmp_path / "model.ckpt", tiny(), tokenizer=ByteTokenizer())
    err = one_line_error("evaluate", "--checkpoint", str(ckpt), "--tasks", "tiny_mcq", "--include_path",
                         str(mc_task(tmp_path)), "--output_path", str(tmp_path / "out"))
    assert "unknown evaluation task 'tiny_mcq'" in err and "did you mean tiny_mc" in err
    assert not (tmp_path / "out").exists()


def test_missing_harness_says_how_to_install(tmp_path, monkeypatch, capsys):
    import sys

    ckpt = save_checkpoint(tmp_path / "model.ckpt", tiny(), tokenizer=ByteTokenizer())
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError, as if not installed
    err = in_process_error(capsys, "evaluate", "--checkpoint", str(ckpt), "--tasks", "arc_easy")
    assert err == 'error: `lit-longctx evaluate` needs the lm-evaluation-harness: pip install -e ".[eval]"'


@pytest.mark.slow
def test_end_of_fit_harness_evaluation_scores_the_trained_model(tmp_path, corpus):
    from lit_longctx.checkpoint import load_model
    from tests.cli_helpers import TINY_CONFIG, run

    tasks_dir = mc_task(tmp_path, n=4)
    callback = (f"    - class_path: lit_longctx.callbacks.harness_eval.HarnessEvalCallback\n"
                f"      init_args: {{tasks: tiny_mc, include_path: {tasks_dir}, batch_size: 3}}\n")
    config = tmp_path / "fit.yaml"
    config.write_text(TINY_CONFIG.format(root=tmp_path, corpus=corpus).replace("  callbacks:\n", "  callbacks:\n" +
                                                                                 callback))
    cli = run("fit", "--config", str(config))
    (cb,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "HarnessEvalCallback"]
    got = cb.results["results"]["tiny_mc"]["acc,none"]
    # the oracle: the final weights scored by hand, choice by choice (sum of log-probs, argmax, ties to the first)
    model, tok, _ = load_model(tmp_path / "checkpoints" / "last.ckpt")
    model.eval()
    hits = []
    for line in (tmp_path / "mc.jsonl").read_text().splitlines():
        doc = json.loads(line)
        context = doc["question"] + " Answer:"
        scores = [hand_logprob(model, [tok.bos_id] + tok.encode(context + " " + c), len(tok.encode(" " + c)))[0]
                  for c in doc["choices"]]
        hits.append(max(range(4), key=lambda i: (scores[i], -i)) == doc["gold"])
    assert got == pytest.approx(sum(hits) / len(hits))
    assert json.loads((Path(cli.trainer.log_dir) / "harness" / "results.json").read_text())["results"]["tiny_mc"]
