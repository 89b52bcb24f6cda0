"""`lit-longctx generate --prompts @FILE`: one prompt per line, generated in one left-padded batch.

Oracle: the same command run once per prompt (`--prompt TEXT`, a batch of one, no padding): greedy continuations must
be equal, for a plain model and for a FoT model whose prompts outgrow the local window (memory in use)."""

from __future__ import annotations

import pytest
import torch

from lit_longctx.checkpoint import save_checkpoint
from lit_longctx.cli import main
from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.tokenizers import load_tokenizer

PROMPTS = ["Once upon a time", "A", "The memory layers of a focused transformer keep what left the window, so long "
           "prompts still", "short one"]


@pytest.mark.parametrize("layers", [{}, {1: "fot"}])
def test_prompts_file_equals_one_prompt_at_a_time(tmp_path, capsys, layers):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=260, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32,
                         layer_attention=layers, attention_options={"fot": {"last_context_length": 16,
                                                                            "mem_dtype": "float32"}})
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6)  # a sharper model: greedy tokens depend on the context
    ckpt = save_checkpoint(tmp_path / "model.ckpt", model, tokenizer=load_tokenizer("byte"))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")
    common = ["--checkpoint", str(ckpt), "--max_new_tokens", "10", "--device", "cpu"]
    batched = main(["generate", *common, "--prompts", f"@{tmp_path / 'prompts.txt'}"])
    alone = [main(["generate", *common, "--prompt", text])[0] for text in PROMPTS]
    assert batched == alone and len(set(alone)) > 1
    printed = capsys.readouterr().out
    assert all(text + cont in printed for text, cont in zip(PROMPTS, alone))


def test_samples_are_seeded_per_sample_like_the_server(tmp_path, capsys):
    """--num_samples 3: sample i is generate() with a generator seeded seed + i (what `serve` does for n = 3)."""
    from lit_longctx.nn.generate import generate

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=260, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    max_seq_len=64))
    ckpt = save_checkpoint(tmp_path / "model.ckpt", model, tokenizer=load_tokenizer("byte"))
    texts = main(["generate", "--checkpoint", str(ckpt), "--prompt", "Once", "--max_new_tokens", "12", "--device",
                  "cpu", "--temperature", "1.0", "--num_samples", "3", "--seed", "5"])
    tok = load_tokenizer("byte")
    ids = tok.encode("Once", bos=True)
    expected = [tok.decode(generate(model.eval(), ids, 12, temperature=1.0, stop_tokens=[tok.eos_id],
                                    generator=torch.Generator().manual_seed(5 + i))[0]) for i in range(3)]
    assert texts == expected and len(set(texts)) == 3


def error_line(capsys, *args: str) -> str:
    """Run the command in-process: it must exit with status 2 after one ``error:`` line."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and not any("Traceback" in line for line in err)
    return err[-1]


def test_missing_or_empty_prompts_file(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "m.ckpt", Transformer(ModelConfig(vocab_size=260, dim=16, n_layers=1, n_heads=2,
                                                                       ffn_dim=32, max_seq_len=16)),
                           tokenizer=load_tokenizer("byte"))
    err = error_line(capsys, "generate", "--checkpoint", str(ckpt), "--prompts", f"@{tmp_path / 'none.txt'}")
    assert "prompts file" in err and "does not exist" in err
    (tmp_path / "empty.txt").write_text("\n \n")
    err = error_line(capsys, "generate", "--checkpoint", str(ckpt), "--prompts", f"@{tmp_path / 'empty.txt'}")
    assert "holds no prompt" in err
