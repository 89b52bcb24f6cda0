"""Two "nodes" on localhost: two ``lit-longctx fit`` processes with ``--trainer.num_nodes 2`` and NODE_RANK 0 / 1
meeting at MASTER_ADDR=127.0.0.1 (Lightning's own multi-node launch, as under SLURM or torchrun), with DDP and FSDP2.
Oracle: a single-node run of the same global batch (1 node x 2 processes x 4 rows) ends with the same weights, bit
for bit: the ranks, their data shards and the gradient all-reduce are the same, only the rendezvous differs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.cli_helpers import REPO, run_subprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(args: list[str], cwd) -> None:
    port = str(_free_port())
    procs = []
    for node in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "NODE_RANK": str(node)}
        procs.append(subprocess.Popen([sys.executable, "-m", "lit_longctx.cli", "fit", *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1] or "MEMBER: 2/2" in outs[0] + outs[1], outs[1][-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_nodes_on_localhost_match_a_single_node_run_with_the_same_global_batch(strategy, config, tmp_path):
    from lit_longctx.checkpoint import read_checkpoint

    common = ["--config", str(config), "--trainer.val_check_interval=4", "--model.init_args.decay_steps=4"]
    common += ["--config", str(REPO / "configs/strategy" / f"{strategy}.yaml")]
    run_subprocess(["fit", *common, "--trainer.devices=2", "--trainer.default_root_dir", str(tmp_path / "one"),
                    "--trainer.callbacks.init_args.dirpath", str(tmp_path / "one")], tmp_path)
    _two_nodes([*common, "--trainer.num_nodes=2", "--trainer.devices=1",
                "--trainer.default_root_dir", str(tmp_path / "two"),
                "--trainer.callbacks.init_args.dirpath", str(tmp_path / "two")], tmp_path)
    runs = {}
    for name in ("one", "two"):
        last = tmp_path / name / "last.ckpt"
        meta = torch.load(last / "meta.pt" if last.is_dir() else last, map_location="cpu", weights_only=True)
        assert meta["global_step"] == 4
        assert meta["lit_longctx"]["tokens_seen"] == 4 * 2 * 4 * 32  # steps x ranks x rows x tokens
        runs[name] = read_checkpoint(last).state_dict
    assert runs["one"].keys() == runs["two"].keys()
    for k, v in runs["one"].items():
        assert torch.equal(runs["two"][k], v), k
