"""FoT's original data: EasyLM JSONL with pre-tokenized ids (base64 of int32, or a list of ids) as a TextData /
DocAwareData source, and per-source token counts (``batch_tokens_per_source/<name>``).

Oracles: the ids as written (decoded here with ``struct``, not numpy), the pipeline built by hand over them, and per-row
attribution of every input token to its document's source recomputed from the rows' contiguous token streams.
"""

from __future__ import annotations

import base64
import csv
import json
import struct

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_longctx.callbacks import SourceTokens
from lit_longctx.datamodules import DocAwareData, TextData
from lit_longctx.datamodules.doc_aware import build_pipeline
from lit_longctx.datamodules.sources import TextSource
from lit_longctx.datamodules.text import held_out
from lit_longctx.modules import CausalLM

BOS, EOS = 256, 257  # the byte tokenizer's


def write_easylm(path, docs, field, encode):
    with open(path, "w") as f:
        for ids in docs:
            value = base64.b64encode(struct.pack(f"<{len(ids)}i", *ids)).decode() if encode else ids
            f.write(json.dumps({field: value, "source_dataset": path.stem}) + "\n")
    return path


@pytest.fixture(scope="module")
def easylm(tmp_path_factory):
    root = tmp_path_factory.mktemp("easylm")
    rng = np.random.default_rng(0)
    a = [rng.integers(10, 100, int(rng.integers(5, 40))).tolist() for _ in range(14)]  # ids 10..99
    b = [rng.integers(100, 200, int(rng.integers(5, 40))).tolist() for _ in range(10)]  # ids 100..199
    path_a, path_b = write_easylm(root / "a.jsonl", a, "tokens", True), write_easylm(root / "b.jsonl", b, "ids", False)
    return root, path_a, a, path_b, b


def test_base64_source_gives_the_written_ids(easylm, tmp_path):
    root, path_a, a, _, _ = easylm
    source = TextSource(str(path_a), tokens_field="tokens")
    dm = DocAwareData([source], tokenizer="byte", seq_len=16, batch_size=2, cache_dir=str(tmp_path / "c"),
                      val_docs=2, shuffle=False)
    dm.setup("fit")
    mask = held_out(len(a), 0.0, 2)
    docs = [d for i, d in enumerate(a) if not mask[i]]
    expected = build_pipeline("doc_aware", docs, 2, 16, bos_id=BOS, eos_id=EOS)
    loader = dm.train_dataloader()
    for got, _ in zip(loader, range(6)):
        want = next(expected)
        assert all(torch.equal(got[k], want[k]) for k in want) and "tokens_per_source" not in got
    plain = TextData([source], tokenizer="byte", seq_len=8, batch_size=1, cache_dir=str(tmp_path / "c"),
                     val_docs=2, shuffle=False)
    plain.setup("fit")
    row = plain.train_stream().sample_at(0, 0)
    assert row["input_ids"].tolist() == ([BOS] + docs[0] + [EOS] + docs[1])[:8]


def attribute(stream: list[int]) -> list[str]:
    """Source of each token of a row's stream: content by id range, BOS like the next token, EOS like the previous."""
    kind = ["a" if 10 <= t < 100 else "b" if 100 <= t < 200 else None for t in stream]
    for i in range(len(stream) - 2, -1, -1):
        if stream[i] == BOS:
            kind[i] = kind[i + 1]
    for i in range(1, len(stream)):
        if stream[i] == EOS:
            kind[i] = kind[i - 1]
    return kind


def test_mixture_counts_tokens_per_source(easylm, tmp_path):
    root, path_a, _, path_b, _ = easylm
    sources = [TextSource(str(path_a), tokens_field="tokens", weight=2.0),
               TextSource(str(path_b), tokens_field="ids", tag="books")]
    dm = DocAwareData(sources, tokenizer="byte", seq_len=16, batch_size=2, cache_dir=str(tmp_path / "c"), val_docs=0)
    dm.setup("fit")
    assert dm.source_names == ["a", "books"]
    batches = [b for b, _ in zip(dm.train_dataloader(), range(8))]
    for r in range(2):
        stream = [t for b in batches for t in b["input_ids"][r].tolist()] + [int(batches[-1]["labels"][r, -1])]
        kinds = attribute(stream)
        for s, batch in enumerate(batches):
            window = kinds[s * 16 : (s + 1) * 16]
            batch.setdefault("oracle", torch.zeros(2, dtype=torch.long))
            batch["oracle"] += torch.tensor([window.count("a"), window.count("b")])
    for batch in batches:
        assert torch.equal(batch["tokens_per_source"], batch["oracle"]) and int(batch["oracle"].sum()) == 32
    assert bool((sum(b["tokens_per_source"] for b in batches) > 0).all())  # both sources were read


def test_source_tokens_are_logged(easylm, tmp_path):
    root, path_a, _, path_b, _ = easylm
    sources = [{"path": str(path_a), "tokens_field": "tokens"}, {"path": str(path_b), "tokens_field": "ids"}]
    dm = DocAwareData(sources, tokenizer="byte", seq_len=16, batch_size=2, cache_dir=str(tmp_path / "c"), val_docs=0)
    model = CausalLM(model={"vocab_size": 259, "dim": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 32,
                            "max_seq_len": 16})
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(batch["tokens_per_source"].clone())

    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=CSVLogger(tmp_path, name="log"), log_every_n_steps=1,
                        callbacks=[SourceTokens(), Record()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, dm)
    with open(next((tmp_path / "log").rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("step")]
    logged = [(float(r["batch_tokens_per_source/a"]), float(r["batch_tokens_per_source/b"])) for r in rows
              if r.get("batch_tokens_per_source/a")]
    assert len(logged) == 3 and logged == [tuple(float(x) for x in counts) for counts in seen]


def test_bad_pretokenized_sources_are_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ids": [1, 2, 999]}) + "\n" + json.dumps({"ids": [3, 4]}) + "\n")
    dm = TextData([{"path": str(bad), "tokens_field": "ids"}], tokenizer="byte", seq_len=2, batch_size=1,
                  cache_dir=str(tmp_path / "c"), val_fraction=0.0)
    with pytest.raises(ValueError, match=r"example 0, field 'ids'\: token id 999 is outside the tokenizer's vocab"):
        dm.setup("fit")
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text(json.dumps({"tokens": base64.b64encode(b"\x01\x00\x00").decode()}) + "\n")
    dm = TextData([{"path": str(garbled), "tokens_field": "tokens"}], tokenizer="byte", seq_len=2, batch_size=1,
                  cache_dir=str(tmp_path / "c"), val_fraction=0.0)
    with pytest.raises(ValueError, match="3 base64-decoded bytes are not a whole number of i4 ids"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="tokens_field needs json, parquet or hub data"):
        TextSource("corpus.txt", format="text", tokens_field="ids")
