"""One small tokenizer interface over a sentencepiece ``.model``, an HF tokenizer directory, and raw bytes.

- A directory (or file) with ``tokenizer.model`` is read with sentencepiece itself, so ids are exactly
  sentencepiece's. (In transformers 5, ``AutoTokenizer`` on a folder holding only ``tokenizer.model`` yields other
  ids; ``LlamaTokenizer.from_pretrained`` agrees with sentencepiece, and so does this loader.)
- A directory with ``tokenizer.json`` (and no ``tokenizer.model``) is read with the ``tokenizers`` library; BOS/EOS
  come from ``tokenizer_config.json`` / ``special_tokens_map.json``.
- ``byte`` (or no tokenizer at all) is the file-free fallback: ids 0..255 are bytes, then BOS, EOS, PAD.

Special tokens added on top of a vocabulary (e.g. landmark's ``<landmark>``) get the next free ids and are saved as
HF's ``added_tokens.json``; they are control tokens, never produced by ``encode`` from text.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lit_longctx.inputs import not_found, read_json
from lit_longctx.io import atomic_write_bytes, atomic_write_text


class Tokenizer:
    """Base interface: ``encode``, ``decode``, ids of special tokens, ``save``."""

    kind: str = ""

    def __init__(self) -> None:
        self.added: dict[str, int] = {}

    # --- to implement
    @property
    def base_vocab_size(self) -> int:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _token_to_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def _save(self, directory: Path) -> None:
        raise NotImplementedError

    # --- shared
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.added)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        if bos:
            ids = [self._require(self.bos_id, "BOS")] + ids
        if eos:
            ids = ids + [self._require(self.eos_id, "EOS")]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special and added tokens and ids beyond the vocabulary are skipped."""
        skip = {self.bos_id, self.eos_id, self.pad_id, *self.added.values()}
        return self._decode([int(i) for i in ids if int(i) not in skip and 0 <= int(i) < self.base_vocab_size])

    def token_to_id(self, piece: str) -> int | None:
        return self.added[piece] if piece in self.added else self._token_to_id(piece)

    def add_special_token(self, piece: str) -> int:
        """Give ``piece`` an id (its existing one, or the next free id) and return it."""
        existing = self.token_to_id(piece)
        if existing is not None:
            return existing
        self.added[piece] = self.vocab_size
        return self.added[piece]

    def save(self, directory: str | Path) -> Path:
        """Write files from which :func:`load_tokenizer` (and transformers) rebuild this tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save(directory)
        if self.added:
            atomic_write_text(directory / "added_tokens.json", json.dumps(self.added, indent=2))
        return directory

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "added": dict(self.added)}

    @staticmethod
    def _require(value: int | None, name: str) -> int:
        if value is None:
            raise ValueError(f"this tokenizer has no {name} token")
        return value


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255; BOS 256, EOS 257, PAD 258. Needs no files."""

    kind = "byte"
    bos_id, eos_id, pad_id = 256, 257, 258

    @property
    def base_vocab_size(self) -> int:
        return 259

    def _encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def _token_to_id(self, piece: str) -> int | None:
        return {"<s>": 256, "</s>": 257, "<pad>": 258}.get(piece)

    def _save(self, directory: Path) -> None:
        atomic_write_text(directory / "tokenizer_config.json", json.dumps({"lit_longctx_tokenizer": "byte"}, indent=2))


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file (LLaMA-1/2, Code Llama, OpenLLaMA, or one trained locally)."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | Path) -> None:
        super().__init__()
        import sentencepiece as spm

        self.path = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as err:
            raise ValueError(
                f"tokenizer file {str(self.path)!r} is not a sentencepiece model ({_reason(err)}): it is corrupt or "
                "truncated; replace it (or give a tokenizer.json, or 'byte')"
            ) from None
        self.bos_id, self.eos_id, self.pad_id = (
            None if i < 0 else i for i in (self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id())
        )

    @property
    def base_vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def _token_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if i != self.sp.unk_id() or piece == self.sp.id_to_piece(self.sp.unk_id()) else None

    def _save(self, directory: Path) -> None:
        target = directory / "tokenizer.model"
        if target.resolve() != self.path.resolve():
            atomic_write_bytes(target, self.path.read_bytes())
        piece = self.sp.id_to_piece
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                  "legacy": True, "model_max_length": 1_000_000_000}
        for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id),
                        ("unk_token", self.sp.unk_id())):
            if i is not None and i >= 0:
                config[name] = piece(i)
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2))


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` read with the ``tokenizers`` library (e.g. Llama 3)."""

    kind = "hf"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        self.dir = path if path.is_dir() else path.parent
        self.file = path / "tokenizer.json" if path.is_dir() else path
        try:
            self.tok = _Tok.from_file(str(self.file))
        except Exception as err:  # the tokenizers library raises a bare Exception for unparsable files
            raise ValueError(
                f"tokenizer file {str(self.file)!r} cannot be read ({_reason(err)}): it is corrupt, truncated or "
                "not a Hugging Face tokenizer.json; replace it"
            ) from None
        specials = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = self.dir / name
            if f.exists():
                entries = read_json(f, "tokenizer file")
                if isinstance(entries, dict):
                    specials.update({k: v for k, v in entries.items() if k.endswith("_token")})

        def ident(key: str) -> int | None:
            value = specials.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            return self.tok.token_to_id(value) if isinstance(value, str) else None

        self.bos_id, self.eos_id, self.pad_id = ident("bos_token"), ident("eos_token"), ident("pad_token")

    @property
    def base_vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def _token_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def _save(self, directory: Path) -> None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = self.dir / name if name != "tokenizer.json" else self.file
            if src.exists() and (directory / name).resolve() != src.resolve():
                atomic_write_bytes(directory / name, src.read_bytes())


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def _is_byte_config(config: Any) -> bool:
    return isinstance(config, dict) and config.get("lit_longctx_tokenizer") == "byte"


def load_tokenizer(spec: str | Path | Tokenizer | None) -> Tokenizer:
    """A tokenizer from ``byte``/None, a ``.model`` or ``tokenizer.json`` file, or a directory holding one."""
    if isinstance(spec, Tokenizer):
        return spec
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise not_found(spec, "tokenizer", "give a sentencepiece .model file, a tokenizer.json, a directory holding "
                        "one of them, or 'byte' for the file-free byte-level tokenizer")
    if path.is_dir():
        config = path / "tokenizer_config.json"
        if (path / "tokenizer.model").exists():
            tok: Tokenizer = SentencePieceTokenizer(path / "tokenizer.model")
        elif (path / "tokenizer.json").exists():
            tok = HFTokenizer(path)
        elif config.exists() and _is_byte_config(read_json(config, "tokenizer file")):
            tok = ByteTokenizer()
        else:
            found = sorted(p.name for p in path.iterdir())[:20]
            raise FileNotFoundError(
                f"no tokenizer in directory {str(path)!r}: expected tokenizer.model (sentencepiece) or tokenizer.json; "
                f"found {found}"
            )
        added = path / "added_tokens.json"
        if added.exists():
            entries = read_json(added, "tokenizer file")
            if not isinstance(entries, dict):
                raise ValueError(f"{added} must map token strings to ids; replace it")
            for piece, i in sorted(entries.items(), key=lambda kv: kv[1]):
                if tok.token_to_id(piece) is None:
                    if i != tok.vocab_size:
                        raise ValueError(f"{added}: token {piece!r} has id {i}, expected the next free id "
                                         f"{tok.vocab_size}")
                    tok.added[piece] = i
        return tok
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    raise ValueError(f"cannot tell the tokenizer type of {str(path)!r}: expected a .model or tokenizer.json file")


def train_sentencepiece(
    text_files: Sequence[str | Path], model_prefix: str | Path, vocab_size: int, model_type: str = "bpe"
) -> SentencePieceTokenizer:
    """Train a small sentencepiece model locally (BPE on a few MB takes about a second on CPU).

    Ids: pad 0, unk 1, bos 2, eos 3 (LLaMA uses unk 0, bos 1, eos 2 and no pad; any fixed choice works for models
    trained from scratch). As in LLaMA's tokenizer, text is not normalised (no NFKC, whitespace kept, so code keeps
    its indentation) and unknown characters fall back to bytes, so any text round-trips exactly.
    """
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    # sentencepiece writes <prefix>.model in place: train beside it and rename, so a failed or killed run never leaves
    # a truncated model under the final name
    scratch = Path(tempfile.mkdtemp(prefix=f".{model_prefix.name}.", suffix=".tmp", dir=model_prefix.parent))
    try:
        _train_sentencepiece(text_files, scratch / model_prefix.name, vocab_size, model_type)
        for suffix in (".vocab", ".model"):
            os.replace(scratch / f"{model_prefix.name}{suffix}", f"{model_prefix}{suffix}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return SentencePieceTokenizer(f"{model_prefix}.model")


def _train_sentencepiece(text_files: Sequence[str | Path], model_prefix: Path, vocab_size: int,
                         model_type: str) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=",".join(str(f) for f in text_files),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=2,
        minloglevel=2,
    )
