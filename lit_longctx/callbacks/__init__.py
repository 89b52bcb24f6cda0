"""Lightning callbacks: they observe training (throughput, MFU, MTU, long-context evaluation) or steer schedules,
never attention internals."""

from lit_longctx.callbacks.global_batch import GlobalBatch
from lit_longctx.callbacks.long_eval import LongEvalCallback
from lit_longctx.callbacks.throughput import ThroughputCallback

__all__ = ["GlobalBatch", "LongEvalCallback", "ThroughputCallback"]
