"""FoT (modules/fot.py): memory-layer config, per-stage cross-batch settings and their logs, the CI configs through the
real CLI (fit, then the passkey test through FoTSession's memory), HF export and LongLLaMA directories, errors.

Oracles: the spec's positive/negative table, the FLOP formula, a plain CausalLM on the same weights, the token counts
of LongLLaMA's memory schedule, transformers' LlamaForCausalLM (loading the export, and counting the 3B parameters)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lit_longctx.checkpoint import save_checkpoint
from lit_longctx.cli import main
from lit_longctx.flops import flops_per_token
from lit_longctx.hf import CheckpointError, to_hf
from lit_longctx.modules import CausalLM, FoT
from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.nn.attention.fot import FoTSession
from lit_longctx.nn.config import ConfigError
from tests.cli_helpers import REPO, one_line_error, run

TINY = dict(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


def fot(**kwargs) -> FoT:
    return FoT(model=dict(TINY), **kwargs)


def attach(module: FoT, batch_size: int, **data) -> None:
    """Run ``setup('fit')`` as a Trainer would, with a data module that has this batch size (and packing)."""
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=batch_size, **data), ckpt_path=None,
                                     strategy=None)
    module.setup("fit")


def test_memory_layers_options_and_flops():
    module = fot(mem_layers=[1], cross_batch_range=3, last_context_length=16, mem_dtype="float32")
    config = module.model_config
    assert config.layer_attention == {1: "fot"} and module.mem_layers == [1]
    options = config.attention_options["fot"]
    assert (options["cross_batch_range"], options["last_context_length"], options["mem_dtype"]) == (3, 16, "float32")
    # a memory layer scores r more windows than a causal one: 12·H·D·T·r more FLOPs per token (H·D = 32)
    plain = flops_per_token(config.replace(layer_attention={}, attention_options={}), 16)
    assert flops_per_token(config, 16) == pytest.approx(plain + 12 * 32 * 16 * 3)
    defaults = fot(mem_layers=[0, 2]).model_config.attention_options["fot"]
    assert defaults["last_context_length"] == 32 and defaults["mem_dtype"] == "bfloat16"  # min(1024, W), LongLLaMA's


def test_stage_layouts_logs_and_evaluation_loss():
    torch.manual_seed(0)
    module = fot(mem_layers=[1], cross_batch_range=3, mem_dtype="float32")
    attach(module, 8, dataset_packing=4, eval_dataset_packing=1)
    module.configure_model()
    assert module.on_batch_layout({}, "train") == {"cross_batch_range": 3, "dataset_packing": 4,
                                                   "cross_batch_stepping": True}
    batch = {"input_ids": torch.randint(0, 97, (8, 12)), "labels": torch.randint(0, 97, (8, 12))}
    _, logs = module.compute_loss(batch, "train")
    # d = [0,1,2,3, 0,2,3,3]: (pos, neg) = first pack (0,0),(1,0),(2,0),(3,0); second (0,0),(1,1),(2,1),(3,0)
    assert logs == {"fot/positives": 12 / 8, "fot/negatives": 2 / 8}
    plain = CausalLM(model=module.model_config.replace(layer_attention={}, attention_options={}))
    plain.configure_model()
    plain.model.load_state_dict(module.model.state_dict())
    loss, logs = module.compute_loss(batch, "val")  # eval_cross_batch_range 0: plain attention
    assert logs == {"fot/positives": 0.0, "fot/negatives": 0.0}
    torch.testing.assert_close(loss, plain.compute_loss(batch, "val")[0])
    assert module.model_config.attention_options["fot"]["dataset_packing"] == 4  # recorded for exports
    explicit = fot(mem_layers=[1], cross_batch_ranges=[0, 3, 7, 7])
    explicit.configure_model()
    out = explicit.model(torch.randint(0, 97, (8, 5)), **explicit.on_batch_layout({}, "train"))
    assert out.extras["fot_layout"].ranges == (0, 1, 2, 3, 0, 3, 6, 7)


def test_errors_before_training():
    with pytest.raises(ConfigError, match="needs memory layers"):
        fot()
    with pytest.raises(ConfigError, match=r"mem_layers=\[3\] must be distinct layer indices in 0..2"):
        fot(mem_layers=[3])
    with pytest.raises(ConfigError, match="dropout=0.1 in FoT memory layer 1"):
        fot(mem_layers=[1], model_overrides={"attention_options": {"fot": {"dropout": 0.1}}})
    with pytest.raises(ConfigError, match="dataset_packing must be 4"):
        fot(mem_layers=[1], cross_batch_ranges=[0, 1, 2, 3], dataset_packing=2)
    with pytest.raises(ConfigError, match="batch_size \\(the per-device micro-batch\\)=6 is not divisible by "
                                          "dataset_packing=4"):
        attach(fot(mem_layers=[1], dataset_packing=4), 6)
    # k = 2, r = 4 with stepping: in-pack position 1 may see 4 rows, so row 5 is the first that can
    with pytest.raises(ConfigError, match=r"train batches .*=4\): cross_batch_range=4 is larger than a microbatch of 4 "
                                          r"rows allows.*at least 6 rows"):
        attach(fot(mem_layers=[1], cross_batch_range=4), 4, dataset_packing=2)
    with pytest.raises(ConfigError, match=r"val batches .*=2\): cross_batch_range=3 is larger than a microbatch of 2"):
        attach(fot(mem_layers=[1], cross_batch_range=1, eval_cross_batch_range=3), 2)
    with pytest.raises(ConfigError, match="differs from the data's k=2"):
        attach(fot(mem_layers=[1], dataset_packing=4), 8, dataset_packing=2)


def test_checkpoint_of_another_method_is_refused(tmp_path):
    model = Transformer(ModelConfig(**TINY))
    save_checkpoint(tmp_path / "landmark.ckpt", model, method="landmark")
    with pytest.raises(CheckpointError, match="method 'landmark'.*lit_longctx.modules.Landmark"):
        fot(mem_layers=[1], init_from=str(tmp_path / "landmark.ckpt"))


def test_longllama_directory_loads_with_its_memory_settings(tmp_path):
    """A LongLLaMA HF directory (model_type longllama, mem_layers and memory keys in config.json) starts FoT with its
    memory layers and settings unless given; its weights are plain LLaMA's."""
    source = Transformer(ModelConfig(**TINY))
    to_hf(source, tmp_path / "longllama")
    config_file = tmp_path / "longllama" / "config.json"
    hf = json.loads(config_file.read_text())
    hf.update(model_type="longllama", architectures=["LongLlamaForCausalLM"], mem_layers=[0, 2],
              last_context_length=24, mem_dtype="bfloat16", mem_positionals=True, mem_attention_grouping=[1, 8],
              torch_attention=False)
    config_file.write_text(json.dumps(hf))
    module = FoT(init_from=str(tmp_path / "longllama"))
    assert module.mem_layers == [0, 2]
    options = module.model_config.attention_options["fot"]
    assert (options["last_context_length"], options["mem_attention_grouping"]) == (24, [1, 8])
    module.configure_model()
    for name, tensor in source.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], tensor), name
    assert isinstance(module.inference_session(), FoTSession)
    assert FoT(init_from=str(tmp_path / "longllama"), mem_layers=[1], last_context_length=8).mem_layers == [1]


# ------------------------------------------------------------------------------------------- the CI config, end to end
@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    """``lit-longctx fit --config configs/fot_debug.yaml`` with its run and cache directories moved to a temp dir."""
    root = tmp_path_factory.mktemp("fot_debug")
    text = (REPO / "configs" / "fot_debug.yaml").read_text()
    config = root / "fot_debug.yaml"
    config.write_text(text.replace("runs/fot_debug", str(root / "run")).replace("runs/cache", str(root / "cache")))
    cli = run("fit", "--config", str(config))
    return config, cli


def test_debug_config_trains_with_cross_batch(debug_run):
    config, cli = debug_run
    assert cli.trainer.global_step == 8 and isinstance(cli.model, FoT)
    metrics = cli.trainer.callback_metrics
    # doc_aware_k2, B = 4, r = 2: d = [0, 1, 0, 2], (pos, neg) = (0,0), (1,0), (0,0), (1,1)
    assert metrics["train/fot/positives"].item() == 0.5 and metrics["train/fot/negatives"].item() == 0.25
    assert cli.model.model_config.attention_options["fot"]["dataset_packing"] == 2


def test_passkey_test_runs_through_the_memory(debug_run, monkeypatch):
    """``lit-longctx test --config configs/fot_debug.yaml --config configs/eval/passkey.yaml --ckpt_path last``: every
    prompt is answered by a FoTSession whose memory layer holds all but the last 32 tokens (last_context_length)."""
    config, _ = debug_run
    sessions: list[tuple[FoTSession, int]] = []
    prefill = FoTSession.prefill

    def recording_prefill(self, ids):
        sessions.append((self, ids.shape[1]))
        return prefill(self, ids)

    monkeypatch.setattr(FoTSession, "prefill", recording_prefill)
    cli = run("test", "--config", str(config), "--config", str(REPO / "configs/eval/passkey.yaml"),
              "--ckpt_path", "last", "--data.lengths=[300, 600]", "--data.depths=[0.5]", "--data.trials=1")
    assert "passkey/acc@600" in cli.trainer.callback_metrics
    assert sorted(n for _, n in sessions) == [300, 600]
    for session, n in sessions:  # 10 generated tokens fit the window (32 + 10 <= 64): nothing else was evicted
        assert session.memory_lengths == [0, n - 32, 0]


def test_export_loads_in_transformers_and_back_into_fot(debug_run, tmp_path):
    from transformers import LlamaForCausalLM

    config, cli = debug_run
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    main(["convert", "to-hf", "--checkpoint", ckpt, "--output", str(tmp_path / "hf")])
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["model_type"] == "llama"
    memory = {k: saved[k] for k in ("mem_layers", "last_context_length", "mem_dtype", "mem_positionals",
                                    "mem_attention_grouping", "torch_attention", "cross_batch_range",
                                    "cross_batch_stepping", "dataset_packing")}
    assert memory == {"mem_layers": [1], "last_context_length": 32, "mem_dtype": "float32", "mem_positionals": True,
                      "mem_attention_grouping": None, "torch_attention": False, "cross_batch_range": 2,
                      "cross_batch_stepping": True, "dataset_packing": 2}
    hf, info = LlamaForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model = cli.model.model.eval()
    ids = torch.randint(0, 259, (1, 20))
    with torch.no_grad():  # within the local window FoT is plain LLaMA: transformers gives the same logits
        torch.testing.assert_close(hf.eval()(ids).logits, model(ids, cross_batch_range=0).logits, atol=1e-5,
                                   rtol=1e-5)
    back = FoT(init_from=str(tmp_path / "hf"))
    assert back.mem_layers == [1] and back.model_config.attention_options["fot"]["last_context_length"] == 32
    back.configure_model()
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.model.state_dict()[name], tensor), name


def test_batch_not_divisible_by_k_is_one_line(debug_run):
    config, _ = debug_run
    err = one_line_error("fit", "--config", str(config), "--data.init_args.batch_size=3")
    assert "batch_size=3 is not divisible by k=2" in err


def test_3b_config_parses_and_builds_on_meta(capsys):
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_longctx.hf import config_to_hf

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "configs/fot_3b.yaml"), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    init_args = dict(printed["model"]["init_args"])
    assert init_args.pop("init_from")  # a placeholder for the user's OpenLLaMA-3B-v2 directory
    module = FoT(**init_args)
    with torch.device("meta"):
        model = module.build_model()
    with torch.device("meta"):  # oracle: transformers' LLaMA of the same shapes
        reference = LlamaForCausalLM(LlamaConfig.from_dict(config_to_hf(module.model_config)))
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in reference.parameters()) and 3.42e9 < n < 3.44e9
    assert module.mem_layers == [6, 12, 18] and module.model_config.head_dim == 100
    data, trainer = printed["data"]["init_args"], printed["trainer"]
    assert (data["data_pipeline"], data["seq_len"], module.hparams.cross_batch_range) == ("doc_aware_k4", 2048, 3)
    windows = trainer["devices"] * trainer["num_nodes"] * data["batch_size"] * trainer["accumulate_grad_batches"]
    assert windows * data["seq_len"] == 256 * 1024  # 256K-token batches
    assert trainer["strategy"]["class_path"].endswith("FSDPStrategy") and trainer["precision"] == "bf16-mixed"
    assert (module.hparams.learning_rate, module.hparams.weight_decay, tuple(module.hparams.betas)) == (
        2e-5, 0.01, (0.9, 0.95))
