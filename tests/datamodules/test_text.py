"""TextData: sources, cached tokenization, packing with document positions, the Llemma mixture, errors."""

import json

import numpy as np
import pandas as pd
import pytest

from lit_longctx.datamodules import TextData, TextSource, greedy_blend, normalize_weights
from lit_longctx.datamodules import text as text_module
from lit_longctx.datamodules.sources import pydoc_documents

BOS, EOS = 256, 257  # the byte tokenizer's


def make_docs(letter: str, n: int = 10) -> list[str]:
    return [f"{letter * (i + 3)} {letter}{i}\nline two of {letter}{i} é" for i in range(n)]


def write_sources(root, docs):
    """The same documents as a directory of .txt files, a .jsonl file and a .parquet file (column 'body')."""
    txt = root / "txt"
    txt.mkdir(parents=True)
    for i, doc in enumerate(docs):
        (txt / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    parquet = root / "docs.parquet"
    pd.DataFrame({"body": docs}).to_parquet(parquet)
    return {"txt": str(txt), "jsonl": str(jsonl), "parquet": TextSource(str(parquet), text_field="body")}


def split_docs(directory, split: str) -> list[list[int]]:
    tokens = np.fromfile(directory / f"{split}.bin", dtype="<u2").tolist()
    starts = np.load(directory / f"{split}.docs.npy").tolist() + [len(tokens)]
    return [tokens[a:b] for a, b in zip(starts[:-1], starts[1:])]


def encoded(doc: str) -> list[int]:
    return [BOS, *doc.encode("utf-8"), EOS]


def test_oracle_13_llemma_mixture_weights():
    weights = normalize_weights([2, 4, 1, 0.147368, 0.221053])
    assert weights == pytest.approx([0.2714, 0.5429, 0.1357, 0.0200, 0.0300], abs=1e-4)
    blend = greedy_blend([2, 4, 1, 0.147368, 0.221053], 10_000)
    counts = np.bincount(blend, minlength=5)
    assert counts.sum() == 10_000
    assert np.all(np.abs(counts - np.array([2714.3, 5428.6, 1357.1, 200.0, 300.0])) <= 1)
    # by hand from "largest deficit w·(k+1) - count, ties to the first": weights 3:1 go A, A, B, A
    assert greedy_blend([3, 1], 4).tolist() == [0, 0, 1, 0]
    with pytest.raises(ValueError, match="at least one source a positive weight"):
        normalize_weights([0, 0])


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_sources_tokenize_to_the_exact_documents(tmp_path, kind):
    docs = make_docs("a")
    source = write_sources(tmp_path, docs)[kind]
    dm = TextData([source], tokenizer="byte", seq_len=16, batch_size=2, cache_dir=str(tmp_path / "cache"), val_docs=2)
    dm.prepare_data()
    directory = dm.token_dir(0)
    held = {2, 7}  # two documents evenly spaced through ten: the 3rd and the 8th
    assert split_docs(directory, "train") == [encoded(d) for i, d in enumerate(docs) if i not in held]
    assert split_docs(directory, "val") == [encoded(d) for i, d in enumerate(docs) if i in held]
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["kind"] == "byte"


def test_packed_rows_restart_positions_at_documents(tmp_path):
    docs = make_docs("a", 12)
    sources = write_sources(tmp_path, docs)
    dm = TextData([sources["jsonl"]], seq_len=24, batch_size=3, cache_dir=str(tmp_path / "c"), val_fraction=0,
                  shuffle=False)
    stream = [tok for doc in docs for tok in encoded(doc)]
    batches = list(dm.train_dataloader())
    n_rows = -(-len(stream) // 25)
    rows = [(b["input_ids"][i], b["labels"][i], b["position_ids"][i]) for b in batches for i in range(3)][:n_rows]
    for r, (inputs, labels, positions) in enumerate(rows):
        chunk = [stream[(r * 25 + t) % len(stream)] for t in range(25)]  # consecutive chunks, tail from the start
        assert inputs.tolist() == chunk[:-1] and labels.tolist() == chunk[1:]
        want = []
        for t, tok in enumerate(inputs.tolist()):
            want.append(0 if t == 0 or tok == BOS else want[-1] + 1)
        assert positions.tolist() == want
    assert dm.max_token_id == EOS and dm.vocab_size == 259


def test_cache_is_reused_and_invalidated_by_edits(tmp_path, monkeypatch):
    sources = write_sources(tmp_path, make_docs("a"))
    args = dict(tokenizer="byte", seq_len=16, cache_dir=str(tmp_path / "cache"))
    first = TextData([sources["txt"]], **args)
    first.prepare_data()
    train_bin = first.token_dir(0) / "train.bin"
    stamp = train_bin.stat().st_mtime_ns

    def no_reading(*args, **kwargs):
        raise AssertionError("the cached source was read and tokenized again")

    with monkeypatch.context() as m:
        m.setattr(text_module, "load_documents", no_reading)
        second = TextData([sources["txt"]], **args)
        second.setup()
        assert second.token_dir(0) == first.token_dir(0)
    assert train_bin.stat().st_mtime_ns == stamp
    (tmp_path / "txt" / "doc00.txt").write_text("edited text " * 5)
    third = TextData([sources["txt"]], **args)
    assert third.token_dir(0) != first.token_dir(0)
    third.prepare_data()
    assert encoded("edited text " * 5) in split_docs(third.token_dir(0), "train")


def test_mixture_serves_sources_by_weight(tmp_path):
    a = write_sources(tmp_path / "a", make_docs("a", 20))["txt"]
    b = write_sources(tmp_path / "b", make_docs("b", 20))["jsonl"]
    dm = TextData([TextSource(a, weight=3), TextSource(b, weight=1)], tokenizer="byte", seq_len=16, batch_size=4,
                  cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    stream = dm.train_stream()
    rows = [stream.sample_at(0, k)["input_ids"] for k in range(stream.num_samples)]

    def source_of(row) -> str:
        letters = {chr(t) for t in row.tolist() if chr(t).isalpha() and t < 128} - set("linetwof")
        assert len(letters) == 1, letters  # a row never mixes sources
        return letters.pop()

    got = [source_of(r) for r in rows]
    assert got[:4] == ["a", "a", "b", "a"]
    expected = greedy_blend([3, 1], stream.num_samples)
    assert got == ["ab"[c] for c in expected]
    # within one pass over a source, each of its rows is served once
    comp = stream.components[0]
    a_rows = [tuple(r.tolist()) for r, s in zip(rows, got) if s == "a"][: comp.num_samples]
    assert sorted(a_rows) == sorted(tuple(comp.get_sample(0, i)["input_ids"].tolist()) for i in range(len(a_rows)))
    assert len(dm.val_dataset()) > 0


def test_uint32_files_for_a_large_vocabulary(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(70_000)}}
    tok = HFTok(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (tmp_path / "src").mkdir()
    text = " ".join(f"w{i}" for i in range(69_990, 70_000)) + " w5"
    (tmp_path / "src" / "a.txt").write_text(text)
    dm = TextData([str(tmp_path / "src")], tokenizer=str(tok_dir), seq_len=4, cache_dir=str(tmp_path / "c"),
                  val_fraction=0)
    dm.prepare_data()
    meta = json.loads((dm.token_dir(0) / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_003
    stored = np.fromfile(dm.token_dir(0) / "train.bin", dtype="<u4").tolist()
    assert stored == [1, *range(69_993, 70_003), 8, 2]


def test_builtin_pydoc_is_real_english():
    docs = pydoc_documents()
    text = "\n".join(docs)
    assert len(docs) >= 50 and len(text) > 300_000
    assert any(doc.startswith('The "assert" statement') for doc in docs)
    words = text.lower().split()
    assert words.count("the") > 2_000 and words.count("is") > 500


def test_trained_tokenizer_is_cached_and_linkable(tmp_path, monkeypatch):
    args = dict(train_tokenizer=600, seq_len=64, batch_size=2, cache_dir=str(tmp_path / "cache"))
    dm = TextData(["builtin:pydoc"], **args)
    assert dm.vocab_size == 600  # known before anything is trained, for the CLI's link into the model
    assert not (tmp_path / "cache" / "tokenizers").exists()
    dm.prepare_data()
    assert dm.tokenizer.vocab_size == 600 and dm.vocab_size == 600
    assert dm.tokenizer_path.startswith(str(tmp_path / "cache" / "tokenizers"))
    doc = pydoc_documents()[0]
    assert " ".join(dm.tokenizer.decode(dm.tokenizer.encode(doc)).split()) == " ".join(doc.split())

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer was trained again")

    monkeypatch.setattr(text_module, "train_sentencepiece", no_training)
    again = TextData(["builtin:pydoc"], **args)
    again.setup()
    assert again.tokenizer_path == dm.tokenizer_path and again.max_token_id < 600
    batch = next(iter(again.train_dataloader()))
    assert batch["input_ids"].shape == (2, 64) and batch["labels"][:, :-1].equal(batch["input_ids"][:, 1:])


def test_config_parses_sources_from_strings_and_dicts(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TextData, "data")
    cfg = parser.parse_object({"data": {"sources": ["builtin:pydoc", {"path": "x.jsonl", "weight": 2.0}],
                                        "tokenizer": "byte", "cache_dir": str(tmp_path)}})
    dm = parser.instantiate_classes(cfg).data
    assert dm.sources == [TextSource("builtin:pydoc"), TextSource("x.jsonl", weight=2.0)]


def test_clear_errors(tmp_path):
    cache = str(tmp_path / "cache")
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unknown source format for \['table.csv'\].*set format="):
        TextData([str(tmp_path / "table.csv")], cache_dir=cache).prepare_data()
    with pytest.raises(ValueError, match="unknown source format 'csv'"):
        TextSource("x.csv", format="csv")
    with pytest.raises(FileNotFoundError, match=r"missing.txt' not found \(scanned: .* holds \['table.csv'\]"):
        TextData([str(tmp_path / "missing.txt")], cache_dir=cache).prepare_data()
    with pytest.raises(FileNotFoundError, match=r"no files match .*\*.jsonl"):
        TextData([str(tmp_path / "*.jsonl")], cache_dir=cache).prepare_data()
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"has no field 'text'; its fields are \['content'\]: set text_field="):
        TextData([str(tmp_path / "d.jsonl")], cache_dir=cache).prepare_data()
    with pytest.raises(ConnectionError, match="cannot load hub dataset 'someone/nonexistent-xyz'") as err:
        TextData(["hf:someone/nonexistent-xyz"], cache_dir=cache).prepare_data()
    assert "\n" not in str(err.value)
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "a.txt").write_text("tiny")
    with pytest.raises(ValueError, match="has 6 training tokens, fewer than one row of seq_len\\+1 = 65"):
        TextData([str(tmp_path / "short")], seq_len=64, cache_dir=cache, val_fraction=0).setup()
    with pytest.raises(ValueError, match="val_docs=1 leaves no training documents"):
        TextData([str(tmp_path / "short")], seq_len=2, cache_dir=cache, val_docs=1).setup()
    with pytest.raises(ValueError, match="either tokenizer= .* or train_tokenizer="):
        TextData(["builtin:pydoc"], tokenizer="byte", train_tokenizer=100)
    with pytest.raises(ValueError, match="unknown built-in source 'builtin:nope'"):
        TextData(["builtin:nope"], cache_dir=cache).prepare_data()
