"""checkpoint.py's registries: methods and extra-state hooks are registered by their own modules, and a reader that
imports nothing but ``lit_longctx.checkpoint`` still applies them (the light path of ``generate`` / ``serve``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lit_longctx import checkpoint
from lit_longctx.checkpoint import FORMAT, read_checkpoint, register_method, register_state_hook
from lit_longctx.nn import ModelConfig
from tests.cli_helpers import REPO

TINY = dict(vocab_size=11, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=8)
Q = "layers.0.self_attn.q_proj"

# a fresh interpreter: reads both files, records whether Lightning got imported, then checks method compatibility
READER = textwrap.dedent("""
    import sys
    import torch
    from lit_longctx.checkpoint import CheckpointError, LoadedCheckpoint, check_method, read_checkpoint

    out = {}
    for name in ("plain.pt", "run.ckpt"):
        loaded = read_checkpoint(sys.argv[1] + "/" + name)
        out[name] = (loaded.state_dict, loaded.extra, loaded.method)
        out[name + ":no_weights"] = read_checkpoint(sys.argv[1] + "/" + name, with_weights=False).state_dict
    out["lightning_imported"] = "lightning" in sys.modules
    config = loaded.model_config
    check_method(LoadedCheckpoint(config, {}, "lolcats_transfer", source="stage1"), "lolcats_lora")  # follows
    try:
        check_method(LoadedCheckpoint(config, {}, "fot", source="fot.ckpt"), "landmark")
    except CheckpointError as e:
        out["refusal"] = str(e)
    torch.save(out, sys.argv[1] + "/out.pt")
""")


def _adapters(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 8, generator=g), torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)


def _peft_state(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{Q}.base_layer.weight": w0, f"{Q}.lora_A.default.weight": a, f"{Q}.lora_B.default.weight": b,
            "norm.weight": torch.ones(8)}


def test_a_reader_importing_only_checkpoint_merges_adapters_and_knows_every_method(tmp_path):
    config = ModelConfig(**TINY).to_dict()
    (w0, a, b), (w1, a1, b1) = _adapters(0), _adapters(1)
    torch.save({"format": FORMAT, "method": "lolcats_lora", "model_config": config, "state_dict": _peft_state(w0, a, b),
                "tokenizer_files": {}, "extra": {"lora": {"scaling": 2.0, "r": 2}, "note": "kept"}},
               tmp_path / "plain.pt")
    lightning_state = {f"model.{k}": v for k, v in _peft_state(w1, a1, b1).items()}
    torch.save({"state_dict": lightning_state,
                "lit_longctx": {"method": "causal", "model_config": config, "extra": {"lora": {"scaling": 0.5}}}},
               tmp_path / "run.ckpt")
    subprocess.run([sys.executable, "-c", READER, str(tmp_path)], cwd=REPO, check=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    out = torch.load(tmp_path / "out.pt", weights_only=True)

    for name, (base, lo_a, lo_b, scaling) in {"plain.pt": (w0, a, b, 2.0), "run.ckpt": (w1, a1, b1, 0.5)}.items():
        state, extra, _ = out[name]
        assert sorted(state) == sorted([f"{Q}.weight", "norm.weight"])  # the adapters are folded away
        expected = (base.double() + scaling * (lo_b.double() @ lo_a.double())).float()  # W0 + s·B A
        torch.testing.assert_close(state[f"{Q}.weight"], expected, rtol=1e-5, atol=1e-5)
        assert "lora" not in extra
        assert out[name + ":no_weights"] == {}  # never the unmerged tensors
    assert out["plain.pt"][1] == {"note": "kept"} and out["plain.pt"][2] == "lolcats_lora"
    assert out["lightning_imported"] is False  # reading stays light: no method module is imported for it
    assert "method 'fot'" in out["refusal"] and "--model.class_path lit_longctx.modules.FoT" in out["refusal"]


def test_a_registered_state_hook_runs_in_both_reader_forms(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_STATE_HOOKS", {})
    monkeypatch.setattr(checkpoint, "_DECLARING_MODULES", [])
    calls = []

    def scale_all(state, factor):
        calls.append(factor)
        return {k: v * factor for k, v in state.items()}

    register_state_hook("scale_all", scale_all)
    register_state_hook("scale_all", scale_all)  # the same hook again (a module imported twice) is fine
    with pytest.raises(ValueError, match="scale_all"):
        register_state_hook("scale_all", lambda state, value: state)
    config = ModelConfig(**TINY).to_dict()
    w = torch.arange(4.0)
    torch.save({"format": FORMAT, "method": "causal", "model_config": config, "state_dict": {"w": w},
                "tokenizer_files": {}, "extra": {"scale_all": 3.0}}, tmp_path / "plain.pt")
    torch.save({"state_dict": {"model.w": w},
                "lit_longctx": {"model_config": config, "extra": {"scale_all": -1.0, "other": 1}}}, tmp_path / "r.ckpt")
    plain, run = read_checkpoint(tmp_path / "plain.pt"), read_checkpoint(tmp_path / "r.ckpt")
    torch.testing.assert_close(plain.state_dict["w"], 3.0 * w)
    torch.testing.assert_close(run.state_dict["w"], -w)
    assert plain.extra == {} and run.extra == {"other": 1} and calls == [3.0, -1.0]
    assert read_checkpoint(tmp_path / "r.ckpt", with_weights=False).state_dict == {} and calls == [3.0, -1.0]


def test_a_method_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(checkpoint, "METHODS", {})
    monkeypatch.setattr(checkpoint, "FOLLOWS", {})
    register_method("toy", "pkg.Toy", follows=("causal",))
    register_method("toy", "pkg.Toy", follows=("causal",))
    assert checkpoint.METHODS == {"toy": "pkg.Toy"} and checkpoint.FOLLOWS == {"toy": ("causal",)}
    with pytest.raises(ValueError, match="'toy' is already registered as pkg.Toy"):
        register_method("toy", "pkg.Other")


def test_a_registered_foreign_format_names_its_converter_and_others_get_the_generic_message(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_FOREIGN_FORMATS", [])
    monkeypatch.setattr(checkpoint, "_DECLARING_MODULES", ["lit_longctx.lolcats_import"])
    checkpoint.register_foreign_format(lambda ckpt, source: f"{source} is a toy file: run toy-convert" if "toy" in ckpt
                                       else None)
    torch.save({"toy": torch.zeros(1)}, tmp_path / "toy.pt")
    torch.save({"model_state_dict": {}}, tmp_path / "ref.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"toy\.pt is a toy file: run toy-convert"):
        read_checkpoint(tmp_path / "toy.pt")
    with pytest.raises(checkpoint.CheckpointError, match="LoLCATs reference checkpoint.*convert from-lolcats"):
        read_checkpoint(tmp_path / "ref.pt")  # the declared module registered its recogniser on the first miss
    assert checkpoint._DECLARING_MODULES == [] and len(checkpoint._FOREIGN_FORMATS) == 2
    with pytest.raises(checkpoint.CheckpointError, match=r"is not a lit-longctx checkpoint \(top-level keys \['weights'\]"):
        read_checkpoint(tmp_path / "other.pt")
