"""``--trainer.strategy=xla`` (Lightning's multi-process XLAStrategy) from the CLI up to its spawn: torch_xla's
``xmp.spawn`` pickles the launched function and the Trainer, so everything the CLI puts into the Trainer must pickle.
(The spawned workers themselves die on XLA:CPU on this machine, as those of a bare ``xmp.spawn`` do: they are not run.)
"""

from __future__ import annotations

import pickle

from tests_xla.helpers import REPO, run_cli


def test_cli_trainer_with_xla_strategy_pickles_for_spawn(tmp_path, monkeypatch, xla_cpu):
    from lightning.pytorch.strategies import XLAStrategy
    from lightning.pytorch.strategies.launchers.xla import _XLALauncher

    monkeypatch.setenv("CPU_NUM_DEVICES", "2")
    seen = {}

    def launch(self, function, *args, trainer=None, **kwargs):
        seen["strategy"] = trainer.strategy
        seen["bytes"] = len(pickle.dumps((function, args, kwargs)))  # what xmp.spawn sends to its workers
        seen["trainer"] = pickle.loads(pickle.dumps(trainer))

    monkeypatch.setattr(_XLALauncher, "launch", launch)
    run_cli(["fit", "--config", str(REPO / "tests_xla/configs/causal.yaml"), "--trainer.accelerator=tpu",
             "--trainer.strategy=xla", "--trainer.devices=2", f"--trainer.default_root_dir={tmp_path}",
             f"--data.init_args.cache_dir={tmp_path}/cache", "--trainer.max_steps=1"])
    assert isinstance(seen["strategy"], XLAStrategy) and seen["strategy"].num_processes == 2
    assert seen["bytes"] > 0 and seen["trainer"].max_steps == 1
