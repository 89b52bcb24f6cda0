"""Meta's original format: a tiny model written in Meta's layout (2 model-parallel shards, interleaved RoPE rows),
converted, equals transformers' LlamaForCausalLM on the same weights; bad directories give one clear line.

The fixture starts from an HF model and goes to Meta's layout by the *inverse* permutation, written here
independently of lit_longctx.meta; a reference forward pass in Meta's own formulation (complex-number RoPE on
adjacent pairs) checks that the fixture really is a Meta checkpoint of the same function.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lit_longctx.cli import main
from lit_longctx.meta import permute_to_hf
from tests.cli_helpers import one_line_error

# (hidden, heads, kv heads, multiple_of, ffn_dim_multiplier, rope_theta, vocab in params.json)
CASES = {
    "gqa-ffn-multiplier": (64, 4, 2, 32, 1.3, 1e6, -1),  # FFN: int(1.3·170) = 221 -> 224; vocab from the tokenizer
    "mha": (64, 4, 4, 16, None, 1e4, 512),  # FFN: 170 -> 176
}
FFN = {"gqa-ffn-multiplier": 224, "mha": 176}
VOCAB = 512


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    from lit_longctx.tokenizers import train_sentencepiece
    from tests.cli_helpers import write_corpus

    d = tmp_path_factory.mktemp("sp")
    corpus = write_corpus(d / "docs.jsonl")
    text = d / "docs.txt"
    text.write_text("\n".join(json.loads(line)["text"] for line in corpus.read_text().splitlines()))
    train_sentencepiece([text], d / "sp", VOCAB)
    return d / "sp.model"


def to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split rows -> Meta interleaved rows: Meta row 2r is HF row r, Meta row 2r+1 is HF row r + Q/2."""
    rows, d_in = w.shape
    q = rows // n_heads
    heads = w.view(n_heads, q, d_in)
    out = torch.empty_like(heads)
    out[:, 0::2] = heads[:, : q // 2]
    out[:, 1::2] = heads[:, q // 2 :]
    return out.reshape(rows, d_in)


def write_meta_dir(hf_model, d: Path, params: dict, tokenizer: Path | None, shards: int = 2) -> None:
    """Meta names, rows permuted back, each weight split into ``shards`` model-parallel pieces."""
    cfg = hf_model.config
    state = hf_model.state_dict()
    meta = {"tok_embeddings.weight": (state["model.embed_tokens.weight"], 1), "norm.weight":
            (state["model.norm.weight"], None), "output.weight": (state["lm_head.weight"], 0)}
    names = {"self_attn.q_proj": ("attention.wq", 0), "self_attn.k_proj": ("attention.wk", 0),
             "self_attn.v_proj": ("attention.wv", 0), "self_attn.o_proj": ("attention.wo", 1),
             "mlp.gate_proj": ("feed_forward.w1", 0), "mlp.down_proj": ("feed_forward.w2", 1),
             "mlp.up_proj": ("feed_forward.w3", 0), "input_layernorm": ("attention_norm", None),
             "post_attention_layernorm": ("ffn_norm", None)}
    for i in range(cfg.num_hidden_layers):
        for hf_name, (meta_name, split) in names.items():
            w = state[f"model.layers.{i}.{hf_name}.weight"]
            if hf_name == "self_attn.q_proj":
                w = to_meta_rows(w, cfg.num_attention_heads)
            elif hf_name == "self_attn.k_proj":
                w = to_meta_rows(w, cfg.num_key_value_heads)
            meta[f"layers.{i}.{meta_name}.weight"] = (w, split)
    d.mkdir(parents=True)
    for s in range(shards):
        part = {k: (w.chunk(shards, dim=split)[s] if split is not None else w).clone()
                for k, (w, split) in meta.items()}
        part["rope.freqs"] = torch.zeros(4)  # LLaMA-1 shards carry this; it must be ignored
        torch.save(part, d / f"consolidated.{s:02d}.pth")
    (d / "params.json").write_text(json.dumps(params))
    if tokenizer is not None:
        (d / "tokenizer.model").write_bytes(tokenizer.read_bytes())


def meta_reference_logits(d: Path, ids: torch.Tensor) -> torch.Tensor:
    """Meta's llama/model.py forward on the shards (concatenated by hand): complex RoPE on adjacent pairs."""
    params = json.loads((d / "params.json").read_text())
    shards = [torch.load(f, weights_only=True) for f in sorted(d.glob("consolidated.*.pth"))]
    dims = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    w = {}
    for k in shards[0]:
        part = k.split(".")[-2]
        w[k] = torch.cat([s[k] for s in shards], dim=dims[part]) if part in dims else shards[0][k]
    dim, h = params["dim"], params["n_heads"]
    hkv, q = params.get("n_kv_heads") or h, params["dim"] // params["n_heads"]
    theta, eps = params.get("rope_theta", 10000.0), params["norm_eps"]
    t = ids.shape[1]
    freqs = 1.0 / theta ** (torch.arange(0, q, 2, dtype=torch.float64)[: q // 2] / q)
    cis = torch.polar(torch.ones(t, q // 2, dtype=torch.float64), torch.outer(torch.arange(t), freqs)).to(
        torch.complex64)

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def rope(x):  # (B, T, n, Q): pairs (2j, 2j+1) as complex numbers
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * cis[None, :, None]).flatten(3)

    x = F.embedding(ids, w["tok_embeddings.weight"])
    mask = torch.full((t, t), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        a = rms(x, w[p + "attention_norm.weight"])
        xq = rope((a @ w[p + "attention.wq.weight"].T).view(*ids.shape, h, q))
        xk = rope((a @ w[p + "attention.wk.weight"].T).view(*ids.shape, hkv, q))
        xv = (a @ w[p + "attention.wv.weight"].T).view(*ids.shape, hkv, q)
        xk, xv = (z.repeat_interleave(h // hkv, dim=2) for z in (xk, xv))
        scores = torch.einsum("bthq,bshq->bhts", xq, xk) / q**0.5 + mask
        out = torch.einsum("bhts,bshq->bthq", scores.softmax(-1), xv).reshape(*ids.shape, dim)
        x = x + out @ w[p + "attention.wo.weight"].T
        m = rms(x, w[p + "ffn_norm.weight"])
        x = x + (F.silu(m @ w[p + "feed_forward.w1.weight"].T) * (m @ w[p + "feed_forward.w3.weight"].T)) @ w[
            p + "feed_forward.w2.weight"].T
    return rms(x, w["norm.weight"]) @ w["output.weight"].T


def test_permutation_rows_follow_the_spec():
    # spec §7.9: for Q=8 the HF rows of a head are Meta rows [0, 2, 4, 6, 1, 3, 5, 7]
    meta_rows = torch.arange(16, dtype=torch.float32).view(16, 1)  # 2 heads of 8 rows, value = Meta row index
    assert permute_to_hf(meta_rows, 2).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    w = torch.randn(32, 5)
    assert torch.equal(permute_to_hf(to_meta_rows(w, 4), 4), w)


@pytest.mark.parametrize("case", list(CASES))
def test_meta_shards_convert_to_the_model_transformers_loads(case, tmp_path, sp_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_longctx.checkpoint import load_model
    from lit_longctx.modules import CausalLM

    hidden, heads, kv, multiple_of, mult, theta, vocab = CASES[case]
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=FFN[case],
                                       num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
                                       max_position_embeddings=64, rope_theta=theta, rms_norm_eps=1e-5,
                                       tie_word_embeddings=False, attn_implementation="eager")).eval()
    params = {"dim": hidden, "n_layers": 2, "n_heads": heads, "n_kv_heads": kv, "multiple_of": multiple_of,
              "norm_eps": 1e-5, "rope_theta": theta, "vocab_size": vocab}
    if mult is not None:
        params["ffn_dim_multiplier"] = mult
    write_meta_dir(ref, tmp_path / "meta", params, sp_model)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        assert (meta_reference_logits(tmp_path / "meta", ids) - expected).abs().max() < 1e-4  # the fixture is Meta's

    main(["convert", "from-meta", "--source", str(tmp_path / "meta"), "--output", str(tmp_path / "m.ckpt"),
          "--max_seq_len", "64"])
    main(["convert", "to-hf", "--checkpoint", str(tmp_path / "m.ckpt"), "--output", str(tmp_path / "hf")])
    back = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ours, tokenizer, _ = load_model(tmp_path / "m.ckpt")
    with torch.no_grad():
        assert (back(ids).logits - expected).abs().max() < 1e-4
        assert (ours(ids, return_logits=True).logits - expected).abs().max() < 1e-4
    assert tokenizer is not None and tokenizer.vocab_size == VOCAB  # tokenizer.model carried
    assert ours.config.ffn_dim == FFN[case] and ours.config.n_kv_heads == kv and ours.config.rope.rope_theta == theta

    module = CausalLM(init_from=str(tmp_path / "meta"))  # init_from a Meta directory directly
    module.configure_model()
    for k, v in ours.state_dict().items():
        assert torch.equal(module.model.state_dict()[k], v), k


def test_bad_meta_directories_are_one_clear_line(tmp_path, sp_model):
    from transformers import LlamaConfig, LlamaForCausalLM

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "consolidated.00.pth").write_bytes(b"")
    line = one_line_error("convert", "from-meta", "--source", str(tmp_path / "empty"), "--output",
                          str(tmp_path / "x.ckpt"))
    assert "no params.json" in line and "consolidated.00.pth" in line

    ref = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=4))
    params = {"dim": 64, "n_layers": 1, "n_heads": 4, "multiple_of": 16, "norm_eps": 1e-5, "vocab_size": VOCAB}
    write_meta_dir(ref, tmp_path / "bad", params, None)
    shard = torch.load(tmp_path / "bad" / "consolidated.01.pth", weights_only=True)
    shard["layers.0.attention.wq.weight"] = shard["layers.0.attention.wq.weight"][:-4]
    torch.save(shard, tmp_path / "bad" / "consolidated.01.pth")
    line = one_line_error("convert", "from-meta", "--source", str(tmp_path / "bad"), "--output",
                          str(tmp_path / "y.ckpt"))
    assert "inconsistent shard shapes for layers.0.attention.wq.weight" in line
    assert "consolidated.00.pth: (32, 64)" in line and "consolidated.01.pth: (28, 64)" in line
    assert not (tmp_path / "x.ckpt").exists() and not (tmp_path / "y.ckpt").exists()
