"""The retrieval generator (template, depth, length, seeds), PasskeyData batches, and scoring against oracles."""

import re

import pytest
import torch

from lit_longctx.datamodules.passkey import PasskeyData, lockstep_shard
from lit_longctx.eval import tasks
from lit_longctx.eval.passkey import MultiKeyTask, PasskeyTask, first_integer, score_answer
from lit_longctx.tokenizers import ByteTokenizer, train_sentencepiece
from tests.eval import (
    EvalLM,
    no_number_reply,
    off_by_one_reply,
    oracle_reply,
    read_key,
    zero_reply,
)

# The seeds' prompt, written out from the spec (landmark.md §4), not taken from the code under test.
SPEC_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
             "I will quiz you about the important information there.")
SPEC_QUESTION = "What is the pass key? The pass key is"
SPEC_GROUP = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
SPEC_FILLER = " ".join([SPEC_GROUP] * 2000)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("sp")
    (root / "topics.txt").write_text("\n\n".join(topics.values()))
    return train_sentencepiece([root / "topics.txt"], root / "sp", vocab_size=1000)


@pytest.fixture(params=["byte", "sentencepiece"])
def tokenizer(request, sp_tokenizer):
    return ByteTokenizer() if request.param == "byte" else sp_tokenizer


def token_at(tokenizer, ids, char_offset):
    """Index of the token covering character ``char_offset`` of ``decode(ids)`` (binary search on decoded prefixes)."""
    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[: mid + 1])) > char_offset:
            hi = mid
        else:
            lo = mid + 1
    return lo


def test_standard_template_is_the_seeds_prompt():
    assert len(SPEC_GROUP) == 89
    sample = PasskeyTask(ByteTokenizer(), seed=7).sample(600, 0.4, trial=3)
    parts = sample.prompt.split("\n")
    assert len(parts) == 5
    key = sample.answer
    assert parts[0] == SPEC_TASK
    assert parts[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert parts[4] == SPEC_QUESTION
    assert SPEC_FILLER.startswith(parts[1]) and SPEC_FILLER.startswith(parts[3])
    assert parts[1].endswith(".")  # the prefix is snapped to a sentence boundary
    assert len(parts[1]) + len(parts[3]) == sample.filler_chars
    assert sample.input_ids == [256, *sample.prompt.encode()]  # BOS, then the UTF-8 bytes


@pytest.mark.parametrize("task_cls", [PasskeyTask, MultiKeyTask])
def test_lengths_within_tolerance(tokenizer, task_cls):
    task = task_cls(tokenizer, seed=11)
    for length in (700, 1000, 1536):
        for depth in (0.0, 0.3, 1.0):
            for trial in range(2):
                sample = task.sample(length, depth, trial)
                assert len(sample.input_ids) == len(tokenizer.encode(sample.prompt, bos=True))
                assert length - 2 <= sample.n_tokens <= length, (length, depth, trial, sample.n_tokens)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.8, 1.0])
def test_needle_sits_at_depth(tokenizer, depth):
    sample = PasskeyTask(tokenizer, seed=5).sample(1200, depth)
    ids = sample.input_ids
    text = tokenizer.decode(ids)
    needle = f"The pass key is {sample.answer}. Remember it. {sample.answer} is the pass key."
    start_char = text.index(needle)
    filler_start = token_at(tokenizer, ids, text.index("there.") + len("there.") + 1)
    needle_start = token_at(tokenizer, ids, start_char)
    needle_end = token_at(tokenizer, ids, start_char + len(needle) - 1) + 1
    question = token_at(tokenizer, ids, text.index(SPEC_QUESTION))
    filler_tokens = (needle_start - filler_start) + (question - needle_end)
    target = filler_start + depth * filler_tokens
    sentence = max(len(tokenizer.encode(" " + s.strip() + ".")) for s in SPEC_GROUP.split(".")[:-1])
    assert abs(needle_start - target) <= sentence + 1, (needle_start, target, sentence)
    assert abs(sample.needle_token - needle_start) <= 1


def test_multikey_needles_and_answer():
    task = MultiKeyTask(ByteTokenizer(), seed=3, n_keys=5)
    for depth in (0.0, 0.5, 1.0):
        sample = task.sample(1500, depth)
        found = dict(re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", sample.prompt))
        assert len(found) == 5  # five distinct names
        assert len(set(found.values())) == 5
        assert sample.name in found and int(found[sample.name]) == sample.answer == read_key(sample.prompt)
        assert sample.prompt.endswith(f"The special magic number for {sample.name} mentioned in the provided text is")
        pos = sample.prompt.index(f"One of the special magic numbers for {sample.name} is:")
        assert sample.input_ids[sample.needle_token] == ord("O") and sample.needle_token == pos + 1  # after BOS
        # the filler before the asked needle is `depth` of all filler, within one sentence
        context = sample.prompt.split("\n")[1]
        needle = re.compile(r" ?One of the special magic numbers for \S+ is: \d+\.")
        marked = context.replace(f"for {sample.name} is:", "for ASKED is:")
        before = marked[: marked.index("One of the special magic numbers for ASKED")]
        filler_before, filler_all = len(needle.sub("", before)), len(needle.sub("", context))
        assert abs(filler_before - depth * filler_all) <= len("There and back again. "), (filler_before, filler_all)


def test_keys_reproducible_by_seed(sp_tokenizer):
    byte = PasskeyTask(ByteTokenizer(), seed=42)
    again = PasskeyTask(ByteTokenizer(), seed=42)
    other = PasskeyTask(ByteTokenizer(), seed=43)
    cells = [(n, d, t) for n in (400, 800) for d in (0.0, 0.5) for t in range(3)]
    keys = [byte.sample(*c).answer for c in cells]
    assert keys == [again.sample(*c).answer for c in reversed(cells)][::-1]  # order of requests is irrelevant
    assert byte.sample(*cells[4]).prompt == again.sample(*cells[4]).prompt
    assert keys == [PasskeyTask(sp_tokenizer, seed=42).sample(*c).answer for c in cells]  # tokenizer-independent
    assert sum(k == o for k, o in zip(keys, [other.sample(*c).answer for c in cells])) <= 1
    assert len(set(keys)) >= len(cells) - 1 and all(1 <= k <= 50000 for k in keys)


def test_custom_template_and_errors():
    task = PasskeyTask(ByteTokenizer(), template="<{prefix}>[{key}]<{suffix}> key?", seed=1, bos=False)
    s = task.sample(300, 0.5)
    m = re.fullmatch(r"<(.*)>\[(\d+)\]<(.*)> key\?", s.prompt)
    assert m and int(m.group(2)) == s.answer and SPEC_FILLER.startswith(m.group(1)) and s.n_tokens == 300
    assert s.input_ids[0] != 256
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['answer'\].*\{prefix\}, \{key\}, \{suffix\}"):
        PasskeyTask(ByteTokenizer(), template="{prefix} {answer} {suffix}")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['suffix'\]"):
        PasskeyTask(ByteTokenizer(), template="{prefix} {key}")
    with pytest.raises(ValueError, match="shorter than the prompt without filler"):
        PasskeyTask(ByteTokenizer()).sample(100, 0.5)
    with pytest.raises(ValueError, match="depth must lie in"):
        PasskeyTask(ByteTokenizer()).sample(500, 1.5)
    with pytest.raises(ValueError, match="needle template has"):
        MultiKeyTask(ByteTokenizer(), needle_template="{name} = {number}")


def test_passkey_data_batches():
    dm = PasskeyData(tokenizer="byte", lengths=[300, 500], depths=[0.0, 1.0], trials=3, seed=9, max_new_tokens=7)
    batches = list(dm.test_dataloader())
    assert len(batches) == len(dm.test_dataloader()) == 12
    assert sorted(b["index"] for b in batches) == list(range(12))
    for b in batches:
        assert b["task"] == "passkey" and b["max_new_tokens"] == 7
        assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (1, b["n_tokens"])
        assert b["n_tokens"] == b["length"] and b["depth"] in (0.0, 1.0)
        assert read_key(ByteTokenizer().decode(b["input_ids"][0].tolist())) == b["answer"]
    assert [b["answer"] for b in batches] == [b["answer"] for b in PasskeyData(
        tokenizer="byte", lengths=[300, 500], depths=[0.0, 1.0], trials=3, seed=9).test_dataloader()]
    assert "session_kwargs" not in batches[0]
    multi = next(iter(PasskeyData(tokenizer="byte", lengths=[800], depths=[0.5], trials=1, task="multikey",
                                  session_kwargs={"prefill_chunk": 128}).predict_dataloader()))
    assert multi["task"] == "multikey" and multi["name"] in ByteTokenizer().decode(multi["input_ids"][0].tolist())
    assert multi["session_kwargs"] == {"prefill_chunk": 128}


def test_passkey_data_errors():
    with pytest.raises(ValueError, match="batch_size: 1"):
        PasskeyData(batch_size=8)
    with pytest.raises(ValueError, match="unknown retrieval task 'needle'; choose one of passkey, multikey"):
        PasskeyData(task="needle")
    with pytest.raises(ValueError, match=r"depths must lie in \[0, 1\]"):
        PasskeyData(depths=[0.5, 2.0])
    with pytest.raises(ValueError, match="unknown field"):
        PasskeyData(template="{prefix}{key}{suffix}{oops}")


def test_lockstep_shard_covers_everything_in_step():
    groups = [[0, 1, 2], [3, 4, 5, 6], [7]]
    shards = [lockstep_shard(groups, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2 + 2 + 1
    assert set(shards[0]) | set(shards[1]) == set(range(8))
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    assert all(group_of[a] == group_of[b] for a, b in zip(*shards))
    assert lockstep_shard(groups, 0, 1) == list(range(8))


def test_first_integer_scoring():
    assert first_integer(" 12345. Remember") == 12345
    assert first_integer("key is 007 or 8") == 7
    assert first_integer("none here") is None
    assert score_answer(" 4242 is it", 4242) == (4242, True)
    assert score_answer(" 4243", 4242) == (4243, False)
    assert score_answer(" no", 4242) == (None, False)


def _accuracy(module, dm):
    records = [tasks.evaluate_batch(module, b) for b in dm.test_dataloader()]
    return tasks.summarize(records)[dm.task], records


@pytest.mark.parametrize("task", ["passkey", "multikey"])
@pytest.mark.parametrize(("reply", "expected"),
                         [(oracle_reply, 1.0), (zero_reply, 0.0), (off_by_one_reply, 0.0), (no_number_reply, 0.0)])
def test_scripted_models_score_as_expected(task, reply, expected):
    dm = PasskeyData(tokenizer="byte", lengths=[800, 1200], depths=[0.0, 0.5, 1.0], trials=2, task=task)
    summary, records = _accuracy(EvalLM(reply), dm)
    assert summary["accuracy"] == expected and summary["total"] == 12
    assert all(c["accuracy"] == expected and c["total"] == 2 for c in summary["cells"])
    predicted = {oracle_reply: lambda a: a, zero_reply: lambda a: 0, off_by_one_reply: lambda a: a + 1,
                 no_number_reply: lambda a: None}[reply]
    assert all(r["prediction"] == predicted(r["answer"]) for r in records)


def test_random_model_beyond_training_length_is_scored_honestly():
    """A 256-token debug model at 1024 tokens: no crash, and accuracy is what its own greedy outputs imply."""
    torch.manual_seed(1)
    module = EvalLM(max_seq_len=256)
    dm = PasskeyData(tokenizer="byte", lengths=[256, 1024], depths=[0.0, 1.0], trials=1)
    summary, records = _accuracy(module, dm)
    expected = []
    for b, r in zip(dm.test_dataloader(), records):
        ids = b["input_ids"]
        with torch.no_grad():
            for _ in range(10):  # greedy, full recomputation each step, no cache
                ids = torch.cat([ids, module.model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        new = ids[0, b["n_tokens"]:].tolist()
        if 257 in new:
            new = new[: new.index(257)]
        text = bytes(t for t in new if t < 256).decode("utf-8", errors="replace")
        match = re.search(r"\d+", text)
        expected.append(bool(match) and int(match.group()) == b["answer"])
        assert r["output"] == text and r["n_tokens"] == b["n_tokens"]
    assert [r["correct"] for r in records] == expected
    assert summary["accuracy"] == sum(expected) / len(expected)
    assert max(r["n_tokens"] for r in records) == 1024
