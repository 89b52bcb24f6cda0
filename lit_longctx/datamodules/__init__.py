"""DataModules: a shared resumable base, pre-tokenized token files, and raw text mixtures."""

from lit_longctx.datamodules.base import (
    LongCtxDataModule,
    ResumableLoader,
    SampleStream,
    StreamPlan,
    global_batch_tokens,
)
from lit_longctx.datamodules.doc_aware import DocAwareData, DocAwareLoader
from lit_longctx.datamodules.instruct import InstructData
from lit_longctx.datamodules.landmark import LandmarkData, LandmarkInsertion, LandmarkStream
from lit_longctx.datamodules.sources import TextSource
from lit_longctx.datamodules.text import MixtureStream, TextData, greedy_blend, normalize_weights
from lit_longctx.datamodules.token_files import (
    TokenFiles,
    TokenFileWriter,
    TokenSplit,
    TokenStream,
    TokenWindows,
    write_token_files,
)

__all__ = [
    "DocAwareData",
    "DocAwareLoader",
    "InstructData",
    "LandmarkData",
    "LandmarkInsertion",
    "LandmarkStream",
    "LongCtxDataModule",
    "MixtureStream",
    "ResumableLoader",
    "SampleStream",
    "StreamPlan",
    "TextData",
    "TextSource",
    "TokenFileWriter",
    "TokenFiles",
    "TokenSplit",
    "TokenStream",
    "TokenWindows",
    "global_batch_tokens",
    "greedy_blend",
    "normalize_weights",
    "write_token_files",
]
