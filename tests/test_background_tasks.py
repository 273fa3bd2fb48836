"""The proxy's background loops (health checks, discovery, gauge sampler) run under a
supervisor or on their own, and their close() never swallows the caller's cancellation.
Readiness follows the supervisor. No processes: fakes stand in for the fleet."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from batchproxy.fleet.discovery import DnsDiscovery
from batchproxy.fleet.health_checks import HealthChecker
from batchproxy.metrics import GaugeSampler
from batchproxy.protos import health_pb2
from batchproxy.readiness import Readiness
from batchproxy.supervisor import Supervisor


class FakePool:
    """What the health checker, discovery and readiness read of a ReplicaPool."""

    def __init__(self) -> None:
        self.replicas: dict[str, object] = {}
        self.known_models: set[str] = set()
        self.healthy = True

    def note_model(self, model: str) -> bool:
        self.known_models.add(model)
        return True

    def forget_missing_models(self, keep: set[str]) -> None:
        pass

    async def close_dropped(self) -> None:
        pass

    def set_addresses(self, addresses) -> None:
        self.replicas = dict.fromkeys(addresses)

    def any_healthy(self) -> bool:
        return self.healthy


def health_checker() -> HealthChecker:
    return HealthChecker(FakePool(), interval_s=0.01)  # type: ignore[arg-type]


def discovery() -> DnsDiscovery:
    return DnsDiscovery(FakePool(), [], ["127.0.0.1:1"], refresh_s=0.01)  # type: ignore[arg-type]


def sampler() -> GaugeSampler:
    return GaugeSampler(lambda: None, interval_s=0.01)


COMPONENTS: dict[str, Callable[[], HealthChecker | DnsDiscovery | GaugeSampler]] = {
    "health_checks": health_checker,
    "discovery": discovery,
    "gauge_sampler": sampler,
}


@pytest.mark.parametrize("name", list(COMPONENTS))
async def test_start_and_close_on_their_own(name):
    component = COMPONENTS[name]()
    component.start()
    await asyncio.sleep(0.03)
    await component.close()
    await component.close()  # twice is harmless


@pytest.mark.parametrize("name", list(COMPONENTS))
async def test_close_propagates_the_callers_cancellation(name):
    component = COMPONENTS[name]()
    component.start()
    await asyncio.sleep(0.02)
    closing = asyncio.ensure_future(component.close())
    await asyncio.sleep(0)  # close() has cancelled the loop and waits for it
    closing.cancel()  # ... and now its caller is cancelled too
    with pytest.raises(asyncio.CancelledError):
        await closing


@pytest.mark.parametrize("name", list(COMPONENTS))
async def test_start_under_a_supervisor(name):
    supervisor = Supervisor()
    component = COMPONENTS[name]()
    component.start(supervisor)
    await asyncio.sleep(0.03)
    assert supervisor.names == [name]
    await component.close()  # the supervisor owns the task: close leaves it be
    assert supervisor.names == [name]
    await supervisor.close()
    assert supervisor.names == []


async def test_a_sampler_that_raises_is_restarted_and_readiness_follows():
    supervisor = Supervisor(restart_delay_s=0.1)
    pool = FakePool()
    readiness = Readiness(pool, supervisor)  # type: ignore[arg-type]
    assert readiness.ready()
    calls = 0

    def sample() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("bad gauge")

    GaugeSampler(sample, interval_s=0.01).start(supervisor)
    await asyncio.sleep(0.02)
    assert not readiness.ready()
    assert readiness.reason() == "background task down: gauge_sampler: ValueError: bad gauge"
    request = health_pb2.HealthCheckRequest(service="").SerializeToString()
    status = health_pb2.HealthCheckResponse.FromString(readiness._status(request)).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    await asyncio.sleep(0.2)
    assert calls >= 2 and readiness.ready()
    await supervisor.close()


async def test_readiness_reasons_in_order():
    supervisor = Supervisor()
    pool = FakePool()
    readiness = Readiness(pool, supervisor)  # type: ignore[arg-type]
    assert readiness.reason() == "ready"
    pool.healthy = False
    assert readiness.reason() == "no healthy replica"
    readiness.draining = True
    assert readiness.reason() == "draining" and not readiness.ready()
