"""Distributed checkpoints are read as data (lit_longctx/dcp.py): a real checkpoint passes; a crafted ``.metadata`` or
non-tensor value that torch's own reader would execute is refused by every lit-longctx reader, and runs nothing.

Oracles: torch's reader on the same directory (it returns the same metadata for a real checkpoint, and does run the
payloads, which shows they are live), and a marker file that a payload creates when it runs."""

from __future__ import annotations

import contextlib
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lit_longctx.dcp import read_metadata, verify
from lit_longctx.hf import CheckpointError
from tests.cli_helpers import TINY_CONFIG, one_line_error, write_corpus


class Payload:
    """Unpickling it creates ``path`` (what an attacker's code could do instead)."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def save(directory, extra=None) -> None:
    """A checkpoint shaped like the FSDP2 ones: weights, Adam state, param groups with floats, tuples and strings."""
    state = {"state_dict": {"w": torch.randn(4, 4), "b": torch.zeros(4, dtype=torch.bfloat16)},
             "optimizer_0": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0], "name": "w"}]},
             **(extra or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(directory), no_dist=True)


def test_a_real_checkpoint_passes_and_its_metadata_matches_torch(tmp_path):
    save(tmp_path / "ck")
    verify(tmp_path / "ck")
    ours, theirs = read_metadata(tmp_path / "ck"), dcp.FileSystemReader(str(tmp_path / "ck")).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata and ours.storage_data == theirs.storage_data


def test_crafted_metadata_is_refused_and_runs_nothing(tmp_path):
    save(tmp_path / "ck")
    verify(tmp_path / "ck")  # passes, and is remembered for the directory as it is now
    marker = tmp_path / "pwned"
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="not plain distributed-checkpoint metadata.*run code"):
        verify(tmp_path / "ck")  # a changed file is checked again
    assert not marker.exists()
    with contextlib.suppress(Exception):  # torch's reader runs the payload (and may fail on what it returned)
        dcp.FileSystemReader(str(tmp_path / "ck")).read_metadata()
    assert marker.exists()  # the payload is live


def test_crafted_value_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    save(tmp_path / "ck", {"extra": Payload(marker)})
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="its value 'extra' is not plain data"):
        verify(tmp_path / "ck")
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load({"extra": None}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)  # torch's reader runs it
    assert marker.exists()


def test_the_commands_refuse_a_crafted_checkpoint_in_one_line(tmp_path):
    save(tmp_path / "ck")
    marker = tmp_path / "pwned"
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    torch.save({"lit_longctx": {}}, tmp_path / "ck" / "meta.pt")
    line = one_line_error("convert", "to-hf", "--checkpoint", str(tmp_path / "ck"), "--output", str(tmp_path / "hf"))
    assert "refusing" in line and ".metadata" in line and "run code" in line, line
    assert not marker.exists() and not (tmp_path / "hf").exists()
    config = tmp_path / "tiny.yaml"  # resuming from it (an FSDP2 run's --ckpt_path) is refused the same way
    config.write_text(TINY_CONFIG.format(root=tmp_path / "run", corpus=write_corpus(tmp_path / "corpus.txt")))
    line = one_line_error("fit", "--config", str(config), "--ckpt_path", str(tmp_path / "ck"))
    assert "refusing" in line and "run code" in line, line
    assert not marker.exists()
