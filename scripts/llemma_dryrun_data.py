"""Tiny stand-ins for the five components of Llemma's data mixture, for the CPU dry run of the recipe.

Writes ``<out>/<component>/train.jsonl`` for arxiv-rp, open-web-math, code-with-proofsteps, pile-sample and code-rp
(the names of the seed's data_mixture.yml), each a disjoint slice of Python's own documentation topics, so that
``configs/llemma_dryrun.yaml`` runs the real mixture code path without any download:

    python scripts/llemma_dryrun_data.py runs/llemma_dryrun/data
    lit-longctx fit --config configs/llemma_7b.yaml --config configs/llemma_dryrun.yaml
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COMPONENTS = ("arxiv-rp", "open-web-math", "code-with-proofsteps", "pile-sample", "code-rp")


def write_components(out: str | Path, docs_per_component: int = 12, chars: int = 4000) -> Path:
    from pydoc_data.topics import topics

    texts = [t[:chars] for t in topics.values() if len(t) > 500]
    out = Path(out)
    for i, name in enumerate(COMPONENTS):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        part = texts[i * docs_per_component:(i + 1) * docs_per_component]
        (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="runs/llemma_dryrun/data")
    print(write_components(parser.parse_args().out))
