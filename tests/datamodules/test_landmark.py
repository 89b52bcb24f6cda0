"""Landmark insertion, labels and vocabulary helpers (spec §1, oracle 6), checked against explicit loops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lit_longctx.datamodules.landmark import (
    LandmarkInsertion,
    insert_landmarks,
    landmark_labels,
    landmark_token_id,
    mean_init_rows,
    remove_landmarks,
    resize_token_embeddings,
)
from lit_longctx.nn import ModelConfig, Transformer
from lit_longctx.tokenizers import ByteTokenizer

LM = 999
EOT = 998


def loop_insert(ids: list[int], ell: int, per_row: bool) -> list[int]:
    """Spec §1.2 word for word: per-row = before row index t for t = ℓ, 2ℓ, … < n; global = after t ≡ ℓ−1 (mod ℓ)."""
    out = []
    for t, x in enumerate(ids):
        if per_row and t > 0 and t % ell == 0:
            out.append(LM)
        out.append(x)
        if not per_row and t % ell == ell - 1:
            out.append(LM)
    return out


@pytest.mark.parametrize(("n", "ell", "per_row", "global_"), [(512, 50, 10, 10), (500, 50, 9, 10), (7, 3, 2, 2)])
def test_landmark_counts_and_positions(n, ell, per_row, global_):
    ids = torch.randint(0, 900, (n,))
    a = insert_landmarks(ids, ell, LM, "per_row")
    g = insert_landmarks(ids, ell, LM, "global")
    assert int((a == LM).sum()) == per_row and int((g == LM).sum()) == global_
    assert a.tolist() == loop_insert(ids.tolist(), ell, per_row=True)
    assert g.tolist() == loop_insert(ids.tolist(), ell, per_row=False)
    for aug in (a, g):
        where = torch.nonzero(aug == LM).flatten()
        assert where.tolist() == [i * (ell + 1) + ell for i in range(len(where))]
    if n == 512:
        assert a.shape[0] == 522


def test_round_trip_both_rules_and_inputs():
    rows = np.random.default_rng(0).integers(0, 900, size=(3, 120))
    for rule in ("per_row", "global"):
        aug = insert_landmarks(rows, 10, LM, rule)
        assert aug.shape == (3, 120 + (11 if rule == "per_row" else 12))
        assert torch.equal(remove_landmarks(aug, LM), torch.as_tensor(rows))
        assert remove_landmarks(aug[0].tolist(), LM).tolist() == rows[0].tolist()


def test_global_grid_continues_across_pieces():
    stream = torch.randint(0, 900, (257,))
    whole = insert_landmarks(stream, 7, LM, "global")
    for cut in (0, 3, 7, 100):
        parts = torch.cat([insert_landmarks(stream[:cut], 7, LM, "global"),
                           insert_landmarks(stream[cut:], 7, LM, "global", start=cut)])
        assert torch.equal(parts, whole)


def loop_labels_pg19(x: list[int]) -> list[int]:
    """optim/utils.py's rule: next token, skipping a landmark; ignore at landmark and EOT inputs."""
    out = []
    for t in range(len(x)):
        if x[t] in (LM, EOT) or t + 1 >= len(x):
            out.append(-100)
        elif x[t + 1] == LM:
            out.append(x[t + 2] if t + 2 < len(x) else -100)
        else:
            out.append(x[t + 1])
    return out


def test_labels_pg19_convention():
    stream = torch.randint(0, 900, (300,))
    stream[[40, 41, 170]] = EOT
    aug = insert_landmarks(stream, 9, LM, "global")
    window = aug[13:13 + 120]  # windows start mid-block
    labels = landmark_labels(window, LM, eot_id=EOT)
    assert labels.tolist() == loop_labels_pg19(window.tolist())
    assert not bool((labels == LM).any())
    assert bool((labels[(window == LM) | (window == EOT)] == -100).all())
    before = torch.nonzero(window[1:-1] == LM).flatten()  # the token before a landmark targets the token after it
    assert torch.equal(labels[before], window[before + 2])


def test_labels_llama_convention_keeps_landmarks():
    row = torch.randint(0, 900, (60,))
    row[-5:] = 0  # [PAD]
    aug = insert_landmarks(row, 9, LM)
    labels = landmark_labels(aug, LM, include_landmark_in_loss=True, pad_id=0)
    expected = [aug[t + 1].item() if t + 1 < len(aug) and aug[t + 1] != 0 else -100 for t in range(len(aug))]
    assert labels.tolist() == expected
    assert int((labels == LM).sum()) == int((aug == LM).sum())  # every landmark is predicted once


def test_transform_equals_stream_pipeline_pg19():
    """Insertion over an aligned-label batch = augmenting the stream and labelling windows of it (grid at 0)."""
    stream = torch.randint(0, 900, (2, 301))
    stream[0, [17, 90]] = EOT
    for n in (120, 117):  # ends on a landmark / mid-block
        batch = {"input_ids": stream[:, :n], "labels": stream[:, 1 : n + 1]}
        out = LandmarkInsertion(6, LM, rule="global", eot_id=EOT)(batch)
        aug = insert_landmarks(stream, 6, LM, "global")
        n_aug = n + n // 6
        assert torch.equal(out["input_ids"], aug[:, :n_aug])
        assert torch.equal(out["labels"], landmark_labels(aug[:, : n_aug + 2], LM, eot_id=EOT)[:, :n_aug])


def test_transform_per_row_with_landmarks_in_loss():
    x = torch.randint(0, 900, (2, 40))
    y = torch.cat([x[:, 1:], torch.randint(0, 900, (2, 1))], 1)  # source knows the token after the row
    out = LandmarkInsertion(8, LM, include_landmark_in_loss=True)(
        {"input_ids": x, "labels": y, "position_ids": torch.arange(40).expand(2, -1)})
    aug = out["input_ids"]
    assert aug.shape == (2, 44)
    expected = landmark_labels(torch.cat([aug, y[:, -1:]], 1), LM, include_landmark_in_loss=True)[:, :-1]
    assert torch.equal(out["labels"], expected)
    assert torch.equal(out["position_ids"], torch.arange(44).expand(2, -1))
    y2 = y.clone()
    y2[:, 7] = -100  # an ignored target stays ignored, also at the landmark that follows it
    out2 = LandmarkInsertion(8, LM, include_landmark_in_loss=True)({"input_ids": x, "labels": y2})
    assert bool((out2["labels"][:, 7] == -100).all()) and bool((out2["labels"][:, 8] == -100).all())


def test_transform_default_labels_skip_landmarks():
    x = torch.randint(0, 900, (1, 30))
    y = torch.cat([x[:, 1:], torch.tensor([[5]])], 1)
    out = LandmarkInsertion(5, LM)({"input_ids": x, "labels": y})
    labels, aug = out["labels"][0], out["input_ids"][0]
    assert not bool((labels == LM).any()) and bool((labels[aug == LM] == -100).all())
    assert torch.equal(labels[aug != LM], y[0])  # regular tokens keep their own targets


def test_transform_refuses_what_it_cannot_extend():
    x = torch.randint(0, 900, (2, 12))
    with pytest.raises(ValueError, match="contiguous position_ids"):
        LandmarkInsertion(4, LM)({"input_ids": x, "position_ids": torch.cat([torch.arange(6)] * 2).expand(2, -1)})
    with pytest.raises(ValueError, match="'loss_mask' is per-token"):
        LandmarkInsertion(4, LM)({"input_ids": x, "loss_mask": torch.ones(2, 12)})
    with pytest.raises(ValueError, match="mem_freq must be an integer >= 1"):
        LandmarkInsertion(0, LM)
    with pytest.raises(ValueError, match="rule='pg19' is unknown"):
        insert_landmarks(x, 4, LM, rule="pg19")
    with pytest.raises(ValueError, match="remove_landmarks"):
        insert_landmarks(torch.tensor([1, LM, 2]), 4, LM)
    with pytest.raises(ValueError, match="start only applies"):
        insert_landmarks(x, 4, LM, start=3)


def test_landmark_token_id_adds_once():
    tok = ByteTokenizer()
    first = landmark_token_id(tok)
    assert first == 259 and tok.vocab_size == 260
    assert landmark_token_id(tok) == first and tok.vocab_size == 260


@pytest.mark.parametrize("tied", [False, True])
def test_resize_token_embeddings_mean_init(tied):
    config = ModelConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, ffn_dim=32, tie_embeddings=tied)
    model = Transformer(config)
    old_emb = model.model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    ids = torch.randint(0, 50, (1, 9))
    before = model(ids).logits.detach()
    resize_token_embeddings(model, 52)
    assert model.config.vocab_size == 52 and model.model.embed_tokens.weight.shape == (52, 16)
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    torch.testing.assert_close(emb[:50], old_emb, rtol=0, atol=0)
    torch.testing.assert_close(emb[50:], old_emb.mean(0).expand(2, -1), rtol=0, atol=1e-7)
    torch.testing.assert_close(head[50:], old_head.mean(0).expand(2, -1), rtol=0, atol=1e-7)
    assert (head is emb) == tied
    after = model(ids).logits.detach()
    torch.testing.assert_close(after[..., :50], before, rtol=0, atol=1e-6)  # old tokens keep their logits
    assert model(torch.tensor([[51]])).logits.shape[-1] == 52
    with pytest.raises(ValueError, match="shrinking"):
        resize_token_embeddings(model, 40)
    with pytest.raises(ValueError, match="start must be"):
        mean_init_rows(model, 0)


# ------------------------------------------------------------------------------------------------ LandmarkData
def _docs(n: int = 12) -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, size=int(rng.integers(40, 120))).tolist() for _ in range(n)]


@pytest.fixture
def token_dir(tmp_path):
    from lit_longctx.datamodules import write_token_files

    docs = _docs()
    return write_token_files(tmp_path / "tokens", {"train": docs, "val": docs[:3]}, tokenizer="byte")


def landmark_data(token_dir, **kwargs):
    from lit_longctx.datamodules import LandmarkData, TokenFiles

    inner = TokenFiles(str(token_dir), seq_len=32, batch_size=2, seed=5, train_order="shuffled")
    return LandmarkData(inner, mem_freq=8, **kwargs), inner


def loop_augment(x: list[int], y: list[int], ell: int, include: bool) -> tuple[list[int], list[int]]:
    """Per-row insertion with aligned targets, one token at a time (spec §1.2-1.3)."""
    ids, labels = [], []
    for t, (xt, yt) in enumerate(zip(x, y)):
        if t > 0 and t % ell == 0:
            ids.append(LANDMARK)
            labels.append(y[t - 1] if include and y[t - 1] != -100 else -100)
            if include and y[t - 1] != -100:
                labels[-2] = LANDMARK  # the token before the landmark predicts it
        ids.append(xt)
        labels.append(yt)
    return ids, labels


LANDMARK = 259  # the byte tokenizer's next free id


@pytest.mark.parametrize("include", [False, True])
def test_landmark_data_inserts_into_the_inner_rows(token_dir, include):
    data, inner = landmark_data(token_dir, include_landmark_in_loss=include)
    data.setup("fit")
    assert data.vocab_size == 260 and data.landmark_id == LANDMARK and data.augmented_len == 32 + 3
    assert inner.tokenizer.vocab_size == 259  # the inner module's tokenizer is not changed
    ours, theirs = iter(data.train_dataloader()), iter(inner.train_dataloader())
    for _ in range(3):
        got, plain = next(ours), next(theirs)
        assert "position_ids" not in got  # landmark attention runs over the whole row
        assert got["input_ids"].shape == (2, 35)
        for r in range(2):
            ids, labels = loop_augment(plain["input_ids"][r].tolist(), plain["labels"][r].tolist(), 8, include)
            assert got["input_ids"][r].tolist() == ids and got["labels"][r].tolist() == labels
    val = data.val_dataset()
    row, plain = val[1], inner.val_dataset()[1]
    assert row["input_ids"].tolist() == loop_augment(plain["input_ids"].tolist(), plain["labels"].tolist(), 8,
                                                     include)[0]


def test_landmark_data_resumes_where_it_stopped(token_dir):
    data, _ = landmark_data(token_dir)
    data.setup("fit")
    loader = data.train_dataloader()
    straight = [b["input_ids"] for _, b in zip(range(6), loader)]
    data2, _ = landmark_data(token_dir)
    data2.setup("fit")
    first = data2.train_dataloader()
    for _, _b in zip(range(2), first):
        pass
    state = data2.state_dict()
    data3, _ = landmark_data(token_dir)
    data3.setup("fit")
    data3.load_state_dict(state)
    resumed = [b["input_ids"] for _, b in zip(range(4), data3.train_dataloader())]
    assert all(torch.equal(a, b) for a, b in zip(straight[2:], resumed))
    assert state["train_loader"]["num_samples"] == data3.data.train_stream().num_samples


def test_landmark_data_global_rule_and_eos(tmp_path):
    from lit_longctx.datamodules import LandmarkData, TextData

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": "abcdefghij"}) + "\n" for _ in range(8)))
    inner = TextData([str(tmp_path / "docs.jsonl")], tokenizer="byte", seq_len=24, batch_size=1,
                     cache_dir=str(tmp_path / "cache"), val_fraction=0.0, shuffle=False)
    data = LandmarkData(inner, mem_freq=8, rule="global", ignore_eos_inputs=True)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    plain = next(iter(inner.train_dataloader()))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids.shape == (24 + 3,) and data.augmented_len == 27  # a landmark also closes the row's last block
    assert torch.equal(remove_landmarks(ids, LANDMARK), plain["input_ids"][0])
    assert torch.nonzero(ids == LANDMARK).flatten().tolist() == [8, 17, 26]
    eos = plain["input_ids"][0] == ByteTokenizer.eos_id  # documents of 12 tokens: [BOS] + 10 bytes + [EOS]
    assert eos.tolist().count(True) == 2
    expected = plain["labels"][0].masked_fill(eos, -100)  # no loss on the first token of the next document
    assert torch.equal(labels[ids != LANDMARK], expected) and bool((labels[ids == LANDMARK] == -100).all())


def test_landmark_data_parses_a_nested_data_module(token_dir):
    from jsonargparse import ArgumentParser

    from lit_longctx.datamodules import LandmarkData

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LandmarkData, "data")
    cfg = parser.parse_object({"data": {"mem_freq": 8, "data": {
        "class_path": "lit_longctx.datamodules.TokenFiles",
        "init_args": {"data_dir": str(token_dir), "seq_len": 32, "batch_size": 2}}}})
    data = parser.instantiate_classes(cfg).data
    assert isinstance(data, LandmarkData) and data.seq_len == 32 and data.batch_size == 2
    assert type(data.data).__name__ == "TokenFiles"


def test_landmark_data_with_the_passkey_mixture(tmp_path):
    from lit_longctx.datamodules import LandmarkData
    from lit_longctx.datamodules.passkey import PasskeyMixData

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": "Some text. " * 40}) + "\n" for _ in range(4)))
    inner = PasskeyMixData([str(tmp_path / "docs.jsonl")], passkey_fraction=1.0, passkey_lengths=(300, 321),
                           tokenizer="byte", seq_len=320, batch_size=2, cache_dir=str(tmp_path / "cache"),
                           val_fraction=0.0)
    data = LandmarkData(inner, mem_freq=32)
    data.setup("fit")
    batch, plain = next(iter(data.train_dataloader())), next(iter(inner.train_dataloader()))
    assert batch["input_ids"].shape == (2, 320 + 9)
    assert torch.equal(remove_landmarks(batch["input_ids"], LANDMARK), plain["input_ids"])
    assert torch.equal(batch["labels"][batch["input_ids"] != LANDMARK].view(2, 320), plain["labels"])


def test_landmark_data_errors(token_dir):
    from lit_longctx.datamodules import LandmarkData, TokenFiles

    inner = TokenFiles(str(token_dir), seq_len=32, batch_size=2)
    with pytest.raises(ValueError, match="seq_len=64 but the inner data module makes rows of 32"):
        LandmarkData(inner, seq_len=64)
    with pytest.raises(ValueError, match="already a LandmarkData"):
        LandmarkData(LandmarkData(inner))
    with pytest.raises(TypeError, match="must be a lit-longctx DataModule"):
        LandmarkData("data/")
    with pytest.raises(ValueError, match="rule='pg19' is unknown"):
        LandmarkData(inner, rule="pg19")
    with pytest.raises(ValueError, match="mem_freq must be an integer >= 1"):
        LandmarkData(inner, mem_freq=0)
