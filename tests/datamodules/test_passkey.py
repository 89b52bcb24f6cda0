"""Passkey training data: documents (prompt + answer), rows with answer-only or full labels, the text mixture."""

import json
import re

import pytest
import torch

from lit_longctx.datamodules.base import ResumableLoader
from lit_longctx.datamodules.doc_aware import DocAware
from lit_longctx.datamodules.passkey import PasskeyDocuments, PasskeyMixData, PasskeyStream
from lit_longctx.datamodules.text import TextData
from lit_longctx.eval.passkey import PasskeyTask
from lit_longctx.tokenizers import ByteTokenizer, train_sentencepiece

# written out from the spec (landmark.md §4), not taken from the code under test
QUESTION = "What is the pass key? The pass key is"
NEEDLE = re.compile(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.")
GROUP = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("sp")
    (root / "topics.txt").write_text("\n\n".join(topics.values()))
    return train_sentencepiece([root / "topics.txt"], root / "sp", vocab_size=1000)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for text in list(topics.values())[:10]:
            f.write(json.dumps({"text": text[:2000]}) + "\n")
    return path


def parse(tokenizer, doc):
    """(prompt text, key in the needle, answer text) of a document, read from its decoded text.

    The answer is what its tokens add to the decoded prompt (sentencepiece drops the leading space of a piece list).
    """
    prompt = tokenizer.decode(doc.input_ids[: doc.answer_start])
    text = tokenizer.decode(doc.input_ids)
    assert text.startswith(prompt)
    answer = text[len(prompt) :]
    needle = NEEDLE.search(prompt)
    assert needle and needle.group(1) == needle.group(2)
    return prompt, int(needle.group(1)), answer


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_document_is_the_evaluation_prompt_then_the_answer(kind, sp_tokenizer):
    tokenizer = ByteTokenizer() if kind == "byte" else sp_tokenizer
    task = PasskeyTask(tokenizer, seed=4)
    for length, depth in [(400, 0.0), (520, 0.37), (700, 1.0)]:
        doc = task.document(length, depth, trial=2)
        prompt, key, answer = parse(tokenizer, doc)
        assert prompt.endswith(QUESTION) and answer == f" {key}."
        assert doc.answer == key and doc.input_ids[-1] == tokenizer.eos_id
        # the prompt's ids are its own tokenization with BOS, as an evaluation prompt is fed
        assert doc.input_ids[: doc.answer_start] == tokenizer.encode(prompt, bos=True)
        assert length - 2 <= len(doc.input_ids) <= length
        filler = prompt.split("\n")[1] + prompt.split("\n")[3]
        assert " ".join([GROUP] * 20).startswith(prompt.split("\n")[1])
        before = len(prompt.split("\n")[1])
        assert abs(before - depth * len(filler)) <= len("There and back again. ")
    custom = task.document(500, 0.5, answer_template=" {key}", eos=False)
    assert parse(tokenizer, custom)[2] == f" {custom.answer}"
    assert custom.input_ids[-1] != tokenizer.eos_id


def test_document_errors(sp_tokenizer):
    task = PasskeyTask(ByteTokenizer())
    with pytest.raises(ValueError, match=r"answer template has missing field\(s\) \['key'\]"):
        task.document(500, 0.5, answer_template=" the key")
    with pytest.raises(ValueError, match="shorter than the prompt without filler"):
        task.document(100, 0.5)
    # a prompt ending mid-word: "▁k" + "ey" tokenizes as "▁key", so the prompt's own ids are not a prefix
    split = PasskeyTask(sp_tokenizer, template="{prefix} {key} {suffix} What is the pass key? The pass k")
    with pytest.raises(ValueError, match="does not tokenize as tokens after the prompt"):
        split.document(300, 0.5, answer_template="ey is {key}.")


def test_documents_are_seeded_indexable_and_a_document_source():
    tok = ByteTokenizer()
    docs = PasskeyDocuments(tok, lengths=(300, 420), depths=(0.2, 0.6), seed=5, num_documents=6, bos=False, eos=False)
    again = PasskeyDocuments(tok, lengths=(300, 420), depths=(0.2, 0.6), seed=5, num_documents=6, bos=False, eos=False)
    other = PasskeyDocuments(tok, lengths=(300, 420), depths=(0.2, 0.6), seed=6, num_documents=6, bos=False, eos=False)
    assert [docs[i] for i in reversed(range(6))][::-1] == list(again) == list(docs(0))
    assert list(docs(4)) == [docs[4], docs[5]] and len(docs) == 6
    assert sum(a == b for a, b in zip(docs, other)) == 0
    with pytest.raises(IndexError):
        docs[6]
    lengths = []
    for i in range(6):
        record = docs.record(i)
        assert record.input_ids == docs[i] and record.input_ids[0] != tok.bos_id and record.input_ids[-1] != tok.eos_id
        prompt, key, answer = parse(tok, record)
        assert answer == f" {key}." and 0.2 <= record.depth <= 0.6 and 300 <= record.length <= 420
        assert record.length - 2 <= len(record.input_ids) <= record.length
        lengths.append(record.length)
    assert len(set(lengths)) > 1
    # the doc-aware pipeline reads it as a document source: [bos] + doc + [eos] back to back in each row
    pipeline = DocAware(docs, batch_size=2, seq_len=64, bos_id=tok.bos_id, eos_id=tok.eos_id)
    batch = next(pipeline)
    assert batch["input_ids"][0].tolist() == [tok.bos_id, *docs[0][:63]]
    assert batch["input_ids"][1].tolist() == [tok.bos_id, *docs[1][:63]]


def test_documents_errors():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"lengths must be \(min, max\) with 1 <= min <= max"):
        PasskeyDocuments(tok, lengths=(500, 400))
    with pytest.raises(ValueError, match=r"depths must be \(min, max\) with 0.0 <= min <= max <= 1.0"):
        PasskeyDocuments(tok, lengths=(400, 500), depths=(0.0, 1.5))
    with pytest.raises(ValueError, match=r"lengths\[0\]=100 tokens: .*shorter than the prompt without filler"):
        PasskeyDocuments(tok, lengths=(100, 500))


@pytest.mark.parametrize("labels", ["answer", "all"])
def test_rows_hold_one_document_with_the_chosen_labels(labels):
    tok = ByteTokenizer()
    docs = PasskeyDocuments(tok, lengths=(300, 350), seed=2)
    stream = PasskeyStream(docs, seq_len=360, num_samples=4, labels=labels, pad_id=tok.pad_id)
    for epoch, index in [(0, 0), (0, 3), (2, 1)]:
        row = stream.get_sample(epoch, index)
        doc = docs.record(epoch * 4 + index)
        ids, n = doc.input_ids, len(doc.input_ids)
        assert row["input_ids"].tolist() == ids[:-1] + [tok.pad_id] * (360 - n + 1)
        assert row["position_ids"].tolist() == list(range(360))
        kept = [(t, y) for t, y in enumerate(row["labels"].tolist()) if y != -100]
        if labels == "all":
            assert kept == list(enumerate(ids[1:]))
        else:
            assert tok.decode([y for _, y in kept]) == f" {doc.answer}." and kept[-1][1] == tok.eos_id
            assert [t for t, _ in kept] == list(range(doc.answer_start - 1, n - 1))
    assert stream.get_sample(1, 0)["input_ids"].tolist() != stream.get_sample(0, 0)["input_ids"].tolist()


def test_rows_errors():
    docs = PasskeyDocuments(ByteTokenizer(), lengths=(300, 350))
    with pytest.raises(ValueError, match="do not fit rows of seq_len=300"):
        PasskeyStream(docs, seq_len=300, num_samples=4)
    with pytest.raises(ValueError, match="unknown labels 'prompt'"):
        PasskeyStream(docs, seq_len=400, num_samples=4, labels="prompt")


def mix(corpus, tmp_path, **kwargs):
    kwargs = {"tokenizer": "byte", "seq_len": 320, "batch_size": 2, "cache_dir": str(tmp_path / "cache"),
              "passkey_lengths": (280, 321), "val_fraction": 0.2, "seed": 3, **kwargs}
    dm = PasskeyMixData([str(corpus)], **kwargs)
    dm.setup("fit")
    return dm


def is_passkey(row):
    return QUESTION in ByteTokenizer().decode(row.tolist())


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_mixture_holds_the_fraction_of_passkey_rows(corpus, tmp_path, fraction):
    dm = mix(corpus, tmp_path, passkey_fraction=fraction)
    text_rows = TextData([str(corpus)], tokenizer="byte", seq_len=320, cache_dir=str(tmp_path / "cache"),
                         val_fraction=0.2, seed=3).train_stream().num_samples
    stream = dm.train_stream()
    flags = [is_passkey(stream.sample_at(0, k)["input_ids"]) for k in range(stream.num_samples)]
    expected = text_rows if fraction == 1 else round(text_rows * fraction / (1 - fraction))
    assert sum(flags) == expected and len(flags) == (expected if fraction == 1 else text_rows + expected)
    assert abs(sum(flags[:20]) - 20 * fraction) <= 1  # blended evenly, not in blocks


def test_fraction_zero_is_the_text_data(corpus, tmp_path):
    dm = mix(corpus, tmp_path, passkey_fraction=0.0)
    text = TextData([str(corpus)], tokenizer="byte", seq_len=320, cache_dir=str(tmp_path / "cache"),
                    val_fraction=0.2, seed=3)
    a, b = dm.train_stream(), text.train_stream()
    assert a.num_samples == b.num_samples
    assert all(torch.equal(a.sample_at(1, k)["input_ids"], b.sample_at(1, k)["input_ids"]) for k in range(5))


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_mixture_resumes_and_shards_like_every_training_stream(corpus, tmp_path):
    dm = mix(corpus, tmp_path, passkey_fraction=0.5)
    uninterrupted = take(dm.train_dataloader(), 6)

    first = mix(corpus, tmp_path, passkey_fraction=0.5)
    take(first.train_dataloader(), 3)
    resumed = mix(corpus, tmp_path, passkey_fraction=0.5)
    resumed.load_state_dict(first.state_dict())
    for got, want in zip(take(resumed.train_dataloader(), 3), uninterrupted[3:]):
        assert all(torch.equal(got[k], want[k]) for k in want)

    # two ranks of batch 1 together see exactly the single-rank batches of 2, rank 0 the even positions
    ranks = [take(ResumableLoader(dm.train_stream(), 1, rank=r, world_size=2), 6) for r in range(2)]
    for i, want in enumerate(uninterrupted):
        got = torch.cat([ranks[0][i]["input_ids"], ranks[1][i]["input_ids"]])
        assert torch.equal(got, want["input_ids"])
    kinds = {is_passkey(row) for b in uninterrupted for row in b["input_ids"]}
    assert kinds == {True, False}
    # default labels: every token of a passkey row is a target (the next input), up to the padding
    for b in uninterrupted:
        for ids, labels in zip(b["input_ids"], b["labels"]):
            if is_passkey(ids):
                n = int((labels != -100).sum())
                assert n > 250 and torch.equal(labels[: n - 1], ids[1:n]) and (labels[n:] == -100).all()


def test_sentencepiece_mixture_and_workers(corpus, tmp_path):
    dm = PasskeyMixData([str(corpus)], train_tokenizer=400, seq_len=256, batch_size=2, cache_dir=str(tmp_path / "c"),
                        passkey_fraction=0.5, passkey_lengths=(200, 257), key_range=(1, 999), num_workers=2, seed=1,
                        passkey_labels="answer")
    dm.setup("fit")
    tok = dm.tokenizer
    batches = take(dm.train_dataloader(), 4)
    main = take(ResumableLoader(dm.train_stream(), 2, num_workers=0), 4)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(batches, main))
    rows = [(ids, labels) for b in batches for ids, labels in zip(b["input_ids"], b["labels"])]
    passkey = [(ids, labels) for ids, labels in rows if QUESTION in tok.decode(ids.tolist())]
    assert passkey and len(passkey) < len(rows)
    for ids, labels in passkey:
        key = int(NEEDLE.search(tok.decode(ids.tolist())).group(1))
        first = int((labels != -100).nonzero()[0])  # labels[first] is the first answer token, after input first
        prompt = ids[: first + 1].tolist()
        assert 1 <= key <= 999 and tok.decode(prompt).endswith(QUESTION)
        assert tok.decode(prompt + labels[labels != -100].tolist()) == tok.decode(prompt) + f" {key}."


def test_mixture_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match=r"passkey_fraction must lie in \[0, 1\]"):
        PasskeyMixData([str(corpus)], passkey_fraction=1.5)
    with pytest.raises(ValueError, match="unknown passkey_labels 'prompt'"):
        PasskeyMixData([str(corpus)], passkey_labels="prompt")
    with pytest.raises(ValueError, match=r"passkey_lengths must be \(min, max\) with 1 <= min <= max <= 257"):
        PasskeyMixData([str(corpus)], seq_len=256, passkey_lengths=(200, 300))
    with pytest.raises(ValueError, match="unknown field"):
        PasskeyMixData([str(corpus)], template="{prefix}{key}{suffix}{oops}")
    with pytest.raises(ValueError, match="holds fewer than n_keys=4"):
        PasskeyMixData([str(corpus)], task="multikey", key_range=(1, 2), n_keys=4)
    dm = mix(corpus, tmp_path, seq_len=256, passkey_lengths=(120, 257))
    with pytest.raises(ValueError, match=r"lengths\[0\]=120 tokens: .*raise the minimum length"):
        dm.train_stream()
