"""Lightning callbacks: they observe training (throughput, MFU, MTU, long-context evaluation) or steer schedules,
never attention internals."""

from lit_longctx.callbacks.accumulation import StepAccumulationScheduler
from lit_longctx.callbacks.context_schedule import ContextSchedule
from lit_longctx.callbacks.long_eval import LongEvalCallback
from lit_longctx.callbacks.throughput import ThroughputCallback

__all__ = ["ContextSchedule", "LongEvalCallback", "StepAccumulationScheduler", "ThroughputCallback"]
