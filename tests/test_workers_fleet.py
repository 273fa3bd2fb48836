"""--workers N in front of real reference replicas: all the workers together keep to
--max_inflight_per_replica (the replica records the most Predicts it held at once), every
answer is the caller's own, and a worker killed while it holds a slot does not take the
slot with it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from grpc_client import predict_request, stub, to_array
from load import LoadResult
from procs import Process, start_replica
from proxy_procs import start_proxy

# A channel of its own per connection: SO_REUSEPORT spreads connections, not calls, and
# gRPC would otherwise share one connection between channels to the same address.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


async def many_connections(address: str, connections: int, callers: int, duration_s: float,
                           max_calls: int) -> LoadResult:
    """`connections` channels with `callers` closed-loop callers each, unique one-row calls
    to the identity model, until `duration_s` or `max_calls` calls in all."""
    result = LoadResult()
    deadline = time.monotonic() + duration_s
    sent = 0

    async def connection(index: int) -> None:
        nonlocal sent
        async with grpc.aio.insecure_channel(address, options=OWN_CONNECTION) as channel:
            client = stub(channel)

            async def caller(number: int) -> None:
                nonlocal sent
                sequence = 0
                while time.monotonic() < deadline and sent < max_calls:
                    sent += 1
                    sequence += 1
                    x = np.array([[index, number, sequence]], np.float32)
                    try:
                        response = await client.Predict(
                            predict_request("identity", {"x": x}), timeout=20)
                    except grpc.aio.AioRpcError as err:
                        result.errors[err.code().name] += 1
                        result.error_messages.append(f"{err.code().name}: {err.details()}")
                        return
                    if np.array_equal(to_array(response.outputs["y"]), x):
                        result.ok += 1
                    else:
                        result.wrong += 1

            await asyncio.gather(*(caller(n) for n in range(callers)))

    await asyncio.gather(*(connection(i) for i in range(connections)))
    return result


def replica_metric(replica: Process, name: str) -> float:
    for line in requests.get(f"{replica.rest_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from the replica's metrics")


def peak(replica: Process) -> float:
    return replica_metric(replica, "batchproxy_replica_peak_inflight_predicts")


def workers_of(proxy: Process) -> list[int]:
    """The proxy's forked workers (its only children: the replicas run on their own)."""
    children = Path(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def holders_of_connections(pids: list[int], port: int) -> list[int]:
    """Those of `pids` holding an established TCP connection on local port `port`."""
    established: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    established.add(fields[9])
    holders = []
    for pid in pids:
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        if inodes & established:
            holders.append(pid)
    return holders


@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
@pytest.mark.parametrize(("workers", "limit"), [(2, 1), (4, 2)])
async def test_workers_together_keep_to_the_replica_limit(workers: int, limit: int,
                                                          policy: str) -> None:
    replicas = [start_replica("identity", batch_cost_ms=15) for _ in range(2)]
    try:
        with start_proxy(replicas, workers=workers, max_inflight_per_replica=limit,
                         max_batch_size=4, batch_timeout_micros=1000,
                         batching_policy=policy) as proxy:
            result = await many_connections(proxy.address, connections=4 * workers,
                                            callers=6, duration_s=4.0, max_calls=3000)
        peaks = [peak(replica) for replica in replicas]
    finally:
        for replica in replicas:
            replica.stop()
    assert result.failed == 0, result.error_messages[:5]
    assert result.wrong == 0
    assert result.ok > 100
    if policy == "fixed":
        # Far more callers than slots: every replica was driven to its limit, never past it.
        assert peaks == [limit] * len(replicas), peaks
    else:
        # Adaptive sends a batch only to a replica that can start it (this one runs one at
        # a time), so a replica need not reach the limit; it never passes it.
        assert all(1 <= p <= limit for p in peaks), peaks


async def test_a_killed_worker_gives_its_slot_back() -> None:
    with start_replica("identity", batch_cost_ms=1500) as replica, \
            start_proxy([replica], workers=2, max_inflight_per_replica=1) as proxy:
        workers = workers_of(proxy)
        assert len(workers) == 2
        async with grpc.aio.insecure_channel(proxy.address, options=OWN_CONNECTION) as first:
            x = np.ones((1, 3), np.float32)
            held = asyncio.ensure_future(
                stub(first).Predict(predict_request("identity", {"x": x}), timeout=20))
            # The one worker holding that connection takes the replica's only slot.
            deadline = time.monotonic() + 10
            while replica_metric(replica, "batchproxy_replica_inflight_predicts") < 1:
                assert time.monotonic() < deadline, "the first call never reached the replica"
                await asyncio.sleep(0.02)
            holders = holders_of_connections(workers, proxy.port)
            assert len(holders) == 1, holders
            os.kill(holders[0], signal.SIGKILL)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await held
        # New connections reach the surviving worker only; the slot must be free for it.
        # A connection the kernel queued for the killed worker's socket in the instant it
        # died is reset: that is the kill, not the slot, so such a call is made again.
        y = np.full((1, 3), 7, np.float32)
        for attempt in range(3):
            async with grpc.aio.insecure_channel(proxy.address,
                                                 options=OWN_CONNECTION) as second:
                try:
                    response = await stub(second).Predict(
                        predict_request("identity", {"x": y}), timeout=10,
                        wait_for_ready=True)
                    break
                except grpc.aio.AioRpcError as err:
                    if err.code() is not grpc.StatusCode.UNAVAILABLE or attempt == 2:
                        raise
        assert np.array_equal(to_array(response.outputs["y"]), y)
