"""``--model.lora`` on CausalLM: only adapters and the listed extras train, merged on export (issue 12)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from lit_longctx.callbacks.context_schedule import ContextSchedule
from lit_longctx.datamodules import TokenFiles, write_token_files
from lit_longctx.export import export_hf
from lit_longctx.hf import to_hf
from lit_longctx.modules import CausalLM
from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.nn.config import ConfigError

VOCAB = 97
TINY = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)
LONGLORA = {"r": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "trainable": ["embeddings", "norms"]}


def test_longlora_extension_trains_only_adapters_and_extras_and_exports_merged(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = Transformer(ModelConfig(**TINY))
    to_hf(base, tmp_path / "base")
    tokens = np.random.default_rng(0).integers(0, VOCAB, 4000)
    write_token_files(tmp_path / "tokens", {"train": tokens}, vocab_size=VOCAB)
    module = CausalLM(init_from=str(tmp_path / "base"), lora=LONGLORA, learning_rate=1e-2, lr_schedule="constant",
                      weight_decay=0.0)
    stages = [{"step": 0, "seq_len": 16, "micro_batch": 2},
              {"step": 2, "seq_len": 32, "micro_batch": 1, "rope": {"type": "linear", "factor": 2.0}}]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_steps=4, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[ContextSchedule(stages)])
    dm = TokenFiles(str(tmp_path / "tokens"), tokenizer="byte", seq_len=16, batch_size=2, train_order="sequential")
    trainer.fit(module, datamodule=dm)
    before = base.state_dict()
    after = {k: v.detach() for k, v in module.model.state_dict().items()}
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    for name, value in after.items():
        if ".lora_A." in name:
            continue  # A trains too, but B = 0 gives A no gradient on the first step only; checked through B below
        if ".lora_B." in name:
            assert value.abs().sum() > 0, name  # B left zero
            continue
        changed = not torch.equal(value, before[name])
        listed = "embed_tokens" in name or "norm" in name
        assert changed == listed, name
        assert (name in trainable) == listed, name
    # checkpoint -> HF export: merged W0 + (alpha/r) B A, loaded by transformers, gives the adapted model's logits
    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    out = export_hf(ckpt, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.rope_scaling["factor"] == 2.0
    assert not any("lora" in k for k in hf.state_dict())
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    module.model.eval()
    with torch.no_grad():
        ours = module.model(ids, return_logits=True).logits
        theirs = hf(ids).logits
        plain = Transformer(module.model_config)
        plain.load_state_dict({k: v for k, v in before.items()})
        unadapted = plain(ids, return_logits=True).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert (ours - unadapted).abs().max() > 1e-3  # the adapters did change the model


def test_fresh_adapters_start_from_the_base_model_exactly():
    torch.manual_seed(0)
    plain = CausalLM(model=dict(TINY))
    plain.configure_model()
    adapted = CausalLM(model=dict(TINY), lora={"r": 2, "targets": ["q_proj", "down_proj"]})
    adapted.configure_model()
    state = {k: v for k, v in adapted.model.state_dict().items() if "lora" not in k}
    plain.model.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (1, 8))
    torch.testing.assert_close(adapted.model(ids, return_logits=True).logits,
                               plain.model(ids, return_logits=True).logits, atol=0, rtol=0)
    names = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n for n in names)
    assert any("mlp.down_proj.lora_B" in n for n in names)


@pytest.mark.parametrize(("lora", "message"), [
    ({"r": 0}, "positive integer"), ({"targets": ["wq"]}, "not projections"), ({"rank": 4}, "keys are r, alpha"),
])
def test_bad_lora_settings(lora, message):
    with pytest.raises(ConfigError, match=message):
        CausalLM(model=dict(TINY), lora=lora)
