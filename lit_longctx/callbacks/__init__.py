"""Lightning callbacks: they observe training (throughput, MFU, MTU, long-context evaluation), steer schedules, or
keep a run from losing its work (non-finite guard, final and interrupt checkpoints), never attention internals."""

from lit_longctx.callbacks.accumulation import StepAccumulationScheduler
from lit_longctx.callbacks.context_schedule import ContextSchedule
from lit_longctx.callbacks.global_batch import GlobalBatch
from lit_longctx.callbacks.long_eval import LongEvalCallback
from lit_longctx.callbacks.safety import FinalCheckpoint, InterruptCheckpoint, NonFiniteGuard
from lit_longctx.callbacks.source_tokens import SourceTokens
from lit_longctx.callbacks.throughput import ThroughputCallback

__all__ = ["ContextSchedule", "FinalCheckpoint", "GlobalBatch", "InterruptCheckpoint", "LongEvalCallback",
           "NonFiniteGuard", "SourceTokens", "StepAccumulationScheduler", "ThroughputCallback"]
