"""Bad data, tokenizers, HF directories, config values and paths, tried as a user would: each case runs the real
``lit-longctx`` command in a fresh process in a temporary directory and must end with exit status 2, exactly one
``error:`` line naming the problem (file, line, option) and no traceback, leaving every existing file byte-identical.

Oracles: the file names, line numbers and counts in the messages are those the test itself planted (the bad line of a
.jsonl, the token count of a uint32 file), and the closest existing path is the one the test created.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli_helpers import REPO, TINY_CONFIG, write_corpus

ERROR_LINE_LIMIT = 600  # one readable line, never a namespace dump


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def lit(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "LIT_LONGCTX_DEBUG"}
    full = {**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    full = {k: v for k, v in full.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "lit_longctx.cli", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)


def fails(root: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run the command in ``root``; it must fail with status 2 and one short ``error:`` line, no traceback, and leave
    every file under ``root`` as it was. Returns the error line."""
    return failure(root, *args, env=env)[0]


def failure(root: Path, *args: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    """:func:`fails`, returning the error line and the whole stderr."""
    before = snapshot(root)
    proc = lit(list(args), root, env)
    err = proc.stderr
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert len(errors[0]) < ERROR_LINE_LIMIT, errors[0]
    after = snapshot(root)
    assert {k: after.get(k) for k in before} == before, "an existing file was changed"
    return errors[0], err


@pytest.fixture
def work(tmp_path: Path) -> Path:
    write_corpus(tmp_path / "corpus.jsonl", n_docs=8, chars=1500)
    (tmp_path / "cfg.yaml").write_text(TINY_CONFIG.format(root=tmp_path / "run", corpus=tmp_path / "corpus.jsonl"))
    return tmp_path


def fit(work: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(work / "cfg.yaml"), "--trainer.max_steps=1", *extra]


def tiny_hf(path: Path) -> Path:
    from lit_longctx.hf import to_hf
    from lit_longctx.nn.config import ModelConfig
    from lit_longctx.nn.llama import Transformer

    model = Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64))
    return to_hf(model, path)


# ------------------------------------------------------------------------------------------ 1. silent corruption
def raw_token_run(work: Path, dtype: str | None = None, seq_len: int = 32) -> list[str]:
    args = ["--data=lit_longctx.datamodules.TokenFiles", f"--data.init_args.data_dir={work / 'raw'}",
            "--data.init_args.tokenizer=byte", f"--data.init_args.seq_len={seq_len}"]
    return fit(work, *args, *([f"--data.init_args.dtype={dtype}"] if dtype else []))


def test_uint32_tokens_without_meta_are_read_as_uint32_and_said(work):
    (work / "raw").mkdir()
    tokens = np.random.default_rng(0).integers(0, 259, size=1000).astype("<u4")
    tokens.tofile(work / "raw" / "train.bin")
    # seq_len beyond the data: the run stops after the files were opened, and the count says how they were read
    err, stderr = failure(work, *raw_token_run(work, seq_len=4000))
    assert "holds 1000 tokens" in err and "data.init_args.seq_len" in err, err  # uint16 would be 2000
    assert "reading it as uint32 tokens" in stderr and "data.init_args.dtype=uint32" in stderr, stderr


def test_uint32_inference_reads_the_tokens_written(tmp_path):
    from lit_longctx.datamodules import TokenFiles

    tokens = np.random.default_rng(1).integers(0, 259, size=600).astype("<u4")
    tokens.tofile(tmp_path / "train.bin")
    dm = TokenFiles(str(tmp_path), tokenizer="byte", seq_len=8, train_order="sequential")
    row = dm.train_stream().get_sample(0, 3)
    assert row["input_ids"].tolist() == tokens[27:35].tolist()  # the oracle: the array written, read back by numpy
    (tmp_path / "train.bin").write_bytes(tokens.astype("<u2").tobytes())  # the same ids as uint16 stay uint16
    dm = TokenFiles(str(tmp_path), tokenizer="byte", seq_len=8, train_order="sequential")
    assert dm.train_stream().get_sample(0, 3)["input_ids"].tolist() == tokens[27:35].tolist()


def test_raw_token_file_too_short_to_tell_is_refused(work):
    (work / "raw").mkdir()
    np.arange(6, dtype="<u4").tofile(work / "raw" / "train.bin")
    err = fails(work, *raw_token_run(work))
    assert "no meta.json" in err and "data.init_args.dtype" in err, err


def test_failed_token_write_keeps_the_previous_file(tmp_path):
    from lit_longctx.datamodules.token_files import TokenFileWriter

    with TokenFileWriter(tmp_path / "train.bin", vocab_size=100) as writer:
        writer.add([1, 2, 3])
    before = (tmp_path / "train.bin").read_bytes()
    with pytest.raises(ValueError, match="outside the vocabulary"), TokenFileWriter(tmp_path / "train.bin", 100) as w:
        w.add([4, 5])
        w.add([500])
    assert (tmp_path / "train.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "train.docs.npy"]  # no temporary left


def test_unwritable_cache_dir_says_not_writable(work):
    (work / "afile").write_text("a file, not a directory")
    err = fails(work, *fit(work, f"--data.init_args.cache_dir={work / 'afile' / 'cache'}"))
    assert "not writable" in err and "cache_dir" in err and "No such file" not in err, err


# ------------------------------------------------------------------------------------------ 2. one-line errors
def test_negative_learning_rate(work):
    err = fails(work, *fit(work, "--model.init_args.learning_rate=-0.001"))
    assert "learning_rate=-0.001" in err and "negative" in err, err


def test_heads_not_dividing_dim_is_the_config_error_not_a_namespace_dump(work):
    err = fails(work, *fit(work, "--model.init_args.model.n_heads=5"))
    assert "n_heads=5 does not divide dim=32" in err and "Namespace" not in err, err


def test_empty_jsonl(work):
    (work / "empty.jsonl").write_text("")
    err = fails(work, *fit(work, f"--data.init_args.sources=[{work / 'empty.jsonl'}]"))
    assert "empty.jsonl" in err and "empty" in err, err


def test_malformed_jsonl_names_file_and_line(work):
    lines = [json.dumps({"text": f"document {i} " * 50}) for i in range(5)]
    lines[3] = lines[3][:-4]  # a truncated record on line 4
    (work / "bad.jsonl").write_text("\n".join(lines) + "\n")
    err = fails(work, *fit(work, f"--data.init_args.sources=[{work / 'bad.jsonl'}]"))
    assert "bad.jsonl" in err and "line 4" in err, err


def test_corrupt_sentencepiece_model(work):
    (work / "tok").mkdir()
    (work / "tok" / "tokenizer.model").write_bytes(b"\x0a\x03abc" + b"\xff" * 64)
    err = fails(work, *fit(work, f"--data.init_args.tokenizer={work / 'tok'}"))
    assert "tokenizer.model" in err and "not a sentencepiece model" in err, err


def test_corrupt_tokenizer_json(work):
    (work / "tok").mkdir()
    (work / "tok" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    err = fails(work, *fit(work, f"--data.init_args.tokenizer={work / 'tok'}"))
    assert "tokenizer.json" in err and "cannot be read" in err, err


@pytest.mark.parametrize("how", [pytest.param("init_from", marks=pytest.mark.slow), "convert"])
def test_corrupt_safetensors_in_hf_dir(work, how):
    hf = tiny_hf(work / "hf")
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
    args = (fit(work, f"--model.init_args.init_from={hf}") if how == "init_from"
            else ["convert", "from-hf", "--source", str(hf), "--output", str(work / "out.ckpt")])
    err = fails(work, *args)
    assert "model.safetensors" in err and "corrupt" in err, err
    assert not (work / "out.ckpt").exists()


@pytest.mark.parametrize("how", [pytest.param("init_from", marks=pytest.mark.slow), "convert"])
def test_corrupt_config_json_in_hf_dir(work, how):
    hf = tiny_hf(work / "hf")
    (hf / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": 32,\n')
    args = (fit(work, f"--model.init_args.init_from={hf}") if how == "init_from"
            else ["convert", "from-hf", "--source", str(hf), "--output", str(work / "out.ckpt")])
    err = fails(work, *args)
    assert "config.json" in err and "not valid JSON (line 4" in err, err


def test_yaml_syntax_error_names_the_file_and_line(work):
    (work / "extra.yaml").write_text("trainer:\n  max_steps: 4\n   bad: [1, 2\n")
    err = fails(work, "fit", "--config", str(work / "cfg.yaml"), "--config", str(work / "extra.yaml"))
    assert "extra.yaml" in err and "line 3" in err, err


# ---------------------------------------------------------------------------------------------------- 3. messages
def test_missing_local_path_is_not_found_with_the_nearest_match_and_never_sent_to_the_hub(work):
    (work / "runs" / "quickstart").mkdir(parents=True)
    # the hub allowed but unreachable: a path that looks local must not even try it
    online = {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "1"}
    err = fails(work, "generate", "--checkpoint", "runs/quickstrt", env=online)
    assert "not found" in err and "did you mean 'runs/quickstart'" in err, err
    err = fails(work, "convert", "from-hf", "--source", "./runs/quickstrt", "--output", "o.ckpt", env=online)
    assert "not found" in err and "runs/quickstart" in err, err
    err = fails(work, "convert", "from-hf", "--source", "./x", "--output", "o.ckpt", env=online)
    assert "'./x' not found" in err and "'x' is not in" in err, err


def test_hub_id_is_not_downloaded_when_the_hub_is_off(work):
    err = fails(work, "convert", "from-hf", "--source", "a/b", "--output", "o.ckpt", env={"HF_HUB_OFFLINE": "1"})
    assert "'a/b' not found" in err and "HF_HUB_OFFLINE" in err, err


def test_too_short_data_names_the_option(work):
    err = fails(work, *fit(work, "--data.init_args.seq_len=100000", "--model.init_args.model.max_seq_len=100000"))
    assert "seq_len+1 = 100001" in err and "data.init_args.seq_len" in err, err


@pytest.mark.slow
def test_single_text_file_says_at_start_up_that_there_is_no_validation(work):
    docs = [json.loads(line)["text"] for line in (work / "corpus.jsonl").read_text().splitlines()]
    (work / "one.txt").write_text("\n\n".join(docs))
    proc = lit(fit(work, f"--data.init_args.sources=[{work / 'one.txt'}]"), work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no validation set" in proc.stderr and "sample_by: paragraph" in proc.stderr, proc.stderr[-3000:]


def test_single_text_file_split_by_paragraph_has_validation(work, capsys):
    from lit_longctx.datamodules import TextData, TextSource

    docs = [json.loads(line)["text"] for line in (work / "corpus.jsonl").read_text().splitlines()]
    (work / "one.txt").write_text("\n\n".join(docs))
    one = TextData([str(work / "one.txt")], tokenizer="byte", seq_len=32, cache_dir=str(work / "cache"))
    one.setup()
    assert one.val_dataset() is None and "no validation set" in capsys.readouterr().err
    split = TextData([TextSource(str(work / "one.txt"), sample_by="paragraph")], tokenizer="byte", seq_len=32,
                     cache_dir=str(work / "cache"))
    split.setup()
    assert len(split.val_dataset()) > 0 and "no validation set" not in capsys.readouterr().err


def test_union_reports_show_config_errors_but_not_bugs():
    from lit_longctx.cli import _one_line
    from lit_longctx.nn.config import ConfigError, ModelConfig

    def report(problem: str) -> ValueError:
        return ValueError("Does not validate against any of the Union subtypes\nSubtypes: [str, ModelConfig]\n"
                          f"Errors:\n  - Expected a <class 'str'>\n  - {problem}\nGiven value: Namespace(dim=32)")

    with pytest.raises(ConfigError) as raised:
        ModelConfig(dim=32, n_heads=5)
    assert _one_line(report(str(raised.value)), []) == f"invalid configuration: {raised.value}"
    assert _one_line(report("'NoneType' object has no attribute 'shape'"), []) is None  # a bug keeps its traceback


@pytest.mark.parametrize(("arg", "value", "words"), [
    ("learning_rate", float("nan"), "must be a finite number"), ("weight_decay", -0.1, "is negative"),
    ("eps", -1e-8, "is negative"), ("betas", (0.9, 1.0), "two numbers in [0, 1)"),
    ("warmup_steps", -5, "is negative"), ("min_lr_ratio", 1.5, "must be in [0, 1]"),
    ("cosine_cycles", 0.0, "must be positive"), ("decay_steps", 0, "positive number of steps"),
])
def test_optimizer_arguments_are_checked_before_anything_is_built(arg, value, words):
    from lit_longctx.modules import CausalLM
    from lit_longctx.nn.config import ConfigError

    with pytest.raises(ConfigError, match=rf"model\.init_args\.{arg}=.*{re.escape(words)}"):
        CausalLM(model={"dim": 32, "n_layers": 1, "n_heads": 4, "ffn_dim": 64, "vocab_size": 64}, **{arg: value})
