"""Lightning callbacks: they observe training (throughput, MFU, MTU, long-context evaluation) or steer schedules,
never attention internals."""

from lit_longctx.callbacks.long_eval import LongEvalCallback
from lit_longctx.callbacks.source_tokens import SourceTokens
from lit_longctx.callbacks.throughput import ThroughputCallback

__all__ = ["LongEvalCallback", "SourceTokens", "ThroughputCallback"]
