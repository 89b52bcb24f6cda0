"""Shared test doubles for the evaluation tests: scripted "models" that answer from the prompt, a tiny LightningModule.

``ScriptedSession`` stands in for a ``DecodingSession``: at prefill it decodes the prompt, asks a ``reply`` function
for the answer text, and then emits that text's tokens (one-hot logits) followed by EOS. ``EvalLM`` is the minimal
module side of the ``lit_longctx.eval.tasks`` contract (model, tokenizer, inference_session), wrapping a tiny random
``Transformer``; with ``reply`` set, its sessions are scripted.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import lightning as L
import torch

from lit_longctx.eval import tasks
from lit_longctx.nn import ModelConfig, Transformer, session_for
from lit_longctx.tokenizers import ByteTokenizer, Tokenizer

_PASSKEY = re.compile(r"The pass key is (\d+)\. Remember it\.")
_ASKED = re.compile(r"special magic number for (\S+) mentioned")


def read_key(prompt: str) -> int:
    """The key a perfect reader finds in a passkey or multikey prompt (independent of the generator's code)."""
    asked = _ASKED.search(prompt)
    if asked:
        name = re.escape(asked.group(1))
        return int(re.search(rf"special magic numbers for {name} is: (\d+)\.", prompt).group(1))
    return int(_PASSKEY.search(prompt).group(1))


def oracle_reply(prompt: str) -> str:
    return f" {read_key(prompt)}."


def zero_reply(prompt: str) -> str:
    return " 0"


def off_by_one_reply(prompt: str) -> str:
    return f" {read_key(prompt) + 1} is the pass key."


def no_number_reply(prompt: str) -> str:
    return " I do not know."


class ScriptedSession:
    """A decoding session whose next-token logits spell ``reply(decoded prompt)`` and then EOS forever."""

    def __init__(self, vocab_size: int, tokenizer: Tokenizer, reply: Callable[[str], str]) -> None:
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.reply = reply
        self.script: list[int] = []
        self.prompts: list[str] = []

    def _next(self) -> torch.Tensor:
        token = self.script.pop(0) if self.script else self.tokenizer.eos_id
        return torch.nn.functional.one_hot(torch.tensor([token]), self.vocab_size).float()

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        prompt = self.tokenizer.decode(ids[0].tolist())
        self.prompts.append(prompt)
        self.script = self.tokenizer.encode(self.reply(prompt))
        return self._next()

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self._next()


class EvalLM(L.LightningModule):
    """Tiny module implementing the evaluation contract; ``reply`` scripts its answers, None uses the real model."""

    def __init__(self, reply: Callable[[str], str] | None = None, max_seq_len: int = 256) -> None:
        super().__init__()
        self.model = Transformer(ModelConfig.from_preset("debug", max_seq_len=max_seq_len))
        self.tokenizer = ByteTokenizer()
        self.reply = reply
        self.train_modes: list[bool] = []
        self.session_kwargs_seen: list[dict] = []

    def inference_session(self, batch_size: int = 1, **kwargs):
        self.session_kwargs_seen.append(kwargs)
        if self.reply is None:
            return session_for(self.model, batch_size, **kwargs)
        return ScriptedSession(self.model.config.vocab_size, self.tokenizer, self.reply)

    def training_step(self, batch, batch_idx):
        self.train_modes.append(self.training and self.model.training)
        (ids,) = batch
        return self.model(ids[:, :-1], labels=ids[:, 1:]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_test_epoch_start(self) -> None:
        tasks.on_test_epoch_start(self)

    def test_step(self, batch, batch_idx):
        tasks.test_step(self, batch)

    def on_test_epoch_end(self) -> None:
        self.results = tasks.on_test_epoch_end(self)

    def predict_step(self, batch, batch_idx):
        return tasks.predict_step(self, batch)
