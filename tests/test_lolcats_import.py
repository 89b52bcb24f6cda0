"""The LoLCATs reference's own checkpoint files (``{'model_state_dict': ...}`` stage-1 feature maps and window factors,
stage-2 PEFT LoRA tensors) assembled onto a base HF model.

Oracle: the same tensors put into a model by hand (the base HF tensors read with safetensors, the feature maps copied
into the parameters, the LoRA delta W₀ + α/r·B A computed here), and for kept adapters a PEFT-injected model.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lit_longctx.checkpoint import load_model, read_checkpoint
from lit_longctx.hf import CheckpointError, config_from_hf, load_weights, read_hf_config
from lit_longctx.lolcats_import import assemble_lolcats, convert_from_lolcats
from lit_longctx.nn import Transformer
from tests.cli_helpers import in_process_error
from tests.test_hf import hf_model, llama_config

H, D, F, R, ALPHA = 4, 16, 8, 2, 6.0  # the tiny base: 2 layers, 4 heads of 16, hidden 64, 2 KV heads


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lolcats")
    hf_model(llama_config()).save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    distill = {  # layer 0 converted, layer 1 kept as softmax (softmax_attentions: [1])
        "model.layers.0.self_attn.feature_map_q.mlp.layer": torch.randn(H, D, F, generator=g),
        "model.layers.0.self_attn.feature_map_k.mlp.layer": torch.randn(H, D, F, generator=g),
        "model.layers.0.self_attn.window_factors": torch.randn(1, H, 1, 1, generator=g),
    }
    torch.save({"model_state_dict": distill}, root / "run_distill.pt")
    ft = {}  # PEFT's names, q and v adapted in both layers, plus φ_k of layer 0 retrained (fqkvo)
    for m in range(2):
        for proj, out in (("q_proj", 64), ("v_proj", 32)):
            owner = f"base_model.model.model.layers.{m}.self_attn.{proj}"
            ft[f"{owner}.lora_A.default.weight"] = torch.randn(R, 64, generator=g) * 0.3
            ft[f"{owner}.lora_B.default.weight"] = torch.randn(out, R, generator=g) * 0.3
    ft["base_model.model.model.layers.0.self_attn.feature_map_k.mlp.layer"] = torch.randn(H, D, F, generator=g)
    torch.save({"model_state_dict": ft}, root / "run_ft.pt")
    return root, distill, ft


def by_hand(root, distill, ft=None) -> Transformer:
    hybrid = {"feature_dim": F, "window_size": 4, "window": "tk", "block_alignment": "end",
              "feature_map_init": "kaiming_uniform", "decode_window": "sliding", "prefill": "forward"}
    config = config_from_hf(read_hf_config(root / "base"), attention="hybrid_linear", layer_attention={1: "causal"},
                            attention_options={"hybrid_linear": hybrid})
    model = Transformer(config)
    state = load_file(str(root / "base" / "model.safetensors"))
    model.load_state_dict({**model.state_dict(), **state})
    attn = model.layers[0].self_attn
    with torch.no_grad():
        attn.feature_map_q.mlp.layer.copy_(distill["model.layers.0.self_attn.feature_map_q.mlp.layer"])
        attn.feature_map_k.mlp.layer.copy_(distill["model.layers.0.self_attn.feature_map_k.mlp.layer"])
        attn.window_factors.copy_(distill["model.layers.0.self_attn.window_factors"])
        if ft is not None:
            attn.feature_map_k.mlp.layer.copy_(ft["base_model.model.model.layers.0.self_attn.feature_map_k.mlp.layer"])
            for m in range(2):
                for proj in ("q_proj", "v_proj"):
                    owner = f"base_model.model.model.layers.{m}.self_attn.{proj}"
                    delta = ft[f"{owner}.lora_B.default.weight"] @ ft[f"{owner}.lora_A.default.weight"]
                    getattr(model.layers[m].self_attn, proj).weight.add_(ALPHA / R * delta)
    return model.eval()


def build(loaded) -> Transformer:
    with torch.device("meta"):
        model = Transformer(loaded.model_config)
    load_weights(model, loaded.state_dict, source=loaded.source)
    return model.eval()


IDS = torch.randint(0, 256, (2, 19))  # 19 % 4 != 0 and > 2w: end and start alignment differ


def test_stage1_file_reproduces_the_hand_loaded_model(seed_files):
    root, distill, _ = seed_files
    loaded = assemble_lolcats(root / "base", root / "run_distill.pt", window_size=4)
    assert loaded.method == "lolcats_transfer"
    kinds = [loaded.model_config.attention_kind(i) for i in range(2)]
    assert kinds == ["hybrid_linear", "causal"]
    with torch.no_grad():
        torch.testing.assert_close(build(loaded)(IDS).logits, by_hand(root, distill)(IDS).logits, rtol=0, atol=0)


def test_stage2_adapters_merged_kept_and_converted(seed_files, tmp_path):
    root, distill, ft = seed_files
    args = (root / "base", root / "run_distill.pt", root / "run_ft.pt")
    with torch.no_grad():
        expected = by_hand(root, distill, ft)(IDS).logits
        merged = assemble_lolcats(*args, window_size=4, lora_alpha=ALPHA)
        assert merged.method == "lolcats_lora"
        torch.testing.assert_close(build(merged)(IDS).logits, expected, rtol=1e-6, atol=1e-6)

        kept = assemble_lolcats(*args, window_size=4, lora_alpha=ALPHA, merge_lora=False)
        assert kept.extra["lora"] == {"scaling": ALPHA / R, "r": R, "targets": ["q_proj", "v_proj"]}
        from peft import LoraConfig, inject_adapter_in_model

        peft_model = inject_adapter_in_model(LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]),
                                             Transformer(kept.model_config))
        peft_model.load_state_dict(kept.state_dict, strict=True)
        # x(W + sBA) vs xW + s(xA)B: the same sum in another float32 order
        torch.testing.assert_close(peft_model.eval()(IDS).logits, expected, rtol=1e-4, atol=1e-4)

        for keep in (False, True):  # the converted file: every reader gets the merged model
            out = convert_from_lolcats(str(root / "base"), str(root / "run_distill.pt"), str(tmp_path / f"{keep}.pt"),
                                       str(root / "run_ft.pt"), window_size=4, lora_alpha=ALPHA, keep_lora=keep)
            model, _, loaded = load_model(out)
            assert loaded.method == "lolcats_lora"
            torch.testing.assert_close(model.eval()(IDS).logits, expected, rtol=1e-6, atol=1e-6)


def test_mismatched_feature_maps_and_foreign_files_are_refused(seed_files, tmp_path, capsys):
    root, distill, _ = seed_files
    bad = {**distill, "model.layers.0.self_attn.feature_map_q.mlp.layer": torch.zeros(3, D, F)}
    torch.save({"model_state_dict": bad}, tmp_path / "bad_distill.pt")
    with pytest.raises(CheckpointError, match=r"shape \(3, 16, 8\), but the base model needs \(4, 16, F\)"):
        assemble_lolcats(root / "base", tmp_path / "bad_distill.pt")
    torch.save({"model_state_dict": {"model.layers.5.self_attn.window_factors": torch.zeros(1, H, 1, 1),
                                     **{k.replace(".0.", ".5."): v for k, v in distill.items()}}},
               tmp_path / "deep.pt")
    with pytest.raises(CheckpointError, match="layer 5, but the base model has 2 layers"):
        assemble_lolcats(root / "base", tmp_path / "deep.pt")
    with pytest.raises(CheckpointError, match="convert from-lolcats"):
        read_checkpoint(root / "run_distill.pt")  # init_from / convert point to the assembler
    err = in_process_error(capsys, "convert", "from-lolcats", "--base", str(root / "base"), "--distill",
                           str(tmp_path / "bad_distill.pt"), "--output", str(tmp_path / "x.pt"))
    assert "feature_map_q.mlp.layer has shape (3, 16, 8)" in err and not (tmp_path / "x.pt").exists()


