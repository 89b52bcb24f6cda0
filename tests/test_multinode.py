"""Two "nodes" on localhost: two ``lit-longctx fit`` processes with ``--trainer.num_nodes 2`` and NODE_RANK 0 / 1
meeting at MASTER_ADDR=127.0.0.1 (Lightning's own multi-node launch, as under SLURM or torchrun), with DDP and FSDP2.
Oracle: one process training the same global batch (2 nodes x 4 rows = one device x 8 rows; the stream gives rank r
positions r, r+2, ... so both see the same samples per step) ends with the same weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.cli_helpers import REPO, run


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
def test_two_nodes_on_localhost_match_one_process_with_the_same_global_batch(strategy, config, tmp_path):
    from lit_longctx.checkpoint import read_checkpoint

    common = ["--config", str(config), "--trainer.val_check_interval=4", "--model.init_args.decay_steps=4"]
    single = run("fit", *common, "--data.init_args.batch_size=8", "--trainer.default_root_dir", str(tmp_path / "one"),
                 "--trainer.callbacks.init_args.dirpath", str(tmp_path / "one"))
    strategy_args = (["--config", str(REPO / "configs/strategy/fsdp2.yaml")] if strategy == "fsdp2"
                     else ["--config", str(REPO / "configs/strategy/ddp.yaml")])
    _two_nodes([*common, *strategy_args, "--trainer.num_nodes=2", "--trainer.devices=1",
                "--trainer.default_root_dir", str(tmp_path / "two"),
                "--trainer.callbacks.init_args.dirpath", str(tmp_path / "two")], tmp_path)
    last = tmp_path / "two" / "last.ckpt"
    two = read_checkpoint(last)
    meta = torch.load(last / "meta.pt" if last.is_dir() else last, map_location="cpu", weights_only=True)
    assert meta["global_step"] == single.trainer.global_step == 4
    assert meta["lit_longctx"]["tokens_seen"] == single.model.tokens_seen == 4 * 8 * 32  # both nodes counted
    reference = single.model.model.state_dict()
    assert two.state_dict.keys() == reference.keys()
    for k, v in reference.items():
        torch.testing.assert_close(two.state_dict[k], v, rtol=1e-5, atol=1e-6, msg=k)
