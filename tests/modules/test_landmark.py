"""The Landmark LightningModule: vocabulary growth, landmark id, options, sessions, checkpoints, export, and the CLI
(fit on landmark data, passkey through block retrieval, configs).

Oracles: transformers' LlamaForCausalLM on the same weights (with no landmark before a query the grouped softmax is
causal softmax, spec §7.1), the checkpoint's rows and their mean computed in float64, the augmented row length from
spec §1.2, the session class and cache settings actually used, and transformers' parameter count of the 7B config.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lit_longctx.checkpoint import read_checkpoint, save_checkpoint
from lit_longctx.cli import main
from lit_longctx.hf import CheckpointError, load_hf_state_dict, to_hf
from lit_longctx.modules import Landmark
from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.nn.attention.landmark import LandmarkCache, LandmarkSession
from lit_longctx.nn.config import ConfigError
from lit_longctx.tokenizers import ByteTokenizer
from tests.cli_helpers import REPO, run

SMALL = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 64, "max_seq_len": 128}


def plain_hf_dir(path: Path, tokenizer: ByteTokenizer | None = None) -> Path:
    """A plain LLaMA HF directory with the byte vocabulary (259 rows), optionally with its tokenizer files."""
    torch.manual_seed(1)
    to_hf(Transformer(ModelConfig(vocab_size=259, **SMALL)), path, tokenizer=tokenizer)
    return path


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------------------------- vocabulary
def test_resize_adds_mean_rows_and_keeps_old_logits(tmp_path):
    hf = plain_hf_dir(tmp_path / "hf", ByteTokenizer())
    state = load_hf_state_dict(hf)
    module = Landmark(init_from=str(hf), mem_freq=8)
    module.configure_model()
    model = module.model
    assert module.landmark_options.landmark_id == 259 and model.config.vocab_size == 260
    assert module.tokenizer.token_to_id("<landmark>") == 259
    for name, got in (("model.embed_tokens.weight", model.model.embed_tokens.weight),
                      ("lm_head.weight", model.lm_head.weight)):
        old = state[name]
        assert torch.equal(got[:259], old), name
        torch.testing.assert_close(got[259], old.double().mean(0).float(), rtol=0, atol=1e-7)
    ids = torch.randint(0, 259, (2, 7))  # shorter than a block: no landmark, so plain causal attention
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(ours[..., :259], hf_logits(hf, ids), rtol=1e-4, atol=1e-4)


def test_landmark_id_comes_from_the_tokenizer(tmp_path):
    module = Landmark(model={"vocab_size": 300, **SMALL}, tokenizer="byte")
    assert module.landmark_options.landmark_id == 259  # added to the byte tokenizer as the next id
    tok = ByteTokenizer()
    tok.add_special_token("[PAD]")
    tok.add_special_token("<landmark>")
    hf = plain_hf_dir(tmp_path / "hf", tok)  # the released layout: [PAD] 259, <landmark> 260
    module = Landmark(init_from=str(hf), mem_freq=8)
    assert module.landmark_options.landmark_id == 260 and module.model_config.vocab_size == 261
    explicit = Landmark(model={"vocab_size": 300, **SMALL}, landmark_id=299)
    assert explicit.landmark_options.landmark_id == 299


def test_unknown_landmark_id_and_id_outside_vocabulary_are_errors():
    module = Landmark(model={"vocab_size": 300, **SMALL})
    with pytest.raises(ConfigError, match="landmark token id is unknown.*landmark_id"):
        module.configure_model()
    module = Landmark(model={"vocab_size": 300, **SMALL}, landmark_id=300)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        module.configure_model()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"top_k": 0}, "top_k must be an integer >= 1"),
    ({"selection": "max_over_layers"}, "selection='max_over_layers' is unknown"),
    ({"path": "flash"}, "'path'\\]='flash' is unknown"),
    ({"mem_freq": 0}, "'mem_freq'\\] must be an integer >= 1"),
    ({"chunk_length": 0}, "'chunk_length'\\] must be None or an integer >= 1"),
    ({"landmark_id": -1}, "landmark_id must be null"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Landmark(model={"vocab_size": 300, **SMALL}, tokenizer="byte", **kwargs)


def test_checkpoint_of_another_method_is_refused(tmp_path):
    other = save_checkpoint(tmp_path / "lolcats.pt", Transformer(ModelConfig(vocab_size=260, **SMALL)),
                            method="lolcats_transfer")
    with pytest.raises(CheckpointError, match="lolcats_transfer.*lit_longctx.modules.AttentionTransfer"):
        Landmark(init_from=str(other))
    # restoring a CausalLM run with --ckpt_path is refused too (the architecture would silently change)
    ckpt = tmp_path / "causal.ckpt"
    torch.save({"state_dict": {}, "lit_longctx": {"method": "causal", "model_config": ModelConfig(
        vocab_size=260, **SMALL).to_dict()}}, ckpt)
    module = Landmark(model={"vocab_size": 260, **SMALL}, tokenizer="byte")
    module.ckpt_path_hint = str(ckpt)
    with pytest.raises(CheckpointError, match="method 'causal' but this module is 'landmark'"):
        module.configure_model()


# ------------------------------------------------------------------------------------------------ inference
def test_inference_session_carries_the_module_settings():
    module = Landmark(model={"vocab_size": 300, **SMALL}, tokenizer="byte", mem_freq=8, top_k=3,
                      selection="max_over_heads", chunk_length=16, mem_cache_size=6)
    module.configure_model()
    session = module.inference_session()
    caches = [c for c in session.state.caches if isinstance(c, LandmarkCache)]
    assert isinstance(session, LandmarkSession) and len(caches) == 2
    assert all(c.top_k == 3 and c.selection == "max_over_heads" and c.mem_cache_size == 6 for c in caches)
    assert session.prefill_chunk == 16
    overridden = module.inference_session(top_k=1, prefill_chunk=8)  # an evaluation batch's session_kwargs
    assert all(c.top_k == 1 for c in overridden.state.caches) and overridden.prefill_chunk == 8
    with pytest.raises(ConfigError, match="top_k must be"):
        module.inference_session(top_k=0)


def test_hf_config_extras_are_the_seed_config_fields():
    module = Landmark(model={"vocab_size": 300, **SMALL}, tokenizer="byte", mem_freq=8,
                      include_landmark_in_loss=True, train_context_length=64)
    extras = Landmark.hf_config_extras(module.model_config)
    assert extras == {"mem_id": 259, "mem_freq": 8, "train_context_length": 64, "include_landmark_in_loss": True}


# ------------------------------------------------------------------------------------------------------ CLI
def debug_args(root: Path, corpus: Path) -> list[str]:
    return ["--config", str(REPO / "configs" / "landmark_debug.yaml"), "--trainer.max_steps=4",
            "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
            f"--trainer.callbacks.init_args.dirpath={root}/checkpoints",
            f"--data.init_args.data.init_args.sources=[{corpus}]",
            f"--data.init_args.data.init_args.cache_dir={root}/cache"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, corpus):
    """``lit-longctx fit --config configs/landmark_debug.yaml`` (4 steps on the test corpus)."""
    root = tmp_path_factory.mktemp("landmark_debug")
    args = debug_args(root, corpus)
    cli = run("fit", *args)
    return root, args, cli


def test_fit_on_landmark_data(fitted):
    root, _, cli = fitted
    assert cli.trainer.global_step == 4
    config = cli.model.model_config
    assert config.attention == "landmark" and config.vocab_size == 260  # byte vocabulary + <landmark>
    opts = cli.model.landmark_options
    assert (opts.landmark_id, opts.mem_freq, opts.train_context_length) == (259, 8, 64)
    # rows of 64 regular tokens + ⌊63/8⌋ = 7 landmarks (per-row rule), 4 rows per step
    assert cli.model.tokens_seen == 4 * 4 * (64 + 7)
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lit_longctx"]["method"] == "landmark"
    assert b"<landmark>" in ckpt["lit_longctx"]["tokenizer_files"]["added_tokens.json"]


def test_passkey_on_the_checkpoint_goes_through_landmark_sessions(fitted, monkeypatch):
    root, args, _ = fitted
    sessions = []
    original = Landmark.inference_session

    def spy(self, batch_size=1, **kwargs):
        sessions.append(original(self, batch_size, **kwargs))
        return sessions[-1]

    monkeypatch.setattr(Landmark, "inference_session", spy)
    cli = run("test", *args, "--config", str(REPO / "configs" / "eval" / "passkey.yaml"),
              "--ckpt_path", "last", "--data.lengths=[300, 600]", "--data.depths=[0.5]", "--data.trials=1")
    metrics = cli.trainer.callback_metrics
    assert set(metrics) >= {"passkey/acc@300", "passkey/acc@600"}
    assert len(sessions) == 2 and all(type(s) is LandmarkSession for s in sessions)
    assert all(s.state.caches[0].top_k == 2 for s in sessions)  # the config's top_k
    # 600 prompt tokens went through the block cache: whole blocks of 8 + 1 are stored, the rest stays open
    assert max(s.state.caches[0].n_blocks for s in sessions) >= 600 // 8


def test_export_loads_in_transformers_and_back(fitted, tmp_path):
    root, _, cli = fitted
    main(["convert", "to-hf", "--checkpoint", str(root / "checkpoints" / "last.ckpt"), "--output", str(tmp_path)])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 260
    assert (config["mem_id"], config["mem_freq"], config["train_context_length"]) == (259, 8, 64)
    assert json.loads((tmp_path / "added_tokens.json").read_text()) == {"<landmark>": 259}
    model = cli.model.model.eval()
    ids = torch.randint(0, 256, (1, 6))  # no landmark inside: landmark attention equals causal attention
    with torch.no_grad():
        ours = model(ids).logits
    torch.testing.assert_close(hf_logits(tmp_path, ids), ours, rtol=1e-4, atol=1e-4)
    back = Landmark(init_from=str(tmp_path))
    back.configure_model()
    assert back.model_config == cli.model.model_config
    assert read_checkpoint(tmp_path, with_weights=False).method == "landmark"
    for k, v in model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v), k


def test_data_and_model_settings_must_agree(corpus, tmp_path):
    with pytest.raises(ConfigError, match="mem_freq: data 8 vs model 4"):
        run("fit", *debug_args(tmp_path, corpus), "--model.init_args.mem_freq=4")


def test_a_checkpoint_tokenizer_other_than_the_data_one_is_refused(corpus, tmp_path):
    from lit_longctx.tokenizers import train_sentencepiece

    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    spms = []
    for name, part in (("a", docs[: len(docs) // 2]), ("b", docs[len(docs) // 2 :])):
        (tmp_path / f"{name}.txt").write_text("\n".join(part))
        spms.append(train_sentencepiece([tmp_path / f"{name}.txt"], tmp_path / name / "tokenizer", 400))
    spms[0].save(tmp_path / "a")
    to_hf(Transformer(ModelConfig(vocab_size=400, **SMALL)), tmp_path / "hf", tokenizer=spms[1])
    # same size, same landmark id (400), different pieces: the data's ids would mean other tokens to the model
    with pytest.raises(ConfigError, match="tokenizer .* differs from the data's"):
        run("fit", *debug_args(tmp_path / "run", corpus), f"--model.init_args.init_from={tmp_path / 'hf'}",
            f"--data.init_args.data.init_args.tokenizer={tmp_path / 'a'}")


# --------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["landmark_debug", "landmark_passkey", "landmark_pg19", "landmark_llama7b"])
def test_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "configs" / f"{name}.yaml"), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lit_longctx.modules.Landmark"
    data = printed["data"]["init_args"]
    assert printed["data"]["class_path"] == "lit_longctx.datamodules.LandmarkData"
    assert data["mem_freq"] == printed["model"]["init_args"]["mem_freq"]
    assert data["include_landmark_in_loss"] == printed["model"]["init_args"]["include_landmark_in_loss"]


def test_llama7b_config_builds_on_meta_with_one_extra_row(capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_longctx.hf import config_to_hf

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "landmark_llama7b.yaml"), "--print_config"])
    init_args = dict(yaml.safe_load(capsys.readouterr().out)["model"]["init_args"])
    init_args.pop("init_from")  # the user's LLaMA-7B directory; its tokenizer would give <landmark> the id 32000
    init_args.update(landmark_id=32000, vocab_size=32001)
    module = Landmark(**init_args)
    with torch.device("meta"):
        model = module.build_model()
        reference = LlamaForCausalLM(LlamaConfig.from_dict(config_to_hf(module.model_config)))
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in reference.parameters())
    assert n == 6_738_415_616 + 2 * 4096  # LLaMA-7B + one embedding row and one output row
    opts = module.landmark_options
    assert (opts.mem_freq, opts.top_k, opts.train_context_length, opts.include_landmark_in_loss) == (50, 5, 512, True)
    assert (init_args["learning_rate"], init_args["warmup_steps"], init_args["cosine_cycles"]) == (2e-5, 0.03, 0.4)


def test_exported_sentencepiece_tokenizer_has_the_landmark_for_transformers(tmp_path, corpus):
    from transformers import LlamaTokenizer

    from lit_longctx.export import export_model
    from lit_longctx.tokenizers import train_sentencepiece

    text = tmp_path / "text.txt"
    text.write_text("\n".join(json.loads(line)["text"] for line in corpus.read_text().splitlines()))
    spm = train_sentencepiece([text], tmp_path / "spm" / "tokenizer", 400)
    torch.manual_seed(0)
    to_hf(Transformer(ModelConfig(vocab_size=400, **SMALL)), tmp_path / "hf", tokenizer=spm)
    module = Landmark(init_from=str(tmp_path / "hf"), mem_freq=8)
    module.configure_model()
    export_model(module.model, tmp_path / "out", method="landmark", tokenizer=module.tokenizer)
    hf_tok = LlamaTokenizer.from_pretrained(tmp_path / "out")
    assert len(hf_tok) == 401 and hf_tok.convert_tokens_to_ids("<landmark>") == 400
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 401
