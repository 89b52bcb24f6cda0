"""Instruction-following records (Alpaca style) packed into rows with response-only labels.

The LoLCATs recipe (spec §3 "Data"; reference ``src/dataloaders/alpaca_clean.py``) on ``yahma/alpaca-cleaned``:

- each record ``{instruction, input, output}`` becomes ``[BOS] + prompt + response + [EOS]``, where the prompt is the
  Alpaca template ``prompt_input`` when ``input`` is non-empty, else ``prompt_no_input`` (Taori et al. 2023), and the
  response is ``output``; prompt and response are tokenized separately, so the boundary is exact;
- only response tokens (and the EOS) are targets: with aligned labels (``labels[t]`` is the target of
  ``input_ids[t]``, i.e. the token at t+1), ``labels[t] = -100`` wherever token t+1 belongs to a prompt;
- all records are concatenated into one stream and cut into consecutive rows of T tokens (row r holds tokens
  rT..rT+T-1 and their targets rT+1..rT+T, so no target is lost at row ends; the incomplete tail is dropped), with no
  separator beyond BOS/EOS and positions 0..T-1; rows whose labels are all -100 are dropped; under a context schedule
  (``shuffle: false``) each stage cuts its rows of its own T from where the previous stage's last row ended;
- the first ``val_samples`` records (200) are the validation (and test) split, packed the same way; the rest train,
  in a seeded order per epoch through the base's :class:`SampleStream` (resumable, sharded across ranks).

Records come from a local ``.json`` (a list of records) or ``.jsonl`` file, or ``hf:<dataset>`` (its ``train``
split, through HF ``datasets``). Token streams are cached under ``cache_dir`` keyed by the records, the tokenizer and
the template, so ranks and reruns tokenize once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import Dataset

from lit_longctx.datamodules.base import LongCtxDataModule, SampleStream
from lit_longctx.datamodules.sources import HUB_PREFIX
from lit_longctx.datamodules.text import tokenizer_identity
from lit_longctx.tokenizers import Tokenizer

IGNORE_INDEX = -100
CACHE_VERSION = 1

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def load_records(path: str, cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Records of a local ``.json`` (list of objects) / ``.jsonl`` file, or of ``hf:<dataset>`` (train split)."""
    if path.startswith(HUB_PREFIX):
        import datasets

        name = path[len(HUB_PREFIX):]
        try:
            dataset = datasets.load_dataset(name, split="train", cache_dir=str(cache_dir) if cache_dir else None)
        except Exception as err:  # connection, not found, offline: one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConnectionError(f"cannot load hub dataset {name!r}: {first}; download it beforehand or give a "
                                  "local .json/.jsonl file") from err
        return list(dataset)
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"instruction data {path!r} not found: give a .json (list of records) or .jsonl file "
                                f"with instruction/input/output fields, or '{HUB_PREFIX}<dataset>'")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON lines ({err}): write one record object per line") from err
    if file.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from err
        if not isinstance(records, list):
            raise ValueError(f"{path} holds a JSON {type(records).__name__}; it must be a list of records")
        return records
    raise ValueError(f"{path}: unknown extension {file.suffix!r}; use .json (a list of records) or .jsonl")


def format_prompt(record: dict[str, Any], prompt_input: str, prompt_no_input: str, fields: Sequence[str],
                  where: str = "") -> tuple[str, str]:
    """(prompt, response) of a record; ``fields`` = (instruction, input, output) field names; input may be absent."""
    instruction_field, input_field, output_field = fields
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a {type(record).__name__}, not a record object")
    for name in (instruction_field, output_field):
        if name not in record:
            raise ValueError(f"{where} has no {name!r} field (its fields: {sorted(record)}); set instruction_field / "
                             "output_field to the names your data uses")
    values = {name: record.get(name) or "" for name in (instruction_field, input_field, output_field)}
    bad = [name for name, v in values.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{where}: fields {bad} must be strings")
    context = values[input_field]
    template = prompt_input if context.strip() else prompt_no_input
    prompt = template.format(instruction=values[instruction_field], input=context)
    return prompt, values[output_field]


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    prompt_input: str = ALPACA_PROMPT_INPUT,
    prompt_no_input: str = ALPACA_PROMPT_NO_INPUT,
    fields: Sequence[str] = ("instruction", "input", "output"),
    source: str = "the data",
    offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One stream over all records: token ids and a mask that is True on response tokens (the EOS included).

    ``source`` and ``offset`` (the index of the first record) name records in error messages.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for i, record in enumerate(records):
        where = f"record {offset + i} of {source}"
        prompt, response = format_prompt(record, prompt_input, prompt_no_input, fields, where)
        p = tokenizer.encode(prompt, bos=True)
        r = tokenizer.encode(response, eos=True)
        ids += p + r
        mask += [False] * len(p) + [True] * len(r)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


class PackedRows:
    """Rows of T tokens cut from a token stream, with aligned labels masked to response tokens.

    Args:
        ids: (N,) token stream.
        is_target: (N,) True where a token is a training target (response and EOS).
        seq_len: T.
        offset: the first row starts at this token (a context schedule's stage continues where the last one
            stopped); rows are cut from there to the end of the stream.
    """

    def __init__(self, ids: np.ndarray, is_target: np.ndarray, seq_len: int, offset: int = 0) -> None:
        self.ids, self.is_target, self.seq_len, self.offset = ids, is_target, seq_len, offset
        n_rows = max(0, (len(ids) - 1 - offset) // seq_len)
        starts = offset + np.arange(n_rows, dtype=np.int64) * seq_len
        end = offset + n_rows * seq_len
        targets = is_target[offset + 1: end + 1].reshape(n_rows, seq_len) if n_rows else np.zeros((0, seq_len))
        self.starts = starts[targets.any(axis=1)]  # rows with at least one response target

    def __len__(self) -> int:
        return len(self.starts)

    def row(self, index: int) -> dict[str, torch.Tensor]:
        start, t = int(self.starts[index]), self.seq_len
        window = torch.from_numpy(self.ids[start: start + t + 1].astype(np.int64))
        keep = torch.from_numpy(self.is_target[start + 1: start + t + 1])
        labels = torch.where(keep, window[1:], torch.full((t,), IGNORE_INDEX))
        return {"input_ids": window[:-1], "labels": labels}


class PackedRowStream(SampleStream):
    """Training rows of :class:`PackedRows` in a seeded (or index) order per epoch."""

    def __init__(self, rows: PackedRows, seed: int = 1234, shuffle: bool = True) -> None:
        super().__init__(seed=seed, shuffle=shuffle)
        self.rows = rows

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    def get_sample(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        return self.rows.row(index)

    def stream_tokens(self, rows: int) -> int:
        """Tokens from the first row's start to the end of the ``rows``-th row read (in order; past the last row the
        stage starts over at its first), so the next stage of a context schedule starts right after it."""
        if rows == 0:
            return 0
        last = int(self.rows.starts[(rows - 1) % len(self.rows)])
        return last + self.rows.seq_len - self.rows.offset


class PackedRowDataset(Dataset):
    """Validation rows of :class:`PackedRows` in order."""

    def __init__(self, rows: PackedRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self.rows):
            raise IndexError(index)
        return self.rows.row(index)


class InstructData(LongCtxDataModule):
    """Alpaca-style instruction data: templated prompts, response-only labels, packed rows (see the module docstring).

    Args:
        path: a ``.json`` file (list of records), a ``.jsonl`` file, or ``hf:<dataset>`` (e.g.
            ``hf:yahma/alpaca-cleaned``).
        tokenizer: tokenizer path (sentencepiece ``.model``, ``tokenizer.json`` or a directory) or ``byte``; it must
            have BOS and EOS tokens.
        seq_len: tokens per row (T).
        batch_size: rows per batch on each device.
        num_workers: DataLoader worker processes.
        seed: seeds the training order.
        val_samples: the first this many records are the validation split (200 in the reference); 0 = none.
        shuffle: visit the training rows in a seeded random order per epoch (the reference shuffles).
        prompt_input: template for records with a non-empty input (fields ``{instruction}`` and ``{input}``).
        prompt_no_input: template for records without input (field ``{instruction}``).
        instruction_field: record field holding the instruction.
        input_field: record field holding the optional input (context).
        output_field: record field holding the response.
        cache_dir: where tokenized streams are cached.
    """

    def __init__(
        self,
        path: str,
        tokenizer: str | None = None,
        seq_len: int = 1024,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 1234,
        val_samples: int = 200,
        shuffle: bool = True,
        prompt_input: str = ALPACA_PROMPT_INPUT,
        prompt_no_input: str = ALPACA_PROMPT_NO_INPUT,
        instruction_field: str = "instruction",
        input_field: str = "input",
        output_field: str = "output",
        cache_dir: str = "~/.cache/lit-longctx/instruct",
    ) -> None:
        super().__init__(tokenizer, seq_len, batch_size, num_workers, seed)
        if not isinstance(val_samples, int) or val_samples < 0:
            raise ValueError(f"val_samples must be an integer >= 0, got {val_samples!r}")
        for name, template, needed in (("prompt_input", prompt_input, ("{instruction}", "{input}")),
                                       ("prompt_no_input", prompt_no_input, ("{instruction}",))):
            missing = [f for f in needed if f not in template]
            if missing:
                raise ValueError(f"{name} must contain {' and '.join(missing)} (it is {template!r})")
        self.path = path
        self.val_samples = val_samples
        self.shuffle = shuffle
        self.prompt_input, self.prompt_no_input = prompt_input, prompt_no_input
        self.fields = (instruction_field, input_field, output_field)
        self.cache_dir = Path(cache_dir).expanduser()
        self._streams: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    def build_tokenizer(self) -> Tokenizer:
        tok = super().build_tokenizer()
        if tok.bos_id is None or tok.eos_id is None:
            raise ValueError(f"tokenizer {self.tokenizer_spec!r} has no BOS/EOS token, which the instruction "
                             "template needs; use a LLaMA tokenizer or 'byte'")
        return tok

    # --- tokenized cache
    def _source_identity(self) -> dict[str, Any]:
        if self.path.startswith(HUB_PREFIX):
            return {"hub": self.path}
        file = Path(self.path).expanduser()
        if not file.is_file():
            load_records(self.path)  # raises the not-found error
        return {"file": str(file.resolve()), "size": file.stat().st_size, "mtime": file.stat().st_mtime_ns}

    def cache_file(self) -> Path:
        """The ``.npz`` cache of this data's token streams."""
        key = {"version": CACHE_VERSION, "source": self._source_identity(),
               "tokenizer": tokenizer_identity(self.tokenizer), "templates": [self.prompt_input, self.prompt_no_input],
               "fields": self.fields, "val_samples": self.val_samples}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.cache_dir / f"instruct-{digest}.npz"

    def prepare_data(self) -> None:
        """Read, template and tokenize the records, unless cached."""
        target = self.cache_file()
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if target.exists():
                return
            records = load_records(self.path, self.cache_dir / "hf")
            if self.val_samples >= len(records):
                raise ValueError(f"val_samples={self.val_samples} leaves no training records ({self.path} has "
                                 f"{len(records)}); lower val_samples")
            common = dict(tokenizer=self.tokenizer, prompt_input=self.prompt_input,
                          prompt_no_input=self.prompt_no_input, fields=self.fields, source=self.path)
            val_ids, val_mask = tokenize_records(records[: self.val_samples], **common)
            train_ids, train_mask = tokenize_records(records[self.val_samples:], offset=self.val_samples, **common)
            tmp = target.with_name(f".{target.stem}.tmp{os.getpid()}.npz")
            np.savez(tmp, train_ids=train_ids, train_mask=train_mask, val_ids=val_ids, val_mask=val_mask)
            os.replace(tmp, target)

    def streams(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{"train": (ids, mask), "val": (ids, mask)}``, prepared on first use."""
        if self._streams is None:
            self.prepare_data()
            with np.load(self.cache_file()) as f:
                self._streams = {split: (f[f"{split}_ids"], f[f"{split}_mask"]) for split in ("train", "val")}
        return self._streams

    def setup(self, stage: str | None = None) -> None:
        self.streams()

    @property
    def max_token_id(self) -> int | None:
        if self._streams is None:
            return None
        return max(int(ids.max()) for ids, _ in self._streams.values() if len(ids))

    # --- splits
    def packed(self, split: str) -> PackedRows:
        """The packed rows of ``split`` (``train`` or ``val``)."""
        ids, mask = self.streams()[split]
        return PackedRows(ids, mask, self.seq_len)

    def train_stream(self) -> PackedRowStream:
        rows = self.packed("train")
        if len(rows) == 0:
            ids, _ = self.streams()["train"]
            raise ValueError(f"{self.path}: the {len(ids)} training tokens give no row of seq_len={self.seq_len} with "
                             "a response token; lower seq_len or add records")
        return PackedRowStream(rows, self.seed, self.shuffle)

    def stage_stream(self, seq_len: int, token_offset: int) -> PackedRowStream:
        """Rows of ``seq_len`` packed from ``token_offset`` on, in order (context schedules); a stage that finds no
        row with a response left there starts a new pass at the first token."""
        if self.shuffle:
            raise ValueError("a context schedule re-cuts the packed rows at the new length from where the last stage "
                             "stopped, which needs them read in order: set data.init_args.shuffle: false")
        ids, mask = self.streams()["train"]
        rows = PackedRows(ids, mask, seq_len, token_offset)
        if len(rows) == 0:
            rows = PackedRows(ids, mask, seq_len)
        if len(rows) == 0:
            raise ValueError(f"{self.path}: the {len(ids)} training tokens give no row of seq_len={seq_len} with a "
                             "response token; lower the stage's seq_len or add records")
        return PackedRowStream(rows, self.seed, shuffle=False)

    def val_dataset(self) -> PackedRowDataset | None:
        rows = self.packed("val")
        return PackedRowDataset(rows) if len(rows) else None
