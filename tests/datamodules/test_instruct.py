"""InstructData: Alpaca template, response-only aligned labels, packing, held-out split, order, errors (LoLCATs spec
§3 "Data")."""

import json
from pathlib import Path

import pytest
import torch

from lit_longctx.datamodules import InstructData
from lit_longctx.datamodules import instruct as instruct_module
from lit_longctx.datamodules.base import ResumableLoader

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "alpaca_tiny.jsonl"
BOS, EOS = 256, 257  # the byte tokenizer's

# the Stanford Alpaca prompts, written out here independently of the module
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\n{i}\n\n### Input:\n"
              "{x}\n\n### Response:\n")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{i}\n\n### Response:\n")


def records() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines()]


def expected_stream(recs: list[dict]) -> tuple[list[int], list[bool]]:
    """BOS + prompt bytes (not targets) + response bytes + EOS (targets), record after record."""
    ids, target = [], []
    for r in recs:
        prompt = (WITH_INPUT.format(i=r["instruction"], x=r["input"]) if r.get("input")
                  else NO_INPUT.format(i=r["instruction"]))
        p = [BOS] + list(prompt.encode())
        a = list(r["output"].encode()) + [EOS]
        ids += p + a
        target += [False] * len(p) + [True] * len(a)
    return ids, target


def data(tmp_path, path=FIXTURE, **kw) -> InstructData:
    kw = {"tokenizer": "byte", "seq_len": 96, "batch_size": 2, "val_samples": 8, "cache_dir": str(tmp_path / "c"),
          **kw}
    dm = InstructData(str(path), **kw)
    dm.setup("fit")
    return dm


def write_jsonl(path: Path, recs: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_template_bos_eos_and_response_mask_are_exact(tmp_path):
    dm = data(tmp_path)
    for split, recs in (("val", records()[:8]), ("train", records()[8:])):
        ids, mask = dm.streams()[split]
        want_ids, want_mask = expected_stream(recs)
        assert ids.tolist() == want_ids and mask.tolist() == want_mask
    assert dm.max_token_id == EOS


def test_rows_are_consecutive_chunks_with_aligned_response_labels(tmp_path):
    dm = data(tmp_path)
    ids, target = expected_stream(records()[8:])
    t = 96
    rows = [dm.packed("train").row(i) for i in range(len(dm.packed("train")))]
    kept = []
    for r in range((len(ids) - 1) // t):  # the incomplete tail is dropped
        labels = [ids[r * t + j + 1] if target[r * t + j + 1] else -100 for j in range(t)]
        if any(label != -100 for label in labels):  # rows without a response target are dropped
            kept.append({"input_ids": ids[r * t: r * t + t], "labels": labels})
    assert 0 < len(kept) < (len(ids) - 1) // t  # the fixture has prompt-only rows
    assert [{k: v.tolist() for k, v in row.items()} for row in rows] == kept
    # aligned targets: wherever a label is set it is the next input token
    row = rows[0]
    nxt = torch.cat([row["input_ids"][1:], torch.tensor([-1])])
    set_ = row["labels"] != -100
    assert torch.equal(row["labels"][set_][:-1], nxt[set_][:-1])


def test_first_records_are_held_out_for_validation(tmp_path):
    dm = data(tmp_path, val_samples=5)
    val_ids, _ = dm.streams()["val"]
    train_ids, _ = dm.streams()["train"]
    assert val_ids.tolist() == expected_stream(records()[:5])[0]
    assert train_ids.tolist() == expected_stream(records()[5:])[0]
    val = dm.val_dataset()
    assert len(val) == len(dm.packed("val")) and torch.equal(val[0]["input_ids"], dm.packed("val").row(0)["input_ids"])
    assert data(tmp_path, val_samples=0).val_dataset() is None


def test_json_list_files_are_read_too(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records()))
    assert data(tmp_path, path=path).streams()["train"][0].tolist() == expected_stream(records()[8:])[0]


def test_training_order_is_seeded_complete_and_resumable(tmp_path):
    dm = data(tmp_path, batch_size=1)
    n = len(dm.packed("train"))
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    seen = [b["input_ids"][0] for b in loader]
    assert len(seen) == n
    rows = {tuple(dm.packed("train").row(i)["input_ids"].tolist()) for i in range(n)}
    assert {tuple(s.tolist()) for s in seen} == rows  # each row once per epoch
    in_order = [tuple(dm.packed("train").row(i)["input_ids"].tolist()) for i in range(n)]
    assert [tuple(s.tolist()) for s in seen] != in_order  # shuffled
    again = data(tmp_path, batch_size=1).train_dataloader()
    it = iter(again)
    for _ in range(3):
        next(it)
    state = again.state_dict()
    resumed = data(tmp_path, batch_size=1).train_dataloader()
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["input_ids"][0], seen[3])


def test_tokenized_streams_are_cached_and_invalidated_by_changes(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", records())
    first = data(tmp_path, path=path).streams()["train"][0]

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(instruct_module, "tokenize_records", fail)
    assert (data(tmp_path, path=path).streams()["train"][0] == first).all()
    write_jsonl(path, records()[:-1])
    with pytest.raises(AssertionError, match="tokenized again"):
        data(tmp_path, path=path)


def test_custom_fields_and_templates(tmp_path):
    recs = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(6)]
    path = write_jsonl(tmp_path / "qa.jsonl", recs)
    dm = data(tmp_path, path=path, instruction_field="q", output_field="a", input_field="ctx",
              prompt_no_input="Q: {instruction}\nA: ", val_samples=1, seq_len=8)
    ids, mask = dm.streams()["train"]
    assert bytes(i for i in ids.tolist() if i < 256).decode().startswith("Q: question 1\nA: answer 1Q: question 2")
    assert mask.sum() == sum(len(f"answer {i}") + 1 for i in range(1, 6))


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("recs", "kw", "match"), [
    ([{"instruction": "x", "input": ""}] * 3, {"val_samples": 1}, r"record 0 of .* no 'output' field.*output_field"),
    ([{"instruction": "x", "output": "y"}, {"output": "z"}], {"val_samples": 0}, r"record 1 of .*'instruction'"),
    ([{"instruction": "x", "output": 3}] * 3, {"val_samples": 1}, r"record 0 of .*must be strings"),
    ([{"instruction": "x", "output": "y"}] * 3, {"val_samples": 3}, "val_samples=3 leaves no training records"),
])
def test_bad_records_name_the_problem(tmp_path, recs, kw, match):
    path = write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(ValueError, match=match):
        data(tmp_path, path=path, **kw)


def test_bad_files_and_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl.*not found"):
        data(tmp_path, path=tmp_path / "nope.jsonl")
    (tmp_path / "obj.json").write_text(json.dumps({"instruction": "x"}))
    with pytest.raises(ValueError, match="must be a list of records"):
        data(tmp_path, path=tmp_path / "obj.json")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown extension '.csv'"):
        data(tmp_path, path=tmp_path / "d.csv")
    with pytest.raises(ValueError, match="prompt_input must contain {input}"):
        InstructData(str(FIXTURE), prompt_input="{instruction} only")
    with pytest.raises(ValueError, match="val_samples must be an integer >= 0"):
        InstructData(str(FIXTURE), val_samples=-1)
    dm = data(tmp_path, seq_len=100_000)
    with pytest.raises(ValueError, match="no row of seq_len=100000"):
        dm.train_stream()


def test_unreachable_hub_dataset_is_one_clear_error(tmp_path):
    dm = InstructData("hf:nobody/no-such-alpaca", tokenizer="byte", cache_dir=str(tmp_path))
    with pytest.raises(ConnectionError, match="cannot load hub dataset 'nobody/no-such-alpaca'"):
        dm.setup("fit")


def test_context_schedule_stages_continue_the_packed_stream(tmp_path):
    """Stages of T = 48 (B 2), 96 (B 1), 24 (B 4): each stage's rows start where the last stage's last row ended, every
    row is the file's tokens at its start (expected_stream, written independently), no token is a target twice."""
    from lit_longctx.datamodules.staged import Segment, StagedLoader

    dm = data(tmp_path, shuffle=False, seq_len=48)
    ids, target = expected_stream(records()[8:])
    segments = [Segment(0, 48, 2), Segment(3, 96, 1), Segment(6, 24, 4)]
    batches = list(StagedLoader(dm, segments, 9, 0, 1))
    # the reference cut: consecutive rows of each stage's T from the stage's start, rows without a target skipped
    expected, start = [], 0
    for seg, n in zip(segments, (6, 3, 12)):
        got = 0
        while got < n:
            t = seg.seq_len
            if any(target[start + 1: start + t + 1]):
                expected.append((start, t))
                got += 1
            start += t
    rows = [(ids_row, labels_row) for b in batches for ids_row, labels_row in zip(b["input_ids"], b["labels"])]
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 48)] * 3 + [(1, 96)] * 3 + [(4, 24)] * 3
    assert len(rows) == len(expected)
    targets_seen = []
    for (row, labels), (s, t) in zip(rows, expected):
        assert row.tolist() == ids[s: s + t]
        keep = [j for j in range(t) if target[s + j + 1]]
        assert [j for j in range(t) if labels[j] != -100] == keep
        targets_seen += [s + j + 1 for j in keep]
    assert len(targets_seen) == len(set(targets_seen))


def test_context_schedule_needs_the_rows_in_order(tmp_path):
    with pytest.raises(ValueError, match="set data.init_args.shuffle: false"):
        data(tmp_path, shuffle=True).stage_stream(48, 0)
