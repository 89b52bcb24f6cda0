"""Tokenizers: sentencepiece models trained here on Python's own docs (``pydoc_data.topics``), ``tokenizers``-library
``tokenizer.json`` directories, and the byte-level fallback.

Oracles: sentencepiece's own ids, ``transformers.LlamaTokenizer.from_pretrained(dir)`` and ``AutoTokenizer`` ids,
and exact text round trips.
"""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizer

from lit_longctx.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)

TEXTS = [
    "The with statement is used to wrap the execution of a block.",
    "  leading spaces,\ttabs and\nnew lines\n\n",
    "def f(x):\n    return x ** 2  # squares",
    "naïve café, Straße, 日本語のテキスト, emoji 🙂🚀, math ∑∫√",
    "",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("corpus") / "topics.txt"
    f.write_text("\n".join(topics[k] for k in sorted(topics)))
    return f


@pytest.fixture(scope="module")
def sp_dir(corpus, tmp_path_factory) -> Path:
    """A 1000-piece BPE sentencepiece model saved as an HF-style tokenizer directory."""
    tok = train_sentencepiece([corpus], tmp_path_factory.mktemp("sp") / "sp", vocab_size=1000)
    return tok.save(tmp_path_factory.mktemp("sp_dir"))


@pytest.fixture(scope="module")
def hf_json_dir(corpus, tmp_path_factory) -> Path:
    """A byte-level BPE ``tokenizer.json`` (Llama-3 style) with BOS/EOS named in tokenizer_config.json."""
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|begin|>", "<|end|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(corpus)], trainer)
    d = tmp_path_factory.mktemp("hf_json")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin|>", "eos_token": "<|end|>"}))
    # special_tokens_map.json holds AddedToken dicts in files written by transformers
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": {
        "content": "<|pad|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}}))
    return d


# -------------------------------------------------------------------------------------------------- sentencepiece
def test_trained_model_ids_and_specials(sp_dir):
    tok = load_tokenizer(sp_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 1000)
    assert tok.sp.unk_id() == 1


def test_ids_equal_sentencepiece_and_transformers_llama_tokenizer(sp_dir):
    tok = load_tokenizer(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    hf = LlamaTokenizer.from_pretrained(sp_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == sp.encode(text), text
        assert tok.encode(text, bos=True, eos=True) == [2, *ids, 3]
        if text.startswith(" "):
            continue  # transformers' LlamaTokenizer drops one of several leading spaces; sentencepiece is the reference
        assert ids == hf(text, add_special_tokens=False).input_ids, text
        assert tok.encode(text, bos=True) == hf(text).input_ids, text  # the saved config adds BOS, like LLaMA
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0]) / 2  # a real subword vocabulary, not characters


def test_trained_model_keeps_whitespace_and_splits_digits(sp_dir):
    tok = load_tokenizer(sp_dir)
    code = "def f(x):\n\tif x:\n        return  2024\n"
    assert tok.decode(tok.encode(code)) == code
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("2024")]
    assert [p.strip("▁") for p in pieces if p.strip("▁")] == ["2", "0", "2", "4"]


def test_byte_fallback_round_trips_unseen_unicode(sp_dir):
    tok = load_tokenizer(sp_dir)
    text = "unseen: 日本語 🙂 Ω≈ç√ — ẞ"
    ids = tok.encode(text)
    assert any(tok.sp.id_to_piece(i).startswith("<0x") for i in ids)  # bytes, not <unk>
    assert tok.sp.unk_id() not in ids
    assert tok.decode(ids) == text
    assert all(tok.decode(tok.encode(t)) == t for t in TEXTS)


def test_decode_skips_special_and_out_of_range_ids(sp_dir):
    tok = load_tokenizer(sp_dir)
    ids = tok.encode("hello world")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, 5000]) == "hello world"


def test_model_file_path_loads_directly(sp_dir):
    tok = load_tokenizer(sp_dir / "tokenizer.model")
    assert tok.encode(TEXTS[0]) == load_tokenizer(sp_dir).encode(TEXTS[0])


def test_added_special_tokens_persist_through_save_and_load(sp_dir, tmp_path):
    tok = load_tokenizer(sp_dir)
    mem = tok.add_special_token("<landmark>")
    assert mem == 1000 and tok.vocab_size == 1001
    assert tok.add_special_token("<landmark>") == 1000  # idempotent
    assert tok.add_special_token("<s>") == tok.bos_id  # an existing piece keeps its id
    assert mem not in tok.encode("a <landmark> b")  # control token: never produced from text
    assert tok.decode([*tok.encode("a b"), mem]) == "a b"
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.token_to_id("<landmark>") == 1000 and again.vocab_size == 1001
    assert again.encode(TEXTS[3]) == tok.encode(TEXTS[3])
    assert json.loads((tmp_path / "added_tokens.json").read_text()) == {"<landmark>": 1000}


def test_added_tokens_file_with_a_gap_is_refused(sp_dir, tmp_path):
    load_tokenizer(sp_dir).save(tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<landmark>": 1005}))
    with pytest.raises(ValueError, match=r"token '<landmark>' has id 1005, expected the next free id 1000"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------------- tokenizer.json
def test_tokenizer_json_directory(hf_json_dir):
    tok = load_tokenizer(hf_json_dir)
    raw = HFTok.from_file(str(hf_json_dir / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.bos_id == raw.token_to_id("<|begin|>") and tok.eos_id == raw.token_to_id("<|end|>")
    hf = AutoTokenizer.from_pretrained(hf_json_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert ids == hf(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text  # byte-level BPE is lossless
    assert tok.encode("x", bos=True, eos=True) == [0, *tok.encode("x"), 1]
    assert tok.vocab_size == raw.get_vocab_size() == 600


def test_tokenizer_json_save_load_and_added_token(hf_json_dir, tmp_path):
    tok = load_tokenizer(hf_json_dir / "tokenizer.json")
    assert tok.bos_id == 0  # the config next to the file is read
    new = tok.add_special_token("<mem>")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert (again.bos_id, again.eos_id, again.token_to_id("<mem>"), again.vocab_size) == (0, 1, new, 601)
    assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_tokenizer_without_bos_explains(hf_json_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((hf_json_dir / "tokenizer.json").read_bytes())
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id is None
    with pytest.raises(ValueError, match="this tokenizer has no BOS token"):
        tok.encode("x", bos=True)


# ------------------------------------------------------------------------------------------------------ byte level
def test_byte_tokenizer_round_trip_and_save(tmp_path):
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and load_tokenizer(None).kind == "byte"
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.encode("a", bos=True, eos=True) == [256, 97, 257]
    assert (tok.vocab_size, tok.pad_id) == (259, 258)
    tok.add_special_token("<landmark>")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.kind == "byte" and again.token_to_id("<landmark>") == 259 and again.vocab_size == 260


# ---------------------------------------------------------------------------------------------------- bad input
def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer '.*nope.model' not found \(.*\); give a sentencepiece"):
        load_tokenizer(tmp_path / "nope.model")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"did you mean '.*/tokenizer.model'\?"):
        load_tokenizer(tmp_path / "tokenizr.model")


def test_corrupt_tokenizer_files_name_the_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x03abc" + b"\xff" * 64)
    with pytest.raises(ValueError, match=r"tokenizer.model' is not a sentencepiece model .*corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=r"tokenizer.json' cannot be read .*corrupt"):
        load_tokenizer(tmp_path)


def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in directory .*expected tokenizer.model .*found "
                                                r"\['config.json'\]"):
        load_tokenizer(tmp_path)


def test_file_of_unknown_type(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="cannot tell the tokenizer type of .*vocab.txt"):
        load_tokenizer(tmp_path / "vocab.txt")


def test_failed_training_keeps_the_previous_model(corpus, tmp_path):
    first = train_sentencepiece([corpus], tmp_path / "sp", vocab_size=1000)
    before = (tmp_path / "sp.model").read_bytes()
    with pytest.raises(RuntimeError, match="Vocabulary size"):  # far more pieces than the text has
        train_sentencepiece([corpus], tmp_path / "sp", vocab_size=500_000)
    assert (tmp_path / "sp.model").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sp.model", "sp.vocab"]  # no temporary directory left
    assert load_tokenizer(tmp_path / "sp.model").encode("hello") == first.encode("hello")
