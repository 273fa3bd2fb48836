"""SignatureCache: one GetModelMetadata per model key, refreshed when it may be out of date."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from batchproxy.errors import ProxyError
from batchproxy.protos import get_model_metadata_pb2, signature_pb2
from batchproxy.signatures import GET_MODEL_METADATA, SignatureCache, parse_metadata


def metadata(version: int, input_name: str = "x") -> bytes:
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    sig = signature_map.signature_def["serving_default"]
    sig.inputs[input_name].CopyFrom(signature_pb2.TensorInfo(name="t:0", dtype=1))
    sig.outputs["y"].CopyFrom(signature_pb2.TensorInfo(name="u:0", dtype=9))
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = "m"
    response.model_spec.version.value = version
    response.metadata["signature_def"].Pack(signature_map)
    return response.SerializeToString()


class FakePool:
    """Answers GetModelMetadata from `answers` (bytes or a ProxyError), after `delay_s`."""

    def __init__(self, answer: bytes | ProxyError, delay_s: float = 0.0) -> None:
        self.answer = answer
        self.delay_s = delay_s
        self.calls: list[bytes] = []

    async def forward(self, path: str, request: bytes, timeout: float | None) -> bytes:
        assert path == GET_MODEL_METADATA
        self.calls.append(request)
        await asyncio.sleep(self.delay_s)
        if isinstance(self.answer, ProxyError):
            raise self.answer
        return self.answer


def test_parse_metadata():
    entry = parse_metadata(metadata(4))
    assert entry.version == 4
    sig = entry.signature("")
    assert (sig.name, sig.inputs, sig.outputs) == ("serving_default", {"x": 1}, {"y": 9})
    assert entry.signature("serving_default") is sig
    with pytest.raises(ProxyError) as raised:
        entry.signature("nope")
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.message == 'Serving signature name: "nope" not found in signature def'


async def test_concurrent_misses_share_one_fetch_and_hits_fetch_nothing():
    pool = FakePool(metadata(1), delay_s=0.05)
    cache = SignatureCache(pool)  # type: ignore[arg-type]
    entries = await asyncio.gather(*(cache.get(("m", None, None)) for _ in range(20)))
    assert all(entry is entries[0] for entry in entries)
    await cache.get(("m", None, None))
    assert len(pool.calls) == 1
    await cache.get(("m", 1, None))  # another key, another fetch
    assert len(pool.calls) == 2
    request = get_model_metadata_pb2.GetModelMetadataRequest.FromString(pool.calls[1])
    assert request.model_spec.version.value == 1
    assert list(request.metadata_field) == ["signature_def"]


async def test_errors_are_not_cached():
    pool = FakePool(ProxyError(grpc.StatusCode.NOT_FOUND, "Servable not found"))
    cache = SignatureCache(pool)  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(ProxyError, match="Servable not found"):
            await cache.get(("m", None, None))
    assert len(pool.calls) == 2
    pool.answer = metadata(1)
    assert (await cache.get(("m", None, None))).version == 1


async def test_an_expired_entry_is_served_while_it_is_refreshed():
    pool = FakePool(metadata(1))
    cache = SignatureCache(pool, ttl_s=0.0)  # type: ignore[arg-type]
    key = ("m", None, None)
    assert (await cache.get(key)).version == 1
    pool.answer = metadata(2, input_name="z")
    assert (await cache.get(key)).version == 1  # stale, but no caller waits for the refresh
    await asyncio.sleep(0.01)
    entry = await cache.get(key)
    assert entry.version == 2 and entry.signature("").inputs == {"z": 1}
    await cache.close()


async def test_a_new_served_version_triggers_a_refresh():
    pool = FakePool(metadata(1))
    cache = SignatureCache(pool)  # type: ignore[arg-type]
    key = ("m", None, None)
    await cache.get(key)
    cache.saw_version(key, 1)  # nothing new
    await cache.get(key)
    assert len(pool.calls) == 1
    pool.answer = metadata(2)
    cache.saw_version(key, 2)
    await cache.get(key)
    await asyncio.sleep(0.01)
    assert len(pool.calls) == 2
    assert (await cache.get(key)).version == 2


async def test_a_model_gone_is_forgotten():
    pool = FakePool(metadata(1))
    cache = SignatureCache(pool)  # type: ignore[arg-type]
    key = ("m", None, None)
    await cache.get(key)
    cache.forget(key)
    pool.answer = ProxyError(grpc.StatusCode.NOT_FOUND, "gone")
    with pytest.raises(ProxyError, match="gone"):
        await cache.get(key)


async def test_a_caller_waits_no_longer_than_its_deadline():
    pool = FakePool(metadata(1), delay_s=0.2)
    cache = SignatureCache(pool)  # type: ignore[arg-type]
    with pytest.raises(ProxyError) as raised:
        await cache.get(("m", None, None), timeout=0.01)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The shared fetch went on and serves the next caller.
    assert (await cache.get(("m", None, None))).version == 1
    assert len(pool.calls) == 1
