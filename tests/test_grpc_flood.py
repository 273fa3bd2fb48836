"""Thousands of concurrent gRPC calls, on one channel and on many: the proxy sees and
answers every one, OK or its own UNAVAILABLE, and grpc core cancels none of them unseen
(its default pending-request limits did, from about 1000 calls on)."""

from __future__ import annotations

import asyncio
import collections
import resource
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import requests
from grpc_client import predict_request
from procs import Process, start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy

from batchproxy.frontends.grpc_options import pending_limit, queue_limits
from batchproxy.methods import PREDICT

CHANNELS = 1500
CALLS_PER_CHANNEL = 3
ONE_CHANNEL_CALLS = 5000
# Client and proxy sockets for every channel, and some to spare.
FILES_NEEDED = 2 * CHANNELS + 512
# A bound on each call, far beyond what a burst takes even on a busy machine; admission
# refuses at once what the queue cannot answer in time.
CALL_TIMEOUT_S = 120.0


def raise_open_files_limit(needed: int) -> None:
    """Children inherit the limit, so the proxy can hold a connection per channel too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"open files hard limit {hard} < {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@pytest.fixture(scope="module")
def proxy() -> Iterator[Process]:
    raise_open_files_limit(FILES_NEEDED)
    # A small queue in front of a replica that takes its time, so that part of each burst
    # is refused by the proxy's admission: that refusal is the answer overload must get.
    with start_replica("identity", model_name="default", batch_cost_ms=5) as replica, \
            start_proxy([replica], max_batch_size=32, max_enqueued_rows=256) as proxy:
        yield proxy


def predict_calls_seen(proxy: Process) -> float:
    text = requests.get(f"{proxy.rest_url}/metrics", timeout=10).text
    return sum(sample.value
               for family in text_string_to_metric_families(text)
               if family.name == "batchproxy_requests"
               for sample in family.samples
               if sample.name == "batchproxy_requests_total"
               and sample.labels["transport"] == "grpc"
               and sample.labels["method"] == "Predict")


def wait_for_calls_seen(proxy: Process, expected: float, timeout_s: float = 15.0) -> float:
    """The proxy counts a call just after answering it; give the last ones a moment."""
    deadline = time.monotonic() + timeout_s
    seen = predict_calls_seen(proxy)
    while seen < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = predict_calls_seen(proxy)
    return seen


async def burst(address: str, channels: int, calls_per_channel: int) -> collections.Counter:
    """Start every call at once; count the answers by code (and UNAVAILABLE's by message)."""
    request = predict_request("default", {"x": np.ones((1, 4), np.float32)}) \
        .SerializeToString()
    # A subchannel pool per channel: one connection each, as separate clients would have.
    opened = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
              for _ in range(channels)]
    answers: collections.Counter = collections.Counter()

    async def one(channel: grpc.aio.Channel) -> None:
        try:
            await channel.unary_unary(PREDICT)(request, timeout=CALL_TIMEOUT_S)
            answers["OK"] += 1
        except grpc.aio.AioRpcError as err:
            answers[f"{err.code().name}: {err.details()}"] += 1

    try:
        await asyncio.gather(*(one(channel) for channel in opened
                               for _ in range(calls_per_channel)))
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))
    return answers


def assert_answered_by_proxy(answers: collections.Counter, proxy: Process, calls: int,
                             seen_before: float) -> None:
    assert sum(answers.values()) == calls
    unexpected = {answer: n for answer, n in answers.items()
                  if answer != "OK" and not answer.startswith("UNAVAILABLE: ")}
    assert not unexpected, f"answers other than OK and UNAVAILABLE: {unexpected}"
    assert answers["OK"] > 0
    # Every call reached the proxy: none was refused by the transport before it.
    assert wait_for_calls_seen(proxy, seen_before + calls) == seen_before + calls


def test_queue_limits_cover_more_than_the_proxy_admits() -> None:
    from batchproxy.config import BatchingConfig, ProxyConfig

    config = ProxyConfig(batching=BatchingConfig(max_enqueued_rows=100_000))
    limits = dict(queue_limits(config))
    assert pending_limit(config) > 100_000
    assert limits["grpc.server.max_pending_requests"] == pending_limit(config)
    assert limits["grpc.server.max_pending_requests_hard_limit"] == pending_limit(config)
    # Past grpc's C int, the limits stay valid channel arguments.
    huge = ProxyConfig(batching=BatchingConfig(max_enqueued_rows=1 << 40))
    assert pending_limit(huge) == (1 << 31) - 1


def test_thousands_of_calls_on_one_channel(proxy: Process) -> None:
    seen_before = predict_calls_seen(proxy)
    answers = asyncio.run(burst(proxy.address, 1, ONE_CHANNEL_CALLS))
    assert_answered_by_proxy(answers, proxy, ONE_CHANNEL_CALLS, seen_before)


def test_a_few_calls_on_each_of_many_channels(proxy: Process) -> None:
    seen_before = predict_calls_seen(proxy)
    answers = asyncio.run(burst(proxy.address, CHANNELS, CALLS_PER_CHANNEL))
    assert_answered_by_proxy(answers, proxy, CHANNELS * CALLS_PER_CHANNEL, seen_before)
