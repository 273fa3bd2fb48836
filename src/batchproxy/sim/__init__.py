"""The simulator: the real engine, slots and codec on a virtual-time asyncio loop, against
simulated replicas and workloads, beside built-in baselines (no batching; TFS's batching per
replica behind round robin). Same seed, same numbers."""

from batchproxy.sim.clock import DeadlockError, VirtualEventLoop, run_virtual
from batchproxy.sim.faults import Fault, parse_fault
from batchproxy.sim.report import RunResult, SimReport
from batchproxy.sim.simulate import SimConfig, simulate

__all__ = [
    "DeadlockError",
    "Fault",
    "RunResult",
    "SimConfig",
    "SimReport",
    "VirtualEventLoop",
    "parse_fault",
    "run_virtual",
    "simulate",
]
