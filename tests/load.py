"""Bounded closed-loop load for fleet tests: N callers, each sending unique one-row calls to
the identity model and checking that the answer is its own, until a time limit."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_client import predict_request, stub, to_array

# What grpc's core says of a call it received but had matched to no handler when its server
# shut down (grpc/grpc#41785: UNAVAILABLE would be right). Never accepted, so counted apart.
UNMATCHED_AT_SHUTDOWN = "CANCELLED before any handler"


def error_code_of(code: str, details: str) -> str:
    """A failed call's status name, or UNMATCHED_AT_SHUTDOWN for grpc's CANCELLED with
    exactly the details it gives such a call; any other CANCELLED stays CANCELLED."""
    return UNMATCHED_AT_SHUTDOWN if code == "CANCELLED" and details == "CANCELLED" else code


def error_code(err: grpc.aio.AioRpcError) -> str:
    return error_code_of(err.code().name, err.details() or "")


@dataclass
class LoadResult:
    ok: int = 0
    wrong: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    error_messages: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


async def closed_loop(address: str, callers: int, duration_s: float, *,
                      model: str = "identity", timeout_s: float = 5.0,
                      max_calls: int = 1_000_000, stop: asyncio.Event | None = None,
                      ) -> LoadResult:
    result = LoadResult()
    deadline = time.monotonic() + duration_s
    sent = 0
    async with grpc.aio.insecure_channel(address) as channel:
        client = stub(channel)

        async def caller(index: int) -> None:
            nonlocal sent
            sequence = 0
            while time.monotonic() < deadline and sent < max_calls:
                if stop is not None and stop.is_set():
                    return
                sent += 1
                sequence += 1
                x = np.array([[index, sequence, index * 7919 + sequence]], np.float32)
                try:
                    response = await client.Predict(predict_request(model, {"x": x}),
                                                    timeout=timeout_s)
                except grpc.aio.AioRpcError as err:
                    result.errors[error_code(err)] += 1
                    if len(result.error_messages) < 20:
                        result.error_messages.append(f"{err.code().name}: {err.details()}")
                    await asyncio.sleep(0.01)
                    continue
                if np.array_equal(to_array(response.outputs["y"]), x):
                    result.ok += 1
                else:
                    result.wrong += 1

        await asyncio.gather(*(caller(i) for i in range(callers)))
    return result
