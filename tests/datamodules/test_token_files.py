"""TokenFiles: the token-file format, training windows (spec oracle 12), validation windows, positions, errors."""

import json
import struct

import numpy as np
import pytest
import torch

from lit_longctx.datamodules import ResumableLoader, TokenFiles, TokenFileWriter, write_token_files
from lit_longctx.datamodules.token_files import token_dtype


def rows(loader) -> list[dict]:
    return [{k: v[i] for k, v in batch.items()} for batch in loader for i in range(len(batch["input_ids"]))]


def reference_positions(start: int, length: int, doc_starts: set[int], n: int) -> list[int]:
    """Slow reference: 0 at the row start and at every document start, else previous + 1."""
    out = []
    for t in range(length):
        out.append(0 if t == 0 or (start + t) % n in doc_starts else out[-1] + 1)
    return out


def test_dtype_follows_the_vocabulary():
    assert token_dtype(32_000) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(128_256) == np.uint32


def test_files_are_raw_little_endian_with_a_sidecar(tmp_path):
    docs = [[5, 1, 2], [65_535, 0], [7]]
    write_token_files(tmp_path / "a", {"train": docs}, vocab_size=65_536)
    raw = (tmp_path / "a" / "train.bin").read_bytes()
    assert raw == struct.pack("<6H", 5, 1, 2, 65_535, 0, 7)
    assert np.load(tmp_path / "a" / "train.docs.npy").tolist() == [0, 3, 5]
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 65_536 and meta["tokenizer"] is None
    assert meta["splits"]["train"] == {"file": "train.bin", "num_tokens": 6, "max_token_id": 65_535,
                                     "num_docs": 3, "docs_file": "train.docs.npy"}

    write_token_files(tmp_path / "b", {"train": np.array([70_000, 3])}, tokenizer=None, vocab_size=70_001)
    assert (tmp_path / "b" / "train.bin").read_bytes() == struct.pack("<2I", 70_000, 3)
    assert not (tmp_path / "b" / "train.docs.npy").exists()
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["dtype"] == "uint32"

    write_token_files(tmp_path / "c", {"train": np.arange(10)}, tokenizer="byte")
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["tokenizer"]["spec"] == "byte" and meta["vocab_size"] == 259
    dm = TokenFiles(str(tmp_path / "c"), seq_len=4)  # tokenizer and vocabulary come from the sidecar
    assert dm.vocab_size == 259 and dm.tokenizer.kind == "byte" and dm.max_token_id == 9


def test_writer_rejects_ids_outside_the_vocabulary(tmp_path):
    with TokenFileWriter(tmp_path / "train.bin", vocab_size=259) as writer:
        writer.add([1, 2])
        with pytest.raises(ValueError, match="token id 300 is outside the vocabulary 0..258"):
            writer.add([300])
        with pytest.raises(ValueError, match="token id -1 is outside"):
            writer.add([-1])


def test_oracle_12_sequential_rank_sharded_samples(tmp_path):
    n, t, world = 23, 4, 2
    stream = (np.arange(n) * 7 + 3).astype(np.uint16)  # distinct, non-positional values
    write_token_files(tmp_path, {"train": stream}, vocab_size=1000)
    dm = TokenFiles(str(tmp_path), tokenizer=None, seq_len=t, batch_size=1, train_order="sequential")
    stream_obj = dm.train_stream()
    # ALLaMo: pad the stream to a multiple of W·(T+1) with tokens from its start; samples of T+1 tokens
    padded = np.concatenate([stream, stream[: -n % (world * (t + 1))]])
    samples = padded.reshape(-1, t + 1)
    assert len(samples) == -(-n // (world * (t + 1))) * world == 6
    for rank in range(world):
        got = rows(ResumableLoader(stream_obj, 1, rank=rank, world_size=world))
        want = samples[rank::world]  # rank 1 gets the odd sample indices
        assert len(got) == len(want)
        for row, sample in zip(got, want):
            assert row["input_ids"].tolist() == sample[:-1].tolist()
            assert row["labels"].tolist() == sample[1:].tolist()  # aligned: the token after each input
            assert row["position_ids"].tolist() == list(range(t))
    # resuming from a saved offset reproduces the next batch
    loader = ResumableLoader(stream_obj, 1, rank=1, world_size=world)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    again = ResumableLoader(TokenFiles(str(tmp_path), seq_len=t, batch_size=1, train_order="sequential")
                            .train_stream(), 1, rank=1, world_size=world)
    again.load_state_dict(state)
    assert next(iter(again))["input_ids"][0].tolist() == samples[3][:-1].tolist()


def test_random_windows_are_contiguous_and_seeded(tmp_path):
    n, t = 3000, 16
    write_token_files(tmp_path, {"train": np.arange(n)}, vocab_size=n)
    first = rows(TokenFiles(str(tmp_path), seq_len=t, batch_size=4, seed=1).train_dataloader())
    assert len(first) == 180  # ceil(3000 / 17) = 177 samples per epoch, padded to whole batches of 4
    starts = []
    for row in first:
        i = row["input_ids"][0].item()  # token values equal their offsets
        assert 0 <= i <= n - t - 1
        assert row["input_ids"].tolist() == list(range(i, i + t))
        assert row["labels"].tolist() == list(range(i + 1, i + t + 1))
        starts.append(i)
    again = rows(TokenFiles(str(tmp_path), seq_len=t, batch_size=4, seed=1).train_dataloader())
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    other = [r["input_ids"][0].item() for r in rows(TokenFiles(str(tmp_path), seq_len=t, batch_size=4,
                                                                 seed=2).train_dataloader())]
    assert other != starts
    assert len(set(starts)) > 0.8 * len(starts)  # spread over the stream, not a few repeated windows


def test_shuffled_order_visits_every_chunk_once_per_epoch(tmp_path):
    n, t = 60, 5  # exactly 10 chunks of 6 tokens
    write_token_files(tmp_path, {"train": np.arange(n)}, vocab_size=n)
    loader = TokenFiles(str(tmp_path), seq_len=t, batch_size=2, train_order="shuffled").train_dataloader()
    epoch0 = [r["input_ids"][0].item() for r in rows(loader)]
    epoch1 = [r["input_ids"][0].item() for r in rows(loader)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(0, n, t + 1))
    assert epoch0 != epoch1 and epoch0 != sorted(epoch0)


def test_document_aware_positions(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 200, size=int(k)).tolist() for k in rng.integers(1, 15, size=40)]
    write_token_files(tmp_path, {"train": docs, "val": docs[:9]}, vocab_size=200)
    starts = set(np.cumsum([0] + [len(d) for d in docs])[:-1].tolist())
    n = sum(map(len, docs))
    dm = TokenFiles(str(tmp_path), seq_len=12, batch_size=3)
    stream = dm.train_stream()
    for index in range(30):
        row = stream.get_sample(0, index)
        start = int(stream.rng(0, index).integers(0, n - 12))
        assert row["position_ids"].tolist() == reference_positions(start, 12, starts, n)
    plain = TokenFiles(str(tmp_path), seq_len=12, batch_size=3, doc_positions=False).train_stream()
    assert plain.get_sample(0, 0)["position_ids"].tolist() == list(range(12))


def test_validation_windows_cover_the_stream(tmp_path):
    docs = [[3, 4, 5, 6], [7, 8], [9, 10, 11, 12, 13], [14]]
    stream = [tok for doc in docs for tok in doc]
    write_token_files(tmp_path, {"train": np.arange(50), "val": docs}, vocab_size=300)
    dm = TokenFiles(str(tmp_path), seq_len=5, batch_size=2)
    dataset = dm.val_dataset()
    assert len(dataset) == 3  # 11 targets in windows of 5
    batches = list(dm.val_dataloader())
    inputs = torch.cat([b["input_ids"].flatten() for b in batches])
    labels = torch.cat([b["labels"].flatten() for b in batches])
    positions = torch.cat([b["position_ids"].flatten() for b in batches])
    kept = labels != -100
    assert labels[kept].tolist() == stream[1:]  # every token after the first is a target exactly once
    assert inputs[kept].tolist() == stream[:-1]
    starts = {0, 4, 6, 11}
    want = [p for s in range(0, 11, 5) for p in reference_positions(s, min(5, 11 - s), starts, 12)]
    assert positions[kept].tolist() == want
    assert dm.test_dataloader().dataset is not None


def test_workers_read_the_memmap_lazily_and_agree(tmp_path):
    write_token_files(tmp_path, {"train": np.arange(500)}, vocab_size=500)
    main = rows(TokenFiles(str(tmp_path), seq_len=8, batch_size=2, num_workers=0).train_dataloader())
    workers = rows(TokenFiles(str(tmp_path), seq_len=8, batch_size=2, num_workers=2).train_dataloader())
    assert len(main) == len(workers) and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(main, workers))


def test_raw_allamo_files_without_sidecar(tmp_path):
    (tmp_path / "train.bin").write_bytes(np.arange(40, dtype="<u2").tobytes())
    dm = TokenFiles(str(tmp_path), tokenizer="byte", seq_len=4, train_order="sequential")
    dm.setup()
    assert dm.max_token_id == 39 and dm.vocab_size == 259
    assert dm.train_stream().get_sample(0, 1)["input_ids"].tolist() == [5, 6, 7, 8]
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "train.bin").write_bytes(np.arange(100_000, 100_040, dtype="<u4").tobytes())
    dm = TokenFiles(str(wide), tokenizer="byte", seq_len=4, dtype="uint32")
    with pytest.raises(ValueError, match="hold id 100039 but the vocabulary has 259 ids"):
        dm.setup()


def test_missing_files_list_what_was_scanned(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"'.*nope' not found \('nope' is not in .*\['notes.txt'\]"):
        TokenFiles(str(tmp_path / "nope"), tokenizer="byte").setup()
    with pytest.raises(FileNotFoundError, match=r"no train.bin in .*\['notes.txt'\].*expected train.bin"):
        TokenFiles(str(tmp_path), tokenizer="byte").setup()


def test_short_and_mismatched_files_are_clear_errors(tmp_path):
    write_token_files(tmp_path, {"train": np.arange(8)}, tokenizer="byte")
    with pytest.raises(ValueError, match="holds 8 tokens, fewer than one training row of seq_len\\+1 = 9"):
        TokenFiles(str(tmp_path), seq_len=8).setup()
    with pytest.raises(ValueError, match="dtype=uint32 but .*meta.json says the files hold uint16"):
        TokenFiles(str(tmp_path), seq_len=4, dtype="uint32").setup()
    with open(tmp_path / "train.bin", "ab") as f:
        f.write(np.array([1, 2], dtype="<u2").tobytes())
    with pytest.raises(ValueError, match="holds 10 uint16 tokens but meta.json records 8"):
        TokenFiles(str(tmp_path), seq_len=4).setup()
    with open(tmp_path / "train.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match="21 bytes, not a multiple of 2"):
        TokenFiles(str(tmp_path), seq_len=4).setup()


def test_ids_beyond_the_declared_vocabulary(tmp_path):
    write_token_files(tmp_path, {"train": np.arange(200, 250)}, vocab_size=300)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["vocab_size"] = 240
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="hold id 249 but the vocabulary has 240 ids"):
        TokenFiles(str(tmp_path), seq_len=4).setup()
    byte = TokenFiles(str(tmp_path), tokenizer="byte", seq_len=4)  # a tokenizer given wins over the sidecar
    byte.setup()
    assert byte.vocab_size == 259
    write_token_files(tmp_path / "wide", {"train": np.arange(300, 350)}, vocab_size=400)
    with pytest.raises(ValueError, match="hold id 349 but the vocabulary has 259 ids .*use the tokenizer"):
        TokenFiles(str(tmp_path / "wide"), tokenizer="byte", seq_len=4).setup()
    with pytest.raises(ValueError, match="records no loadable tokenizer.*pass tokenizer="):
        _ = TokenFiles(str(tmp_path), seq_len=4).tokenizer
