"""Weight diffs in the seed's release format (spec §5): make then recover, integrity check, clear errors.

Oracles: the tuned tensors themselves (fine-tune-like perturbations recover bit-exactly by Sterbenz's lemma), the raw
rows written out by hand (base rows, then the float32 mean of the base rows), and a float64 sum of the parameters.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_longctx.cli import main
from lit_longctx.hf import CheckpointError, load_hf_state_dict, to_hf
from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.tokenizers import ByteTokenizer, load_tokenizer
from lit_longctx.weight_diff import CHECKSUM_FILE, make_diff, recover
from tests.cli_helpers import one_line_error

BASE_VOCAB = 259  # the byte tokenizer's


def tiny(vocab: int, dim: int = 16) -> Transformer:
    return Transformer(ModelConfig(vocab_size=vocab, dim=dim, n_layers=2, n_heads=2, ffn_dim=32))


def raw_by_hand(base: dict[str, torch.Tensor], vocab: int) -> dict[str, torch.Tensor]:
    """Spec §1.1: the base with `vocab - base` rows appended to both vocabulary matrices, each the row mean."""
    out = {}
    for k, v in base.items():
        v = v.float()
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            mean = v.double().mean(0).float()
            v = torch.cat([v, mean.expand(vocab - v.shape[0], -1)])
        out[k] = v
    return out


@pytest.fixture
def released(tmp_path):
    """A base model (bf16, byte vocabulary), a tuned model with [PAD] and <landmark> added (as the seed's release),
    and its diff."""
    torch.manual_seed(0)
    base = tiny(BASE_VOCAB)
    to_hf(base, tmp_path / "base", dtype=torch.bfloat16, tokenizer=ByteTokenizer())
    base_state = load_hf_state_dict(tmp_path / "base")
    tokenizer = ByteTokenizer()
    assert tokenizer.add_special_token("[PAD]") == 259 and tokenizer.add_special_token("<landmark>") == 260
    raw = raw_by_hand(base_state, tokenizer.vocab_size)
    # fine-tuning moves each weight by less than half of itself: same sign, within a factor of two of raw
    tuned_state = {k: v * (1 + 0.3 * (2 * torch.rand_like(v) - 1)) for k, v in raw.items()}
    tuned = tiny(tokenizer.vocab_size)
    tuned.load_state_dict(tuned_state)
    to_hf(tuned, tmp_path / "tuned", tokenizer=tokenizer)
    psum = make_diff(str(tmp_path / "base"), str(tmp_path / "tuned"), str(tmp_path / "diff"))
    return tmp_path, tuned_state, raw, psum


def test_make_then_recover_reproduces_tuned_weights_exactly(released):
    root, tuned, raw, psum = released
    diff = load_hf_state_dict(root / "diff")
    for k in tuned:  # the diff is tuned - raw with raw built by hand
        assert diff[k].dtype == torch.float32
        torch.testing.assert_close(diff[k], tuned[k] - raw[k], rtol=0, atol=0)
    assert psum == pytest.approx(sum(v.double().sum().item() for v in tuned.values()), abs=1e-3)
    assert float((root / "diff" / CHECKSUM_FILE).read_text()) == pytest.approx(psum, abs=1e-4)

    recovered_sum = recover(str(root / "base"), str(root / "diff"), str(root / "out"))
    assert recovered_sum == pytest.approx(psum, abs=1e-3)
    out = load_hf_state_dict(root / "out")
    assert set(out) == set(tuned)
    for k, v in tuned.items():
        assert torch.equal(out[k], v), k  # bit-exact in float32
    tok = load_tokenizer(root / "out")  # the diff's tokenizer, added tokens included
    assert tok.token_to_id("<landmark>") == 260 and tok.vocab_size == 261
    assert json.loads((root / "out" / "config.json").read_text())["vocab_size"] == 261


def test_recovered_release_loads_into_the_landmark_module(released):
    from lit_longctx.modules import Landmark

    root, tuned, _, _ = released
    recover(str(root / "base"), str(root / "diff"), str(root / "out"))
    module = Landmark(init_from=str(root / "out"), mem_freq=8)
    module.configure_model()
    assert module.model_config.attention == "landmark"
    assert module.landmark_options.landmark_id == 260  # from the tokenizer, after [PAD], as in the release
    assert module.model_config.vocab_size == 261  # nothing grown: the rows are there
    assert torch.equal(module.model.model.embed_tokens.weight, tuned["model.embed_tokens.weight"])


def test_recover_through_the_cli_with_an_explicit_checksum(released, capsys):
    root, tuned, _, psum = released
    (root / "diff" / CHECKSUM_FILE).unlink()
    main(["weight-diff", "recover", "--base", str(root / "base"), "--diff", str(root / "diff"), "--output",
          str(root / "out"), "--checksum", f"{psum:.4f}", "--dtype", "bfloat16"])
    assert "matches the checksum" in capsys.readouterr().out
    out = load_hf_state_dict(root / "out")
    assert out["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(out["lm_head.weight"], tuned["lm_head.weight"].bfloat16())
    value_file = root / "sum.txt"
    value_file.write_text(f"{psum + 1:.4f}\n")
    with pytest.raises(ValueError, match="integrity check failed"):
        recover(str(root / "base"), str(root / "diff"), checksum=str(value_file))


def test_checksum_catches_a_corrupted_diff(released):
    root, _, _, _ = released
    shard = root / "diff" / "model.safetensors"
    tensors = load_file(str(shard))
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] += 0.5
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match="integrity check failed.*damaged"):
        recover(str(root / "base"), str(root / "diff"), str(root / "out"))
    assert not (root / "out").exists()  # nothing half-written is left behind
    # without any checksum the damage goes unnoticed, and the command says it did not check
    (root / "diff" / CHECKSUM_FILE).unlink()
    recover(str(root / "base"), str(root / "diff"))


def test_sharded_output_and_bin_input(released):
    root, tuned, _, _ = released
    bin_diff = root / "diff_bin"
    shutil.copytree(root / "diff", bin_diff)
    torch.save(load_file(str(bin_diff / "model.safetensors")), bin_diff / "pytorch_model.bin")
    (bin_diff / "model.safetensors").unlink()
    recover(str(root / "base"), str(bin_diff), str(root / "out"), max_shard_size_gb=20_000 / 2**30)
    index = json.loads((root / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    out = load_hf_state_dict(root / "out")
    assert all(torch.equal(out[k], v) for k, v in tuned.items())


def test_mismatched_base_is_refused(released, tmp_path):
    root, _, _, _ = released
    to_hf(tiny(BASE_VOCAB, dim=32), tmp_path / "wider")
    with pytest.raises(CheckpointError, match="shape .* not the model"):
        recover(str(tmp_path / "wider"), str(root / "diff"))
    to_hf(tiny(300), tmp_path / "bigger_vocab")
    with pytest.raises(CheckpointError, match="fewer than the base"):
        recover(str(tmp_path / "bigger_vocab"), str(root / "diff"))
    shallow = Transformer(ModelConfig(vocab_size=BASE_VOCAB, dim=16, n_layers=1, n_heads=2, ffn_dim=32))
    to_hf(shallow, tmp_path / "shallow")
    with pytest.raises(CheckpointError, match="different tensors.*model.layers.1"):
        recover(str(tmp_path / "shallow"), str(root / "diff"))


def test_missing_files_and_bad_arguments(released, tmp_path):
    root, _, _, _ = released
    with pytest.raises(FileNotFoundError, match="base directory .*nope"):
        recover(str(tmp_path / "nope"), str(root / "diff"))
    empty = tmp_path / "no_weights"
    empty.mkdir()
    shutil.copyfile(root / "base" / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="no weights in the base directory"):
        recover(str(empty), str(root / "diff"))
    with pytest.raises(CheckpointError, match="no config.json"):
        recover(str(root / "base"), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a number nor an existing file"):
        recover(str(root / "base"), str(root / "diff"), checksum="not-a-file")
    with pytest.raises(ValueError, match="one of the input directories"):
        recover(str(root / "base"), str(root / "diff"), str(root / "base"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        recover(str(root / "base"), str(root / "diff"), str(tmp_path / "full"))


def test_cli_reports_a_bad_diff_in_one_line(released, tmp_path):
    root, _, _, _ = released
    err = one_line_error("weight-diff", "recover", "--base", str(root / "base"), "--diff", str(tmp_path / "missing"),
                         "--output", str(tmp_path / "out"))
    assert "missing" in err and "does not exist" in err
