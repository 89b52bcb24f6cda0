"""Weight diffs in the format of Landmark Attention's released LLaMA-7B fine-tune (spec §5 "Weight diff").

The seed released its fine-tuned LLaMA-7B as a *diff* (HF ``epfml/landmark-attention-llama7b-wdiff``, made by the
seed's ``weight_diff.py``): a complete HF LLaMA checkpoint directory (config, tokenizer with the added tokens) whose
every tensor is ``tuned − raw``, where ``raw`` is the original LLaMA-7B after adding ``[PAD]`` and ``<landmark>`` to the
tokenizer, the new input-embedding rows and the new output rows each set to the mean of the existing rows (spec §1.1).
Everything is float32.

- :func:`recover`: ``recovered = raw + diff`` tensor by tensor (float32), written as an HF directory with the diff's
  config and tokenizer files, after an integrity check: the sum of all recovered tensors must match the diff's
  ``checksum_psum.txt`` (or a given value; the first release's was 49798.7656) within 1e-2, as in the seed.
- :func:`make_diff`: the inverse, ``diff = tuned − raw``, with the tuned model's sum written to ``checksum_psum.txt``.

Raw rows: the diff's vocabulary minus the base's is the number of added tokens (2 for the release); each added row is
the float32 mean of the base rows of its matrix. The sum is accumulated like the seed's (``sum(t.sum() for t in
state_dict)``: float32 tensor sums in the order of transformers' ``LlamaForCausalLM.state_dict()``), because a float32
sum over 7B numbers depends on the order. Tensors are read lazily (safetensors or memory-mapped ``.bin``) and written
shard by shard, so the whole model is never held twice.

Exactness: float32 ``(t − r) + r`` equals ``t`` whenever t and r have the same sign and lie within a factor of two of
each other (Sterbenz's lemma), which is the case for fine-tuned weights; elsewhere the recovery is within one unit in
the last place of max(|t|, |r|).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from lit_longctx.hf import CheckpointError, read_hf_config
from lit_longctx.nn.config import parse_dtype

#: tolerance of the seed's integrity check (absolute, on the sum of all parameters)
CHECKSUM_TOLERANCE = 1e-2
CHECKSUM_FILE = "checksum_psum.txt"
#: matrices with one row per token
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "generation_config.json")


class LazyTensors:
    """The tensors of an HF checkpoint directory, read one at a time (safetensors files or ``.bin`` files loaded
    memory-mapped with ``weights_only=True``).

    Args:
        directory: the HF checkpoint directory.
        role: what the directory is (for messages), e.g. ``base``.
    """

    def __init__(self, directory: str | os.PathLike, role: str) -> None:
        self.directory = Path(directory).expanduser()
        self.role = role
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{role} directory {str(self.directory)!r} does not exist: give an HF checkpoint "
                                    "directory (config.json + weights)")
        self.config = read_hf_config(self.directory)
        self.files = self._weight_files()
        self._where: dict[str, Path] = {}
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        for f in self.files:
            for key in self._keys(f):
                self._where[key] = f

    def _weight_files(self) -> list[Path]:
        d = self.directory
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (d / index).exists():
                files = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
                missing = [f for f in files if not (d / f).exists()]
                if missing:
                    raise CheckpointError(f"{d / index} lists shards that are missing: {missing}")
                return [d / f for f in files]
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (d / name).exists():
                return [d / name]
        found = sorted(p.name for p in d.iterdir())[:20]
        raise CheckpointError(f"no weights in the {self.role} directory {str(d)!r}: expected model.safetensors, "
                              f"pytorch_model.bin or a sharded index; found {found}")

    def _keys(self, f: Path) -> list[str]:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as handle:
                return list(handle.keys())
        return list(self._bin(f))

    def _bin(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._loaded:
            self._loaded = {f: torch.load(f, map_location="cpu", weights_only=True, mmap=True)}
        return self._loaded[f]

    def names(self) -> list[str]:
        """Tensor names, in file order."""
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __getitem__(self, key: str) -> torch.Tensor:
        f = self._where[key]
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as handle:
                return handle.get_tensor(key)
        return self._bin(f)[key]

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])


class ShardWriter:
    """Write tensors into safetensors shards of about ``max_shard_bytes`` (one ``model.safetensors`` when they fit),
    with the index transformers reads.

    Args:
        directory: output directory.
        max_shard_bytes: start a new shard when the current one reaches this size.
    """

    def __init__(self, directory: Path, max_shard_bytes: int) -> None:
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._buffer[name] = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        self._bytes += size
        self.total_bytes += size
        if self._bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        from safetensors.torch import save_file

        path = self.directory / f".shard-{len(self._shards):05d}.tmp"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._bytes = {}, 0

    def close(self) -> None:
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self._shards[0][0], self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def hf_parameter_order(config: dict) -> list[str]:
    """Tensor names in the order of transformers' ``LlamaForCausalLM(config).state_dict()`` (built on the meta
    device), the order in which the seed summed the parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    return list(model.state_dict())


def ordered_keys(diff: LazyTensors) -> list[str]:
    """The diff's tensor names, in transformers' parameter order first, then any others in file order."""
    order = [k for k in hf_parameter_order(diff.config) if k in diff]
    seen = set(order)
    return order + [k for k in diff.names() if k not in seen]


def raw_tensor(name: str, base: torch.Tensor, rows: int) -> torch.Tensor:
    """The base tensor in float32, a vocabulary matrix grown to ``rows`` rows with mean-initialised new rows."""
    w = base.float()
    if name in VOCAB_TENSORS and rows > w.shape[0]:
        w = torch.cat([w, w.mean(0, keepdim=True).expand(rows - w.shape[0], -1)], dim=0)
    return w


def _pairs(base: LazyTensors, other: LazyTensors) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, raw, other's tensor)`` in float32 for every tensor of ``other``, checking names and shapes against
    ``base``."""
    if other.vocab_size < base.vocab_size:
        raise CheckpointError(
            f"the {other.role} has vocab_size {other.vocab_size}, fewer than the base's {base.vocab_size}: it was not "
            "made from this base (the diff adds tokens, it never removes them)"
        )
    missing = sorted(set(other.names()) - set(base.names()))
    extra = sorted(set(base.names()) - set(other.names()))
    if missing or extra:
        raise CheckpointError(
            f"the base {str(base.directory)!r} and the {other.role} {str(other.directory)!r} hold different tensors "
            f"(only in the {other.role}: {missing[:6]}; only in the base: {extra[:6]}): give the base model the "
            f"{other.role} was made from"
        )
    for name in ordered_keys(other):
        theirs = other[name]
        raw = raw_tensor(name, base[name], other.vocab_size)
        if raw.shape != theirs.shape:
            raise CheckpointError(
                f"{name}: the base gives shape {tuple(raw.shape)} (after adding {other.vocab_size - base.vocab_size} "
                f"token rows) but the {other.role} has {tuple(theirs.shape)}: the base is not the model the "
                f"{other.role} was made from (e.g. another size of LLaMA)"
            )
        yield name, raw, theirs.float()


def read_checksum(checksum: str | float | None, diff_dir: Path) -> float | None:
    """The expected parameter sum: a number, a file holding one, else the diff's ``checksum_psum.txt``, else None."""
    if checksum is None:
        default = diff_dir / CHECKSUM_FILE
        return float(default.read_text().strip()) if default.exists() else None
    try:
        return float(checksum)
    except ValueError:
        pass
    path = Path(str(checksum)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--checksum {checksum!r} is neither a number nor an existing file")
    try:
        return float(path.read_text().strip())
    except ValueError as err:
        raise ValueError(f"{path} does not hold one number (the expected parameter sum)") from err


def _copy_metadata(source: Path, output: Path, dtype: torch.dtype) -> None:
    config = json.loads((source / "config.json").read_text())
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(dtype).removeprefix("torch.")
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in _TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, output / name)


def _prepare_output(output: str | os.PathLike, *inputs: Path) -> Path:
    out = Path(output).expanduser()
    if any(out.resolve() == p.resolve() for p in inputs):
        raise ValueError(f"output {str(out)!r} is one of the input directories: write to a new directory")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output directory {str(out)!r} is not empty: remove it or choose another")
    out.mkdir(parents=True, exist_ok=True)
    return out




def recover(
    base: str,
    diff: str,
    output: str | None = None,
    checksum: str | None = None,
    dtype: str | None = None,
    max_shard_size_gb: float = 5.0,
) -> float:
    """Recover fine-tuned weights from the original LLaMA weights and a weight diff: recovered = raw + diff (float32).

    Args:
        base: HF directory of the original model (LLaMA-7B for the seed's release), without the added tokens.
        diff: HF directory of the weight diff (e.g. a local copy of epfml/landmark-attention-llama7b-wdiff).
        output: HF directory to write the recovered model to (config and tokenizer from the diff); null only checks.
        checksum: expected sum of all recovered parameters: a number or a file holding one; default the diff's
            checksum_psum.txt (the first release had none: pass 49798.7656). Checked within 1e-2.
        dtype: dtype of the written weights (float32, bfloat16, float16); the recovery itself is float32.
        max_shard_size_gb: size of the written safetensors shards.

    Returns:
        The sum of all recovered parameters.
    """
    base_t, diff_t = LazyTensors(base, "base"), LazyTensors(diff, "diff")
    expected = read_checksum(checksum, diff_t.directory)
    out_dtype = parse_dtype(dtype) or torch.float32
    out = _prepare_output(output, base_t.directory, diff_t.directory) if output is not None else None
    writer = ShardWriter(out, int(max_shard_size_gb * 2**30)) if out is not None else None
    total = torch.zeros((), dtype=torch.float32)
    try:
        for name, raw, delta in _pairs(base_t, diff_t):
            tensor = raw + delta
            total = total + tensor.sum()
            if writer is not None:
                writer.add(name, tensor.to(out_dtype))
        psum = float(total)
        if expected is not None and abs(psum - expected) > CHECKSUM_TOLERANCE:
            raise ValueError(
                f"integrity check failed: the recovered parameters sum to {psum:.4f} but the checksum is "
                f"{expected:.4f} (tolerance {CHECKSUM_TOLERANCE}): the diff is damaged or the base is not the original "
                "weights it was made from"
            )
        if writer is not None:
            writer.close()
            _copy_metadata(diff_t.directory, out, out_dtype)
    except BaseException:
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        raise
    status = "matches the checksum" if expected is not None else "not checked: no checksum given or found"
    print(f"parameter sum {psum:.4f} ({status})" + (f"; wrote {out}" if out is not None else ""))
    return psum


def make_diff(base: str, tuned: str, output: str, max_shard_size_gb: float = 5.0) -> float:
    """Make a weight diff (the inverse of ``recover``): diff = tuned − raw in float32, plus checksum_psum.txt.

    Args:
        base: HF directory of the original model, without the added tokens.
        tuned: HF directory of the fine-tuned model (e.g. exported with ``lit-longctx convert to-hf``), whose
            vocabulary is the base's plus the added tokens.
        output: HF directory to write the diff to (config and tokenizer from the tuned model).
        max_shard_size_gb: size of the written safetensors shards.

    Returns:
        The sum of all tuned parameters (the checksum written beside the diff).
    """
    base_t, tuned_t = LazyTensors(base, "base"), LazyTensors(tuned, "tuned model")
    out = _prepare_output(output, base_t.directory, tuned_t.directory)
    writer = ShardWriter(out, int(max_shard_size_gb * 2**30))
    total = torch.zeros((), dtype=torch.float32)
    try:
        for name, raw, tuned_tensor in _pairs(base_t, tuned_t):
            total = total + tuned_tensor.sum()
            writer.add(name, tuned_tensor - raw)
        writer.close()
        _copy_metadata(tuned_t.directory, out, torch.float32)
        psum = float(total)
        (out / CHECKSUM_FILE).write_text(f"{psum:.4f}\n")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    print(f"wrote {out} (tuned parameter sum {psum:.4f} in {CHECKSUM_FILE})")
    return psum
