"""The resumable training order of LongCtxDataModule: sharding by rank and worker, state, resume through a Trainer."""

import itertools
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_longctx.datamodules.base import LongCtxDataModule, ResumableLoader, SampleStream, global_batch_tokens


class IndexStream(SampleStream):
    """Sample ``i`` of epoch ``e`` is the pair (e, i): what a batch holds says exactly where it came from."""

    def __init__(self, n: int, seed: int = 7, shuffle: bool = False) -> None:
        super().__init__(seed=seed, shuffle=shuffle)
        self.n = n

    @property
    def num_samples(self) -> int:
        return self.n

    def get_sample(self, epoch: int, index: int) -> dict:
        return {"epoch": torch.tensor(epoch), "index": torch.tensor(index)}


class IndexData(LongCtxDataModule):
    def __init__(self, n: int = 10, batch_size: int = 2, shuffle: bool = True, seed: int = 7, num_workers: int = 0):
        super().__init__("byte", seq_len=4, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.n, self.shuffle = n, shuffle

    def train_stream(self) -> IndexStream:
        return IndexStream(self.n, self.seed, self.shuffle)


def pairs(batch: dict) -> list[tuple[int, int]]:
    return list(zip(batch["epoch"].tolist(), batch["index"].tolist()))


def take(loader, k: int) -> list[list[tuple[int, int]]]:
    """k batches, iterating the loader again when an epoch ends (as the Trainer does)."""
    out = []
    while len(out) < k:
        for batch in loader:
            out.append(pairs(batch))
            if len(out) == k:
                break
    return out


def test_epoch_order_is_a_seeded_permutation():
    a, b = IndexStream(50, seed=3, shuffle=True), IndexStream(50, seed=3, shuffle=True)
    order0 = [a.sample_at(0, k)["index"].item() for k in range(50)]
    assert sorted(order0) == list(range(50))
    assert order0 == [b.sample_at(0, k)["index"].item() for k in range(50)]
    assert order0 != [a.sample_at(1, k)["index"].item() for k in range(50)]
    assert order0 != [IndexStream(50, seed=4, shuffle=True).sample_at(0, k)["index"].item() for k in range(50)]
    # positions past the end of the epoch (padding) start over from its first positions
    assert [a.sample_at(0, 50 + k)["index"].item() for k in range(3)] == order0[:3]


def test_ranks_get_disjoint_interleaved_samples():
    stream = IndexStream(12)  # unshuffled: position k holds sample k
    per_rank = []
    for rank in range(2):
        loader = ResumableLoader(stream, batch_size=2, rank=rank, world_size=2)
        assert len(loader) == 3
        per_rank.append([p[1] for batch in loader for p in pairs(batch)])
    # rank r holds r, r+W, r+2W, ... ; its batch b holds its samples 2b, 2b+1
    assert per_rank == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    # an epoch that does not fill the last global batch is padded from its start
    padded = [[p[1] for b in ResumableLoader(IndexStream(9), 2, rank=r, world_size=2) for p in pairs(b)]
              for r in range(2)]
    assert padded == [[0, 2, 4, 6, 8, 1], [1, 3, 5, 7, 0, 2]]


def test_rank_comes_from_torch_distributed_or_the_trainer(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    loader = ResumableLoader(IndexStream(9), batch_size=1)
    assert [pairs(b)[0][1] for b in loader] == [1, 4, 7]
    # the Trainer's strategy wins (it knows the data-parallel mesh of tensor-parallel runs)
    dm = IndexData(n=8, batch_size=1, shuffle=False)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 4, "rank": 2}))
    assert [pairs(b)[0][1] for b in dm.train_dataloader()] == [2, 6]


def test_workers_give_the_same_batches_as_the_main_process():
    stream = IndexStream(10, shuffle=True)  # 5 batches of 2: uneven across 2 workers
    main = [pairs(b) for b in ResumableLoader(stream, batch_size=2, num_workers=0)]
    workers = [pairs(b) for b in ResumableLoader(stream, batch_size=2, num_workers=2)]
    assert workers == main
    assert sorted(p[1] for batch in main for p in batch) == list(range(10))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("k", [3, 5, 7])  # mid-epoch, exactly at the end of epoch 0, inside epoch 1
def test_resume_continues_with_the_next_batch(k, num_workers):
    stream = IndexStream(10, shuffle=True)
    uninterrupted = take(ResumableLoader(stream, 2), 12)
    assert [b[0][0] for b in uninterrupted] == [0] * 5 + [1] * 5 + [2] * 2  # epochs advance every 5 batches
    first = ResumableLoader(IndexStream(10, shuffle=True), 2, num_workers=num_workers)
    assert take(first, k) == uninterrupted[:k]
    state = first.state_dict()
    resumed = ResumableLoader(IndexStream(10, shuffle=True), 2, num_workers=num_workers)
    resumed.load_state_dict(state)
    assert take(resumed, 12 - k) == uninterrupted[k:]


def test_resume_with_another_batch_size_and_world_size():
    stream = IndexStream(24)
    first = ResumableLoader(stream, batch_size=2, rank=0, world_size=1)
    take(first, 3)  # the job consumed positions 0..5
    state = first.state_dict()
    nxt = []
    for rank in range(2):
        loader = ResumableLoader(IndexStream(24), batch_size=1, rank=rank, world_size=2)
        loader.load_state_dict(state)
        nxt.append(take(loader, 2))
    assert sorted(p[1] for batches in nxt for b in batches for p in b) == [6, 7, 8, 9]


def test_state_mismatches_are_clear_errors():
    state = ResumableLoader(IndexStream(10), 2).state_dict() | {"samples": 4}
    with pytest.raises(ValueError, match="seed=7.*set seed=7"):
        ResumableLoader(IndexStream(10, seed=8), 2).load_state_dict(state)
    with pytest.raises(ValueError, match="10 training samples per epoch but this data has 20"):
        ResumableLoader(IndexStream(20), 2).load_state_dict(state)
    with pytest.raises(ValueError, match="not a multiple of the global batch 3 x 1"):
        ResumableLoader(IndexStream(10), 3).load_state_dict(state)
    lenient = ResumableLoader(IndexStream(20), 2)
    lenient.load_state_dict(state, strict=False)  # same fraction (4/10) of the longer epoch
    assert (lenient.epoch, lenient.batch) == (0, 4)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        ResumableLoader(IndexStream(10), 2, rank=2, world_size=2)


def test_datamodule_state_reaches_the_next_loader():
    dm = IndexData()
    loader = dm.train_dataloader()
    seen = take(loader, 3)
    state = dm.state_dict()
    assert state == {"train_loader": loader.state_dict()}
    # a rebuilt loader (reload_dataloaders_every_n_epochs) continues the stream
    assert take(dm.train_dataloader(), 1) == take(ResumableLoader(IndexStream(10, shuffle=True), 2), 4)[3:]
    fresh = IndexData()
    fresh.load_state_dict(state)  # restored before any loader exists
    assert fresh.state_dict() == state
    assert take(fresh.train_dataloader(), 2) == take(IndexData().train_dataloader(), 5)[3:]
    assert seen == take(IndexData().train_dataloader(), 3)


def test_base_arguments_and_missing_split_errors():
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1, got 0"):
        LongCtxDataModule(seq_len=0)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        LongCtxDataModule(num_workers=-1)
    dm = IndexData()
    assert dm.vocab_size == 259 and dm.max_token_id is None
    assert dm.val_dataloader() == []
    with pytest.raises(RuntimeError, match="no held-out split"):
        dm.test_dataloader()
    with pytest.raises(NotImplementedError, match="train_stream"):
        LongCtxDataModule().train_dataloader()


def test_global_batch_tokens_llemma():
    # spec oracle 14: both Llemma configurations step on 4M tokens
    assert global_batch_tokens(4096, 256, 4, grad_accum=2, tensor_parallel=2) == 4_194_304
    assert global_batch_tokens(4096, 256, 2, grad_accum=16, tensor_parallel=8) == 4_194_304
    with pytest.raises(ValueError, match="not a multiple"):
        global_batch_tokens(4096, 6, 1, tensor_parallel=4)


class Recorder(L.LightningModule):
    """Records the (epoch, index) pairs of every training batch."""

    def __init__(self, estimate_steps: bool = False) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list = []
        self.estimate_steps = estimate_steps

    def training_step(self, batch, batch_idx):
        self.seen.append(pairs(batch))
        return (self.w * batch["index"].float()).sum()

    def configure_optimizers(self):
        if self.estimate_steps:  # builds the train loader before Lightning restores loader states (Lightning #20550)
            assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, max_steps, callbacks=()):
    # max_epochs set explicitly so that estimated_stepping_batches has to build the train loader
    return L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, max_epochs=100, accelerator="cpu", devices=1,
                     logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, callbacks=list(callbacks), enable_checkpointing=bool(callbacks))


@pytest.mark.parametrize("estimate_steps", [False, True])
def test_trainer_resume_sees_the_same_batches(tmp_path, estimate_steps):
    n_steps, saves = 13, (5, 7)  # 5 batches per epoch: a save at the end of an epoch and one mid-epoch
    full = Recorder(estimate_steps)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    _trainer(tmp_path, n_steps, [ckpt]).fit(full, datamodule=IndexData(n=10, batch_size=2))
    assert len(full.seen) == n_steps
    assert sorted(p[1] for batch in full.seen[:5] for p in batch) == list(range(10))  # one epoch: every sample once
    for step in saves:
        resumed = Recorder(estimate_steps)
        _trainer(tmp_path / f"resume{step}", n_steps).fit(
            resumed, datamodule=IndexData(n=10, batch_size=2), ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt"
        )
        assert resumed.seen == full.seen[step:], f"resumed from step {step}"


def test_trainer_resume_with_workers(tmp_path):
    full = Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    _trainer(tmp_path, 6, [ckpt]).fit(full, datamodule=IndexData(n=8, batch_size=2, num_workers=2))
    resumed = Recorder()
    _trainer(tmp_path / "resume", 6).fit(resumed, datamodule=IndexData(n=8, batch_size=2, num_workers=2),
                                         ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    assert resumed.seen == full.seen[3:]
    assert list(itertools.chain(*full.seen[:4])) != list(itertools.chain(*full.seen[4:]))  # epochs reshuffle
