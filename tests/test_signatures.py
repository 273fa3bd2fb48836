"""SignatureCache: one GetModelMetadata per model key, refreshed when it may be out of date.
Real replica processes answer; the cache talks to them as the proxy's does, through the
engine's forward over a real ReplicaPool."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from procs import start_replica

from batchproxy.config import BatchingConfig
from batchproxy.engine import Engine
from batchproxy.errors import ProxyError
from batchproxy.fleet.slots import ReplicaPool
from batchproxy.frontends.signatures import SignatureCache

KEY = ("m", None, None)


def cache_over(pool: ReplicaPool, **kwargs) -> SignatureCache:
    return SignatureCache(Engine(BatchingConfig(), pool).forward, **kwargs)


@pytest.fixture(scope="module")
def replicas():
    """Model "m": version 1 is the identity model (input x), version 2 the demo model
    (input flatten_input), on two replicas."""
    first = start_replica("identity", model_name="m", model_version=1)
    second = start_replica("demo", model_name="m", model_version=2)
    yield first, second
    first.stop()
    second.stop()


async def test_concurrent_misses_share_one_fetch_and_hits_fetch_nothing(replicas):
    pool = ReplicaPool([replicas[0].address])
    cache = cache_over(pool)
    entries = await asyncio.gather(*(cache.get(KEY) for _ in range(20)))
    assert all(entry is entries[0] for entry in entries)
    assert entries[0].version == 1
    sig = entries[0].signature("")
    assert (sig.name, sig.inputs, sig.outputs) == ("serving_default", {"x": 1}, {"y": 1})
    await cache.get(KEY)
    assert cache.fetches == 1
    assert (await cache.get(("m", 1, None))).version == 1  # another key, another fetch
    assert cache.fetches == 2
    await pool.close()


async def test_unknown_signatures_and_errors_are_not_cached(replicas):
    pool = ReplicaPool([replicas[0].address])
    cache = cache_over(pool)
    with pytest.raises(ProxyError) as raised:
        (await cache.get(KEY)).signature("nope")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.message == 'Serving signature name: "nope" not found in signature def'
    for _ in range(2):
        with pytest.raises(ProxyError, match="Servable not found") as raised:
            await cache.get(("absent", None, None))
        assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert cache.fetches == 3
    await pool.close()


async def test_an_expired_entry_is_served_while_it_is_refreshed(replicas):
    first, second = replicas
    pool = ReplicaPool([first.address])
    cache = cache_over(pool, ttl_s=0.0)
    assert (await cache.get(KEY)).version == 1
    pool.set_addresses([second.address])  # the fleet moved on to version 2
    assert (await cache.get(KEY)).version == 1  # stale, but no caller waits for the refresh
    for _ in range(100):
        await asyncio.sleep(0.02)
        entry = await cache.get(KEY)
        if entry.version == 2:
            break
    assert entry.version == 2 and entry.signature("").inputs == {"flatten_input": 1}
    await cache.close()
    await pool.close()


async def test_cached_answers_without_fetching_and_refreshes_as_get_does(replicas):
    first, second = replicas
    pool = ReplicaPool([first.address])
    cache = cache_over(pool, ttl_s=0.0)
    assert cache.cached(KEY) is None  # never fetched: only get() fetches
    assert cache.fetches == 0
    entry = await cache.get(KEY)
    assert cache.cached(KEY) is entry and entry.version == 1  # expired, still served
    pool.set_addresses([second.address])
    for _ in range(100):  # the expired entry asked for a refresh in the background
        await asyncio.sleep(0.02)
        entry = cache.cached(KEY)
        if entry is not None and entry.version == 2:
            break
    assert entry is not None and entry.version == 2
    cache.forget(KEY)
    assert cache.cached(KEY) is None
    await cache.close()
    await pool.close()


async def test_a_new_served_version_triggers_a_refresh(replicas):
    first, second = replicas
    pool = ReplicaPool([first.address])
    cache = cache_over(pool)
    await cache.get(KEY)
    cache.saw_version(KEY, 1)  # nothing new
    await cache.get(KEY)
    assert cache.fetches == 1
    pool.set_addresses([second.address])
    cache.saw_version(KEY, 2)
    for _ in range(100):
        await asyncio.sleep(0.02)
        if (await cache.get(KEY)).version == 2:
            break
    assert cache.fetches == 2
    assert (await cache.get(KEY)).version == 2
    await cache.close()
    await pool.close()


async def test_a_model_gone_is_forgotten(replicas):
    first, _ = replicas
    pool = ReplicaPool([first.address])
    cache = cache_over(pool)
    await cache.get(("m", 1, None))
    cache.forget(("m", 1, None))
    await cache.get(("m", 1, None))
    assert cache.fetches == 2
    await pool.close()


async def test_a_caller_waits_no_longer_than_its_deadline():
    replica = start_replica("identity", model_name="m")
    pool = ReplicaPool([replica.address])
    cache = cache_over(pool)
    try:
        await cache.get(("m", 1, None))  # the channel is connected before the replica stalls
        replica.signal(signal.SIGSTOP)  # the connection stays open, nothing is answered
        with pytest.raises(ProxyError) as raised:
            await cache.get(KEY, timeout=0.2)
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        replica.signal(signal.SIGCONT)
        # The shared fetch went on and serves the next caller.
        assert (await cache.get(KEY, timeout=10)).version == 1
        assert cache.fetches == 2
    finally:
        replica.signal(signal.SIGCONT)
        await pool.close()
        replica.stop()
