"""One reader for HF-style directories (hf.read_hf_dir): hf.from_hf, `lit-longctx convert from-hf`, load_model (what
`lit-longctx generate` uses), read_checkpoint and FoT/CausalLM(init_from=...) all build the same model from a
LongLLaMA directory.

Oracle: the model built by hand from the directory's tensors with the memory layers LongLLaMA's config.json names
(ModelConfig written out here, weights copied tensor by tensor); logits compared through FoTSession's memory schedule
on an input longer than the local window (a model without its memory layers gives other logits, checked too)."""

from __future__ import annotations

import json

import pytest
import torch

from lit_longctx.checkpoint import load_model, read_checkpoint
from lit_longctx.cli import main
from lit_longctx.hf import from_hf, read_hf_dir, to_hf
from lit_longctx.modules import CausalLM, FoT
from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.nn.attention.fot import FoTSession
from lit_longctx.nn.config import ConfigError
from lit_longctx.tokenizers import load_tokenizer

TINY = dict(vocab_size=260, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
MEMORY = dict(last_context_length=16, mem_dtype="float32", mem_positionals=True, mem_attention_grouping=[2, 8],
              torch_attention=False)


def longllama_dir(tmp_path, mem_layers=(0, 2)):
    torch.manual_seed(0)
    source = Transformer(ModelConfig(**TINY))
    path = to_hf(source, tmp_path / "longllama", tokenizer=load_tokenizer("byte"))
    hf = json.loads((path / "config.json").read_text())
    hf.update(model_type="longllama", architectures=["LongLlamaForCausalLM"], mem_layers=list(mem_layers), **MEMORY)
    (path / "config.json").write_text(json.dumps(hf))
    return path, source


def session_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return FoTSession(model).forward_logits(ids)


def test_every_reader_builds_the_same_longllama_model(tmp_path):
    path, source = longllama_dir(tmp_path)
    expected_config = ModelConfig(**TINY, layer_attention={0: "fot", 2: "fot"}, attention_options={"fot": MEMORY})
    oracle = Transformer(expected_config)
    oracle.load_state_dict(source.state_dict())

    main(["convert", "from-hf", "--source", str(path), "--output", str(tmp_path / "converted.ckpt")])
    init_fot, init_causal = FoT(init_from=str(path)), CausalLM(init_from=str(path))
    init_fot.configure_model()
    init_causal.configure_model()
    models = {
        "from_hf": from_hf(path),
        "read_hf_dir": read_hf_dir(path).build(),
        "load_model(dir)": load_model(path)[0],
        "convert": load_model(tmp_path / "converted.ckpt")[0],
        "FoT(init_from)": init_fot.model,
        "CausalLM(init_from)": init_causal.model,
    }
    assert read_checkpoint(path, with_weights=False).model_config == expected_config
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(1))
    want = session_logits(oracle, ids)
    plain = Transformer(ModelConfig(**TINY))
    plain.load_state_dict(source.state_dict())
    assert (session_logits(plain, ids) - want).abs().max() > 1e-3  # the memory layers matter on this input
    for name, model in models.items():
        assert model.config.layer_attention == {0: "fot", 2: "fot"}, name
        options = model.config.attention_options["fot"]  # FoT(init_from) adds its training settings
        assert {k: options[k] for k in MEMORY} == MEMORY, name
        torch.testing.assert_close(session_logits(model, ids), want, rtol=0, atol=1e-5, msg=name)


def test_generate_command_reads_the_memory_layers(tmp_path, capsys):
    """`lit-longctx generate` on the directory continues the prompt as the hand-built FoT model does (greedy)."""
    path, source = longllama_dir(tmp_path)
    oracle = Transformer(ModelConfig(**TINY, layer_attention={0: "fot", 2: "fot"}, attention_options={"fot": MEMORY}))
    oracle.load_state_dict(source.state_dict())
    from lit_longctx.nn.generate import generate

    tok = load_tokenizer("byte")
    prompt = "the memory layers of LongLLaMA hold what left the local window. " * 2
    want = tok.decode(generate(oracle, tok.encode(prompt, bos=tok.bos_id is not None), 6)[0])
    texts = main(["generate", "--checkpoint", str(path), "--prompt", prompt, "--max_new_tokens", "6",
                  "--device", "cpu"])
    assert texts == [want]


def test_mem_layers_beyond_the_layer_count_is_a_clear_error(tmp_path, capsys):
    path, _ = longllama_dir(tmp_path, mem_layers=(1, 3))
    with pytest.raises(ConfigError, match=r"mem_layers=\[1, 3\] names layers \[3\].*num_hidden_layers=3"):
        from_hf(path)
    with pytest.raises(SystemExit) as exit_info:  # the command: one error line, status 2
        main(["convert", "from-hf", "--source", str(path), "--output", str(tmp_path / "x.ckpt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: config.json mem_layers=[1, 3]") and "num_hidden_layers=3" in err[0]


def test_an_export_with_method_tensors_reads_the_same_everywhere(tmp_path):
    """A lit-longctx export of a LoLCATs model (feature maps beside the weights): from_hf builds the hybrid model
    with its feature maps, as load_model and init_from do (formerly from_hf failed on the missing tensors)."""
    from lit_longctx.export import export_model

    torch.manual_seed(0)
    config = ModelConfig(**TINY, layer_attention={1: "hybrid_linear"},
                         attention_options={"hybrid_linear": {"feature_dim": 4, "window_size": 4,
                                                              "feature_map_init": "kaiming_uniform"}})
    model = Transformer(config)
    out = export_model(model, tmp_path / "hf", method="lolcats_transfer")
    init = CausalLM(init_from=str(out))
    init.configure_model()
    ids = torch.randint(0, 256, (1, 20))
    want = model(ids).logits
    for got in (from_hf(out), load_model(out)[0], init.model):
        assert got.config.layer_attention == {1: "hybrid_linear"}
        torch.testing.assert_close(got(ids).logits, want, rtol=0, atol=0)
