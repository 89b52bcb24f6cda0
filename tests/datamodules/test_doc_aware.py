"""FoT document-aware pipelines (spec fot.md §2, oracles 8-10): row streams, the tiny worked example, k-packing,
resumable state; and DocAwareData: its batches, passkey documents, resuming through a Trainer, rank sharding.
The pipeline oracles are an independent length-only simulation of the refill rule and hand-written batches."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_longctx.datamodules.doc_aware import (
    DocAware,
    DocAwareData,
    DocAwareLoader,
    DocumentStream,
    KPacking,
    Linear,
    build_pipeline,
    parse_pipeline,
)
from lit_longctx.datamodules.passkey import PasskeyDocuments
from lit_longctx.datamodules.text import held_out
from lit_longctx.tokenizers import load_tokenizer

BOS, EOS = 1, 2


def random_documents(n: int, seed: int = 0, max_len: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 100) for _ in range(rng.randrange(0, max_len))] for _ in range(n)]


def assigned_documents(lengths: list[int], batch: int, seq_len: int, steps: int) -> list[list[int]]:
    """Which documents each row takes: every step, rows 0..B-1 in order, a row with fewer than T+1 buffered tokens
    takes the next document until it has T+1; then T tokens leave the row. Counts lengths only."""
    held = [0] * batch
    rows: list[list[int]] = [[] for _ in range(batch)]
    nxt = 0
    for _ in range(steps):
        for r in range(batch):
            while held[r] < seq_len + 1:
                rows[r].append(nxt)
                held[r] += lengths[nxt] + 2
                nxt += 1
            held[r] -= seq_len
    return rows


@pytest.mark.parametrize("batch, seq_len", [(1, 5), (3, 7), (4, 16)])
def test_rows_reproduce_their_documents(batch, seq_len):
    """Oracle 8."""
    docs = random_documents(200, seed=batch)
    steps = 12
    pipe = DocAware(docs, batch, seq_len, bos_id=BOS, eos_id=EOS, loop=False)
    batches = [next(pipe) for _ in range(steps)]
    rows = assigned_documents([len(d) for d in docs], batch, seq_len, steps)
    used = [i for row in rows for i in row]
    assert sorted(used) == list(range(len(used)))  # every document exactly once, in source order across rows
    assert pipe.metrics() == {"dataset_example_index": len(used), "dataset_total_tokens": steps * batch * seq_len}
    for r in range(batch):
        last = batches[-1]["labels"][r, -1].item()
        stream = torch.cat([b["input_ids"][r] for b in batches]).tolist() + [BOS if last == -100 else last]
        expected = [t for i in rows[r] for t in [BOS, *docs[i], EOS]]
        assert stream == expected[: len(stream)]
    for s, b in enumerate(batches):
        targets = torch.where(b["labels"] == -100, BOS, b["labels"])  # the only masked target is a bos
        assert torch.equal(targets[:, :-1], b["input_ids"][:, 1:])
        if s + 1 < steps:
            assert torch.equal(targets[:, -1], batches[s + 1]["input_ids"][:, 0])
        assert torch.equal(b["loss_mask"] == 0, targets == BOS)
        assert torch.equal(b["labels"] == -100, b["loss_mask"] == 0)


def test_tiny_worked_example():
    """Oracle 9: T=3, B=1, documents A=[a1..a4], B'=[b1], then C."""
    a1, a2, a3, a4, b1, c1 = 11, 12, 13, 14, 21, 31
    pipe = DocAware([[a1, a2, a3, a4], [b1], [c1]], 1, 3, bos_id=BOS, eos_id=EOS)
    steps = [next(pipe) for _ in range(3)]
    assert steps[0]["input_ids"].tolist() == [[BOS, a1, a2]] and steps[0]["labels"].tolist() == [[a1, a2, a3]]
    assert steps[1]["input_ids"].tolist() == [[a3, a4, EOS]] and steps[1]["labels"].tolist() == [[a4, EOS, -100]]
    assert steps[1]["loss_mask"].tolist() == [[1, 1, 0]]
    assert steps[2]["input_ids"].tolist() == [[BOS, b1, EOS]] and steps[2]["labels"].tolist() == [[b1, EOS, -100]]
    assert next(pipe)["input_ids"].tolist() == [[BOS, c1, EOS]]  # C's bos was step 2's last target


@pytest.mark.parametrize("k", [1, 2, 4])
def test_k_packing_is_a_reshaped_inner_pipeline(k):
    """Oracle 10."""
    docs = random_documents(300, seed=k, max_len=50)
    packed = KPacking(docs, 8, 6, k, bos_id=BOS, eos_id=EOS)
    inner = DocAware(docs, 8 // k, 6 * k, bos_id=BOS, eos_id=EOS)
    for _ in range(5):
        got, want = next(packed), next(inner)
        assert got["input_ids"].shape == (8, 6)  # B·T tokens per step
        for name in ("input_ids", "labels", "loss_mask"):
            for p in range(8 // k):
                assert torch.equal(got[name][p * k : (p + 1) * k].reshape(-1), want[name][p])
    assert packed.metrics()["dataset_total_tokens"] == 5 * 8 * 6


def test_parse_and_build_pipeline():
    assert parse_pipeline("doc_aware_k4") == ("doc_aware", 4)
    assert parse_pipeline("doc_aware_k1") == ("doc_aware", 1)
    assert parse_pipeline("doc_aware") == ("doc_aware", 1)
    assert parse_pipeline("linear") == ("linear", 1)
    for bad in ("doc_aware_k", "doc_aware_k0", "doc_aware_kx", "docaware", "linear_k2"):
        with pytest.raises(ValueError, match="unknown data_pipeline"):
            parse_pipeline(bad)
    docs = random_documents(50)
    assert isinstance(build_pipeline("doc_aware_k2", docs, 4, 5, bos_id=BOS, eos_id=EOS), KPacking)
    assert isinstance(build_pipeline("doc_aware_k1", docs, 4, 5, bos_id=BOS, eos_id=EOS), DocAware)
    assert isinstance(build_pipeline("linear", docs, 4, 5, bos_id=BOS, eos_id=EOS), Linear)
    with pytest.raises(ValueError, match="divisible by k=4"):
        build_pipeline("doc_aware_k4", docs, 6, 5, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="needs a bos_id"):
        DocAware(docs, 2, 5, eos_id=EOS)


def test_linear_is_one_stream():
    docs = random_documents(100, seed=3)
    pipe = Linear(docs, 3, 5, bos_id=BOS, eos_id=EOS, loop=False)
    batches = [next(pipe) for _ in range(4)]
    flat = torch.cat([b["input_ids"].reshape(-1) for b in batches]).tolist()
    assert flat == [t for d in docs for t in [BOS, *d, EOS]][: len(flat)]


@pytest.mark.parametrize("name", ["doc_aware", "doc_aware_k2", "linear"])
def test_resume_from_state(name):
    docs = random_documents(12, seed=5)  # few documents: the source loops during the run
    kwargs = dict(bos_id=BOS, eos_id=EOS, min_example_length=4)
    pipe = build_pipeline(name, docs, 4, 9, **kwargs)
    for _ in range(7):
        next(pipe)
    state = pipe.state_dict()
    expected = [next(pipe) for _ in range(8)]
    resumed = build_pipeline(name, docs, 4, 9, **kwargs)
    resumed.load_state_dict(state)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
               for a, b in zip(expected, (next(resumed) for _ in range(8))))
    assert resumed.metrics() == pipe.metrics()
    assert pipe.stream.epoch >= 1
    # a callable source restarts at the saved offset without re-reading
    starts = []
    by_offset = lambda start: (starts.append(start), iter(docs[start:]))[1]
    resumed = build_pipeline(name, by_offset, 4, 9, **kwargs)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)["input_ids"], expected[0]["input_ids"]) and starts[0] == state_offset(state)


def state_offset(state: dict) -> int:
    inner = state.get("inner", state)
    return inner["stream"]["offset"]


def test_document_stream_options():
    stream = DocumentStream([[5, 6], [7], [], [8, 9, 10]], BOS, EOS, min_example_length=4, loop=False)
    assert stream.next() == ([BOS, 5, 6, EOS], [0, 1, 1, 1])
    assert stream.next() == ([BOS, 8, 9, 10, EOS], [0, 1, 1, 1, 1])  # [7] and [] are shorter than 4 with bos/eos
    with pytest.raises(StopIteration):
        stream.next()
    bare = DocumentStream([[5, 6]], None, None, add_bos=False, add_eos=False)
    assert bare.next() == ([5, 6], [1, 1]) and bare.next() == ([5, 6], [1, 1]) and bare.epoch == 1
    with pytest.raises(ValueError, match="no document of at least"):
        DocumentStream([[1]], BOS, EOS, min_example_length=10).next()
    pad = DocAware([[5, 6, 7]], 1, 4, bos_id=BOS, eos_id=EOS, pad=True)
    b = next(pad)
    assert b["input_ids"].tolist() == [[BOS, 5, 6, 7]] and b["labels"].tolist() == [[5, 6, 7, EOS]]
    b = next(pad)  # the document was padded to 8 tokens: eos, 3 pads (loss 0), then the next copy's bos
    assert b["input_ids"].tolist() == [[EOS, 0, 0, 0]] and b["loss_mask"].tolist() == [[0, 0, 0, 0]]
    with pytest.raises(ValueError, match="batch_size=3"):
        DocAware([[1]], 3, 2, bos_id=BOS, eos_id=EOS).load_state_dict(DocAware([[1]], 2, 2, bos_id=BOS,
                                                                                 eos_id=EOS).state_dict())


# ---------------------------------------------------------------------------------------------------- DocAwareData
# The oracle of every DataModule test: the documents written independently (file order, held-out split, byte
# encoding, the passkey generator, the blend rule of the docstring), run through the pipeline classes above (oracles
# 8-10).
BYTE_BOS, BYTE_EOS = 256, 257


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """20 documents of real English of different lengths, and the jsonl holding them."""
    from pydoc_data.topics import topics

    docs = [text[: 150 + 37 * i] for i, text in enumerate(list(topics.values())[:20])]
    path = tmp_path_factory.mktemp("doc_aware") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path, docs


def make_data(texts, tmp_path, **kwargs):
    path, _ = texts
    args = dict(sources=[str(path)], tokenizer="byte", seq_len=16, batch_size=4, cache_dir=str(tmp_path / "cache"),
                val_docs=4, shuffle=False)
    args.update(kwargs)
    dm = DocAwareData(**args)
    dm.setup("fit")
    return dm


def training_texts(texts) -> list[str]:
    _, docs = texts
    mask = held_out(len(docs), 0.0, 4)
    return [d for i, d in enumerate(docs) if not mask[i]]


def take(loader, n: int) -> list[dict]:
    out = []
    while len(out) < n:  # iterate again when an epoch ends, as the Trainer does
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def same_batches(a: list[dict], b: list[dict]) -> bool:
    """``a``'s batches hold ``b``'s tensors (a mixture's batches also count tokens per source)."""
    return len(a) == len(b) and all(torch.equal(x[key], y[key]) for x, y in zip(a, b) for key in y)


@pytest.mark.parametrize("pipeline", ["doc_aware_k2", "doc_aware", "linear"])
def test_datamodule_yields_the_pipeline_batches(texts, tmp_path, pipeline):
    dm = make_data(texts, tmp_path, data_pipeline=pipeline)
    docs = [list(t.encode()) for t in training_texts(texts)]
    expected = build_pipeline(pipeline, docs, 4, 16, bos_id=BYTE_BOS, eos_id=BYTE_EOS)
    n = 3 * len(dm.train_dataloader())  # past the end of a pass: the source loops, rows carry on
    assert same_batches(take(dm.train_dataloader(), n), [next(expected) for _ in range(n)])
    assert dm.dataset_packing == parse_pipeline(pipeline)[1] and dm.eval_dataset_packing == 1


def test_passkey_documents_are_blended_in(texts, tmp_path):
    """passkey_fraction 0.5 alternates text and passkey documents (the blend gives ties to the first source); with
    labels 'answer' only a passkey document's answer (and its EOS) are targets."""
    dm = make_data(texts, tmp_path, passkey_fraction=0.5, passkey_lengths=(300, 420), passkey_labels="answer",
                   data_pipeline="doc_aware_k2")
    generator = PasskeyDocuments(load_tokenizer("byte"), (300, 420), seed=1234, bos=False, eos=False)
    docs = []
    for i, text in enumerate(training_texts(texts)):
        record = generator.record(i)
        mask = [0] * record.answer_start + [1] * (len(record.input_ids) - record.answer_start)
        docs += [list(text.encode()), {"input_ids": record.input_ids, "loss_mask": mask}]
    expected = build_pipeline("doc_aware_k2", docs, 4, 16, bos_id=BYTE_BOS, eos_id=BYTE_EOS)
    got = take(dm.train_dataloader(), 40)
    assert same_batches(got, [next(expected) for _ in range(40)])
    # pack 0 starts with text 0 (every target kept), pack 1 with passkey document 0 (only the answer and EOS kept)
    kept = [torch.cat([b["labels"][rows][b["labels"][rows] != -100] for b in got]).tolist()
            for rows in (slice(0, 2), slice(2, 4))]
    first = list(training_texts(texts)[0].encode()) + [BYTE_EOS]
    answer = list(f" {generator.record(0).answer}.".encode()) + [BYTE_EOS]
    assert kept[0][: len(first)] == first and kept[1][: len(answer)] == answer


def test_resume_through_a_trainer_gives_the_same_batches(texts, tmp_path):
    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input_ids"].clone())
            return self.w * batch["input_ids"].float().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(root, steps, ckpt_path=None, callbacks=()):
        module = Recorder()
        trainer = L.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", logger=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=list(callbacks), enable_checkpointing=bool(callbacks))
        data = make_data(texts, tmp_path, data_pipeline="doc_aware_k2", passkey_fraction=0.3,
                         passkey_lengths=(300, 400))
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module.seen

    epoch = len(make_data(texts, tmp_path, data_pipeline="doc_aware_k2", passkey_fraction=0.3,
                          passkey_lengths=(300, 400)).train_dataloader())
    steps = epoch + 4
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    full = fit(tmp_path / "full", steps, callbacks=[ckpt])
    for step in (3, epoch + 1):  # mid-epoch, and in the second epoch
        resumed = fit(tmp_path / f"resume{step}", steps, ckpt_path=tmp_path / "ckpt" / f"step={step}.ckpt")
        assert len(resumed) == steps - step and all(torch.equal(a, b) for a, b in zip(resumed, full[step:]))


def test_ranks_read_interleaved_documents_in_whole_packs(texts, tmp_path):
    """Rank r of 2 runs its own doc_aware_k2 pipeline over documents r, r+2, ...: its batches are whole packs of its
    documents; the two ranks' states in one checkpoint restore each rank."""
    docs = [list(t.encode()) for t in training_texts(texts)]
    loaders = []
    for rank in (0, 1):
        dm = make_data(texts, tmp_path, data_pipeline="doc_aware_k2")
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2,
                                                                                           "rank": rank}))
        loader = dm.train_dataloader()
        expected = build_pipeline("doc_aware_k2", docs[rank::2], 4, 16, bos_id=BYTE_BOS, eos_id=BYTE_EOS)
        assert same_batches(take(loader, 5), [next(expected) for _ in range(5)])
        loaders.append((dm, loader, expected))
    assert len(loaders[0][1]) == len(loaders[1][1])  # both ranks agree on the epoch length
    state = loaders[0][1].local_state()
    state["ranks"].update(loaders[1][1].local_state()["ranks"])  # what the gathered checkpoint holds
    for rank, (dm, _, expected) in enumerate(loaders):
        fresh = make_data(texts, tmp_path, data_pipeline="doc_aware_k2")
        fresh.trainer = dm.trainer
        fresh.load_state_dict({"train_loader": state})
        assert same_batches(take(fresh.train_dataloader(), 4), [next(expected) for _ in range(4)]), rank


def test_a_worker_process_gives_the_same_batches_and_state(texts, tmp_path):
    main = make_data(texts, tmp_path, data_pipeline="doc_aware_k2").train_dataloader()
    worker = make_data(texts, tmp_path, data_pipeline="doc_aware_k2", num_workers=1).train_dataloader()
    assert same_batches(take(worker, 6), take(main, 6))
    assert worker.local_state() == main.local_state()


def test_state_of_other_settings_is_a_clear_error(texts, tmp_path):
    loader = make_data(texts, tmp_path, data_pipeline="doc_aware_k2").train_dataloader()
    take(loader, 2)
    state = loader.local_state()
    other = make_data(texts, tmp_path, data_pipeline="doc_aware_k2", batch_size=6).train_dataloader()
    with pytest.raises(ValueError, match="batch_size=4 \\(now 6\\).*resume with the data settings"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="2 data-parallel ranks \\(now 1\\)"):
        loader.load_state_dict({**state, "world_size": 2})
    other.load_state_dict(state, strict=False)  # a rebuilt loader with new settings starts afresh
    assert (other.epoch, other.batch) == (0, 0)


def test_evaluation_batches(texts, tmp_path):
    """eval_pipeline over the held-out documents (looping) for as many batches as hold their tokens (BOS/EOS counted)
    once, split by whole batches across ranks in lockstep."""
    _, all_texts = texts
    mask = held_out(len(all_texts), 0.0, 4)
    held = [list(t.encode()) for i, t in enumerate(all_texts) if mask[i]]
    n = -(-sum(len(d) + 2 for d in held) // (4 * 16))
    pipeline = build_pipeline("doc_aware_k2", held, 4, 16, bos_id=BYTE_BOS, eos_id=BYTE_EOS)
    expected = [next(pipeline) for _ in range(n)]
    dm = make_data(texts, tmp_path, eval_pipeline="doc_aware_k2")
    assert same_batches(list(dm.val_dataloader()), expected) and n > 2
    assert same_batches(list(dm.test_dataloader()), expected)  # the same batches every time
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2,
                                                                                           "rank": rank}))
        assert same_batches(list(dm.val_dataloader()), expected[rank : n // 2 * 2 : 2])


def test_datamodule_errors(texts, tmp_path):
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by k=4 of data_pipeline='doc_aware_k4'"):
        make_data(texts, tmp_path, data_pipeline="doc_aware_k4", batch_size=6)
    with pytest.raises(ValueError, match="not divisible by k=4 of eval_pipeline"):
        make_data(texts, tmp_path, eval_pipeline="doc_aware_k4", batch_size=6)
    with pytest.raises(ValueError, match="num_workers=2.*use 0 or 1"):
        make_data(texts, tmp_path, num_workers=2)
    with pytest.raises(ValueError, match="one per source \\(1\\)"):
        make_data(texts, tmp_path, min_example_length=[1, 2])
    with pytest.raises(ValueError, match="passkey_fraction must lie in"):
        make_data(texts, tmp_path, passkey_fraction=1.5)
    with pytest.raises(ValueError, match="unknown data_pipeline"):
        make_data(texts, tmp_path, data_pipeline="doc_aware_k")
    with pytest.raises(ValueError, match="no document of at least min_example_length=100000"):
        make_data(texts, tmp_path, min_example_length=100000).train_dataloader()
    with pytest.raises(ValueError, match="num_workers=3"):
        DocAwareLoader(DocAware([[1]], 1, 2, bos_id=1, eos_id=2), 1, num_workers=3)


def test_min_example_length_skips_short_documents(texts, tmp_path):
    dm = make_data(texts, tmp_path, min_example_length=400, data_pipeline="doc_aware")
    docs = [list(t.encode()) for t in training_texts(texts) if len(t.encode()) + 2 >= 400]
    expected = build_pipeline("doc_aware", docs, 4, 16, bos_id=BYTE_BOS, eos_id=BYTE_EOS)
    assert same_batches(take(dm.train_dataloader(), 30), [next(expected) for _ in range(30)])
