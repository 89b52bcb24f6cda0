"""``LandmarkData(rule="stream")``: the seed's PG19 windows, the landmark grid global across rows.

Oracle: for each row, a slow construction of the seed's pipeline (landmarks inserted once on a stream in which the
row's tokens sit at grid phase φ, a window of T + ⌊T/ℓ⌋ tokens cut at the row's first token, labels by the PG19 /
LLaMA conventions of spec §1.3 computed on that window); every phase 0..ℓ (a window opening on a landmark included)
must occur, and the model's blockwise path must agree with the reference path on such windows.
"""

from __future__ import annotations

import pytest
import torch

from lit_longctx.datamodules.landmark import insert_landmarks, landmark_labels
from lit_longctx.nn import ModelConfig, Transformer
from tests.datamodules.test_landmark import LANDMARK, landmark_data, token_dir  # noqa: F401  (fixture)

ELL, T = 8, 32
L = T + T // ELL


def seed_window(x: list[int], nxt: int, phase: int, include: bool) -> tuple[list[int], list[int]]:
    """Stream = φ filler tokens, the row, its next token; insert once (PG19 rule); cut L tokens at the row."""
    stream = [0] * phase + x + [nxt]
    aug = insert_landmarks(torch.tensor(stream), ELL, LANDMARK, "global")
    window = aug[phase : phase + L + 2]
    labels = landmark_labels(window, LANDMARK, include_landmark_in_loss=include)
    return window[:L].tolist(), labels[:L].tolist()


@pytest.mark.parametrize("include", [False, True])
def test_stream_rows_are_windows_of_one_globally_augmented_stream(token_dir, include):  # noqa: F811
    data, inner = landmark_data(token_dir, rule="stream", include_landmark_in_loss=include)
    data.setup("fit")
    assert data.augmented_len == L
    ours, theirs = data.train_stream(), inner.train_stream()
    assert next(iter(data.train_dataloader()))["input_ids"].shape == (2, L)
    phases = set()
    for epoch in range(3):
        for position in range(ours.num_samples):
            got, plain = ours.sample_at(epoch, position), theirs.sample_at(epoch, position)
            x, y = plain["input_ids"].tolist(), plain["labels"].tolist()
            windows = {p: seed_window(x, y[-1], p, include) for p in range(ELL + 1)}
            matches = [p for p, (ids, _) in windows.items() if ids == got["input_ids"].tolist()]
            assert len(matches) == 1
            phases.add(matches[0])
            assert got["labels"].tolist() == windows[matches[0]][1]
    assert phases == set(range(ELL + 1))  # mid-block starts, grid-aligned starts and starts on a landmark
    rows = [data.val_dataset()[i]["input_ids"] for i in range(3)]
    assert all(len(row) == L for row in rows) and rows[0].tolist() == data.val_dataset()[0]["input_ids"].tolist()


def test_blockwise_path_handles_stream_windows(token_dir):  # noqa: F811
    data, _ = landmark_data(token_dir, rule="stream")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    opts = {"landmark_id": LANDMARK, "mem_freq": ELL}
    cfg = ModelConfig(vocab_size=data.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64,
                      max_seq_len=64, attention="landmark", attention_options={"landmark": opts})
    model = Transformer(cfg).eval()
    reference = Transformer(cfg.replace(attention_options={"landmark": {**opts, "path": "reference"}})).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(batch["input_ids"]).logits, reference(batch["input_ids"]).logits,
                                   rtol=1e-5, atol=1e-5)
