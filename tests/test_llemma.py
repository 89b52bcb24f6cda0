"""The Llemma recipe: global-batch arithmetic, the five-source mixture sampled in its published proportions and
resumed per source, and a CPU dry run of configs/llemma_7b.yaml + configs/llemma_dryrun.yaml."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch
import yaml

from lit_longctx.batch import accumulation_for, tokens_per_step
from tests.cli_helpers import REPO, run

ALPHABET = 18  # component c writes only the ASCII bytes 33 + 18c ... 33 + 18c + 17, so a row names its source


def _sources(config: str) -> list[dict]:
    return yaml.safe_load((REPO / "configs" / config).read_text())["data"]["init_args"]["sources"]


def test_global_batch_matches_the_published_layouts_and_refuses_what_does_not_divide():
    # spec §3.4 / §7.14: 7B (T=4096, 256 GPUs, B=4, G=2, TP=2) and 34B (B=2, G=16, TP=8) are both 4,194,304 tokens
    assert tokens_per_step(4096, 256, 4, 2, tensor_parallel=2) == 4_194_304
    assert tokens_per_step(4096, 256, 2, 16, tensor_parallel=8) == 4_194_304
    assert accumulation_for(4_194_304, 4096, 256, 4, tensor_parallel=2) == 2
    assert accumulation_for(4_194_304, 4096, 256, 2, tensor_parallel=8) == 16
    # the layouts scripts/slurm/train.sbatch documents: 7B on 32 / 16 / 4 nodes of 8 GPUs, 34B on 32 nodes
    assert [accumulation_for(4_194_304, 4096, nodes * 8, 4) for nodes in (32, 16, 4)] == [1, 2, 8]
    assert accumulation_for(4_194_304, 4096, 256, 2) == 2
    with pytest.raises(ValueError, match=r"4,194,304 tokens does not divide .* use 3,932,160 or 4,325,376 tokens"):
        accumulation_for(4_194_304, 4096, 24, 4)
    with pytest.raises(ValueError, match="multiple of their product"):
        tokens_per_step(4096, 12, 4, 1, tensor_parallel=8)


def _component_data(root: Path) -> list[dict]:
    """The 7B config's five sources and weights, each pointed at real text rewritten in its own byte alphabet."""
    from pydoc_data.topics import topics

    texts = [t for t in topics.values() if len(t) > 2000]
    sources = []
    for c, spec in enumerate(_sources("llemma_7b.yaml")):
        name = Path(spec["path"]).parent.name  # .../<component>/train
        d = root / name
        d.mkdir(parents=True)
        docs = ["".join(chr(33 + ALPHABET * c + ord(ch) % ALPHABET) for ch in t[:3000])
                for t in texts[c * 8:(c + 1) * 8]]
        (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        sources.append({"path": str(d), "weight": spec["weight"]})
    return sources


def _source_of(row: torch.Tensor) -> int:
    ids = row[row < 256]
    found = set(((ids - 33) // ALPHABET).tolist())
    assert len(found) == 1, found  # a row never mixes components
    return found.pop()


def test_mixture_samples_the_published_proportions_and_resumes_per_source(tmp_path):
    from lit_longctx.datamodules import TextData

    sources = _component_data(tmp_path / "data")
    weights = [s["weight"] for s in sources]
    assert weights == [2, 4, 1, 0.147368, 0.221053]  # data_mixture.yml

    def data() -> TextData:
        return TextData(sources=sources, tokenizer="byte", seq_len=32, batch_size=8, cache_dir=str(tmp_path / "c"),
                        val_fraction=0.0)

    batches = list(islice(iter(data().train_dataloader()), 150))
    rows = torch.cat([b["input_ids"] for b in batches])
    counts = torch.bincount(torch.tensor([_source_of(r) for r in rows]), minlength=5)
    n = len(rows)  # 1200 rows
    expected = torch.tensor(weights) / sum(weights) * n
    # greedy blending (spec §3.3, §7.13): every component within 1 row of its share (27.14/54.29/13.57/2/3 %)
    assert (counts - expected).abs().max() <= 1.0, (counts.tolist(), expected.tolist())

    # resume after 90 batches: the next batches are those of the uninterrupted stream, each source where it left off
    first = data().train_dataloader()
    state = None
    for i, _ in enumerate(first):
        if i == 89:
            state = first.state_dict()
            break
    loader = data().train_dataloader()
    loader.load_state_dict(state)
    for expected_batch, got in zip(batches[90:], loader):
        assert torch.equal(expected_batch["input_ids"], got["input_ids"])


@pytest.mark.slow
def test_dry_run_of_the_recipe_trains_with_the_derived_accumulation(tmp_path, monkeypatch, capsys):
    from lit_longctx.cli import main

    dry = _sources("llemma_dryrun.yaml")
    assert [s["weight"] for s in dry] == [s["weight"] for s in _sources("llemma_7b.yaml")]
    assert [Path(s["path"]).name for s in dry] == [Path(s["path"]).parent.name for s in _sources("llemma_7b.yaml")]
    monkeypatch.chdir(tmp_path)
    import runpy

    runpy.run_path(str(REPO / "scripts" / "llemma_dryrun_data.py"), run_name="not_main")["write_components"](
        "runs/llemma_dryrun/data")
    configs = ["--config", str(REPO / "configs/llemma_7b.yaml"), "--config", str(REPO / "configs/llemma_dryrun.yaml")]
    cli = run("fit", *configs)
    assert cli.trainer.accumulate_grad_batches == 2  # 256 tokens / (64 tokens x 2 rows x 1 device)
    assert cli.trainer.global_step == 6
    assert cli.model.tokens_seen == 6 * 256
    assert cli.model.model_config.rope.rope_theta == 10000.0

    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  callbacks:\n    - class_path: lit_longctx.callbacks.GlobalBatch\n"
                   "      init_args: {tokens: 300}\n  default_root_dir: runs/bad\n")
    with pytest.raises(SystemExit) as info:  # a global batch that does not divide: one line, nothing trained
        main(["fit", *configs, "--config", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and err.startswith("error: a global batch of 300 tokens does not divide"), err
    assert not Path("runs/bad/checkpoints").exists()
