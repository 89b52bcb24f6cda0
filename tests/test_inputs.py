"""lit_longctx.inputs: local paths are told from hub ids, missing paths get the nearest existing match, corrupt JSON
names its line."""

import pytest

from lit_longctx.inputs import hub_allowed, is_hub_id, looks_local, nearest_match, not_found, read_json


def test_local_paths_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for local in ("./x", "../x", "~/x", "/abs/x", "runs/quickstrt", "a/b/c", "org/model.ckpt", "x", "a--b/c",
                  "-org/name"):
        assert looks_local(local) and not is_hub_id(local), local
    for hub in ("meta-llama/Llama-2-7b-hf", "EleutherAI/llemma_7b", "syzymon/long_llama_3b_v1.1"):
        assert is_hub_id(hub), hub


def test_nearest_match(tmp_path):
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    (tmp_path / "runs" / "other").mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert nearest_match(tmp_path / "runs" / "quickstrt") == f"did you mean {str(tmp_path / 'runs' / 'quickstart')!r}?"
    assert nearest_match(tmp_path / "runs" / "zzz" / "deeper") == (
        f"'zzz' is not in {str(tmp_path / 'runs')!r}, which holds ['other', 'quickstart']")
    assert nearest_match(tmp_path / "file.txt" / "x") == f"{str(tmp_path / 'file.txt')!r} exists but is not a directory"
    err = not_found(tmp_path / "runs" / "quickstrt", "checkpoint", "train first")
    near = str(tmp_path / "runs" / "quickstart")
    assert isinstance(err, FileNotFoundError) and str(err).endswith(f"not found (did you mean {near!r}?); train first")


def test_hub_allowed_follows_hf_hub_offline(monkeypatch):
    for value, allowed in (("1", False), ("true", False), ("ON", False), ("0", True), ("", True)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_allowed() is allowed, value
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert hub_allowed()


def test_read_json_names_file_and_line(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('{\n  "a": 1,\n  "b": \n}')
    with pytest.raises(ValueError, match=r"config '.*config.json' is not valid JSON \(line 4, column 1: Expecting"):
        read_json(f, "config")
    f.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_json(f, "config")
    f.write_text('{"a": [1, 2]}')
    assert read_json(f) == {"a": [1, 2]}
