"""Lightning callbacks: they observe training (throughput, MFU, MTU, long-context evaluation), steer schedules, or
keep a run from losing its work (non-finite guard, final and interrupt checkpoints), never attention internals."""

from lit_longctx.callbacks.long_eval import LongEvalCallback
from lit_longctx.callbacks.safety import FinalCheckpoint, InterruptCheckpoint, NonFiniteGuard
from lit_longctx.callbacks.throughput import ThroughputCallback

__all__ = ["FinalCheckpoint", "InterruptCheckpoint", "LongEvalCallback", "NonFiniteGuard", "ThroughputCallback"]
