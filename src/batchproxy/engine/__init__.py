"""The batching engine: the scheduler (queues, admission, the flush policy's timing), the
dispatcher (send, retry, bisect, split, deliver) and the policies they consult. It knows the
fleet only through `fleet.slots.ReplicaPool` and never imports a frontend."""

from batchproxy.engine.engine import Engine
from batchproxy.engine.policy import FixedTimeoutPolicy, Flush, FlushPolicy, Hold
from batchproxy.engine.retry import RetryPolicy

__all__ = ["Engine", "FixedTimeoutPolicy", "Flush", "FlushPolicy", "Hold", "RetryPolicy"]
