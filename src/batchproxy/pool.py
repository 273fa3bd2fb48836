"""The replicas behind the proxy: channels, health, in-flight accounting, choice of replica.

A batch goes to a healthy replica that serves its model, chosen by the power of two choices
over outstanding batches, each replica holding at most `max_inflight` batches: a slow replica
keeps its slots longer and so receives less work. Calls travel as raw bytes.

Replica states: JOINING (found, not yet checked) -> HEALTHY <-> EJECTED (failing, out for a
back-off that grows with each ejection), and DRAINING (gone from discovery: in-flight batches
finish, then it is dropped). Health itself is probed by `health_checks.py`; this module only
keeps the state and decides."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Callable, Iterable

import grpc

from batchproxy.errors import ProxyError

log = logging.getLogger(__name__)

PREDICT = "/tensorflow.serving.PredictionService/Predict"

# TFS allows INT32_MAX both ways; a merged batch can be far larger than any single call.
UNLIMITED_MESSAGES = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]

# Model names come from clients: bound what is tracked per name.
MAX_TRACKED_MODELS = 256

# Codes that mean "this replica, not this request": worth ejecting for, and worth a retry.
REPLICA_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE})


def is_replica_failure(error: ProxyError) -> bool:
    if error.code in REPLICA_FAILURES:
        return True
    # A replica that dies mid-call can surface as UNKNOWN/INTERNAL "Stream removed".
    return error.code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and (
        "Stream removed" in error.message or "RST_STREAM" in error.message
    )


class ReplicaState(enum.Enum):
    JOINING = "joining"
    HEALTHY = "healthy"
    EJECTED = "ejected"
    DRAINING = "draining"


class ModelState(enum.Enum):
    AVAILABLE = "available"
    UNAVAILABLE = "unavailable"  # known there, but loading, unloading or failed
    MISSING = "missing"  # the replica answers NOT_FOUND for it


class Route(enum.Enum):
    SERVED = "served"  # some healthy replica serves it (or has not said otherwise yet)
    MISSING = "missing"  # every healthy replica says NOT_FOUND: let one of them say so
    WAIT = "wait"  # no replica checked yet: wait for the first health checks
    NOWHERE = "nowhere"  # nothing can serve it now: refuse at once with UNAVAILABLE


def channel_options(reconnect_backoff_ms: int) -> list[tuple[str, int]]:
    # gRPC's reconnect back-off grows to 120 s by default: a restarted replica would stay
    # unreachable long after it is back. Cap it near the health-check period instead.
    return [
        *UNLIMITED_MESSAGES,
        ("grpc.initial_reconnect_backoff_ms", min(100, reconnect_backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(100, reconnect_backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", reconnect_backoff_ms),
    ]


class Replica:
    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None,
                 reconnect_backoff_ms: int = 1000) -> None:
        self.address = address
        options = channel_options(reconnect_backoff_ms)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        self.state = ReplicaState.JOINING
        self.outstanding = 0
        self.batches_sent = 0
        # What the last health check said of each model; absent: not checked yet.
        self.models: dict[str, ModelState] = {}
        self.consecutive_failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.healthy_since = 0.0
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    def method(self, path: str) -> grpc.aio.UnaryUnaryMultiCallable:
        """A raw-bytes callable for `path` (no serializers: bytes in, bytes out)."""
        call = self._calls.get(path)
        if call is None:
            call = self._calls[path] = self.channel.unary_unary(path)
        return call

    def serves(self, model: str) -> bool:
        return self.state is ReplicaState.HEALTHY and self.models.get(
            model, ModelState.AVAILABLE) is ModelState.AVAILABLE

    def __repr__(self) -> str:
        return f"Replica({self.address}, {self.state.value}, outstanding={self.outstanding})"


StateListener = Callable[[Replica, ReplicaState, str], None]


class ReplicaPool:
    def __init__(self, addresses: Iterable[str] = (), max_inflight: int = 2,
                 default_timeout_s: float = 30.0, *, eject_after_failures: int = 2,
                 ejection_base_s: float = 1.0, ejection_max_s: float = 30.0,
                 credentials: grpc.ChannelCredentials | None = None,
                 reconnect_backoff_ms: int = 1000) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.max_inflight = max_inflight
        self.default_timeout_s = default_timeout_s
        self.eject_after_failures = eject_after_failures
        self.ejection_base_s = ejection_base_s
        self.ejection_max_s = ejection_max_s
        self.credentials = credentials
        self.reconnect_backoff_ms = reconnect_backoff_ms
        self.replicas: dict[str, Replica] = {}
        self._routes: dict[str, Route] = {}
        self.known_models: set[str] = set()
        # Called on every state change (replica, old state, reason): logs, metrics, waiters.
        self.listeners: list[StateListener] = []
        # Called whenever a slot frees or a replica becomes usable: the batcher re-schedules.
        self.capacity_listeners: list[Callable[[], None]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._closing: list[Replica] = []
        for address in addresses:
            self.add(address)

    # -- membership -------------------------------------------------------------------------

    def add(self, address: str) -> Replica:
        replica = self.replicas.get(address)
        if replica is None:
            self._routes.clear()
            replica = self.replicas[address] = Replica(address, self.credentials,
                                                       self.reconnect_backoff_ms)
            log.info("replica %s joined", address)
        elif replica.state is ReplicaState.DRAINING:
            # It came back before it was dropped: it must pass a health check again.
            self._set_state(replica, ReplicaState.JOINING, "rediscovered")
        return replica

    def set_addresses(self, addresses: Iterable[str]) -> None:
        """Discovery's answer: new addresses join, vanished ones drain."""
        wanted = set(addresses)
        for address in wanted:
            self.add(address)
        for address, replica in list(self.replicas.items()):
            if address not in wanted and replica.state is not ReplicaState.DRAINING:
                self._set_state(replica, ReplicaState.DRAINING, "gone from discovery")
                self._drop_if_drained(replica)

    def _drop_if_drained(self, replica: Replica) -> None:
        if (replica.state is ReplicaState.DRAINING and replica.outstanding == 0
                and self.replicas.get(replica.address) is replica):
            del self.replicas[replica.address]
            self._routes.clear()
            log.info("replica %s drained and dropped", replica.address)
            self._closing.append(replica)

    def _set_state(self, replica: Replica, state: ReplicaState, reason: str) -> None:
        old = replica.state
        if old is state:
            return
        replica.state = state
        self._routes.clear()
        if state is ReplicaState.HEALTHY:
            replica.healthy_since = time.monotonic()
        for listener in self.listeners:
            listener(replica, old, reason)
        if state is ReplicaState.HEALTHY:
            self._notify_capacity()

    # -- health -----------------------------------------------------------------------------

    def record_check(self, replica: Replica, passed: bool, reason: str = "",
                     models: dict[str, ModelState] | None = None) -> None:
        """The result of an active health check."""
        if models:
            became_available = any(
                state is ModelState.AVAILABLE and replica.models.get(name) is not state
                for name, state in models.items())
            if any(replica.models.get(name) is not state for name, state in models.items()):
                self._routes.clear()
            replica.models.update(models)
            if became_available:
                self._notify_capacity()
        now = time.monotonic()
        if replica.state is ReplicaState.DRAINING:
            return
        if not passed:
            if replica.state is not ReplicaState.EJECTED:
                self._eject(replica, reason or "health check failed")
            return
        if replica.state is ReplicaState.EJECTED and now < replica.ejected_until:
            return  # still serving its back-off
        replica.consecutive_failures = 0
        self._set_state(replica, ReplicaState.HEALTHY, reason or "health check passed")

    def record_success(self, replica: Replica) -> None:
        replica.consecutive_failures = 0

    def record_failure(self, replica: Replica, error: ProxyError) -> None:
        """A call failed in a way that blames the replica (passive health)."""
        replica.consecutive_failures += 1
        if (replica.consecutive_failures >= self.eject_after_failures
                and replica.state is ReplicaState.HEALTHY):
            self._eject(replica, f"{replica.consecutive_failures} consecutive failures: "
                                 f"{error.code.name} {error.message}")

    def _eject(self, replica: Replica, reason: str) -> None:
        now = time.monotonic()
        # A replica healthy for a long while starts over at the base back-off.
        if replica.healthy_since and now - replica.healthy_since > self.ejection_max_s * 2:
            replica.ejections = 0
        backoff = min(self.ejection_base_s * 2 ** replica.ejections, self.ejection_max_s)
        replica.ejections += 1
        replica.ejected_until = now + backoff
        self._set_state(replica, ReplicaState.EJECTED, f"{reason}; back-off {backoff:.1f}s")

    # -- choosing ---------------------------------------------------------------------------

    def note_model(self, model: str) -> bool:
        """Remember a model seen in traffic so health checks cover it. True when new.
        Names come from clients, so only so many are tracked; health checks forget the ones
        no replica has."""
        if model in self.known_models or len(self.known_models) >= MAX_TRACKED_MODELS:
            return False
        self.known_models.add(model)
        return True

    def forget_missing_models(self, keep: set[str]) -> None:
        """Stop health-checking models that every replica reports missing."""
        for model in list(self.known_models - keep):
            states = [r.models.get(model) for r in self.replicas.values()
                      if r.state is not ReplicaState.DRAINING]
            if states and all(state is ModelState.MISSING for state in states):
                self.known_models.discard(model)
                for replica in self.replicas.values():
                    replica.models.pop(model, None)
                self._routes.pop(model, None)

    def route(self, model: str) -> Route:
        """Where calls for `model` can go now (see Route). Asked on every call: cached until
        a replica's state, a model's state or the membership changes."""
        route = self._routes.get(model)
        if route is None:
            if len(self._routes) >= MAX_TRACKED_MODELS:
                self._routes.clear()  # model names come from clients: keep the cache small
            route = self._routes[model] = self._compute_route(model)
        return route

    def _compute_route(self, model: str) -> Route:
        healthy = [r for r in self.replicas.values() if r.state is ReplicaState.HEALTHY]
        if not healthy:
            joining = any(r.state is ReplicaState.JOINING for r in self.replicas.values())
            return Route.WAIT if joining else Route.NOWHERE
        states = [r.models.get(model) for r in healthy]
        if any(state is None or state is ModelState.AVAILABLE for state in states):
            return Route.SERVED
        if all(state is ModelState.MISSING for state in states):
            return Route.MISSING
        return Route.NOWHERE

    def try_acquire(self, model: str, exclude: Replica | None = None,
                    idle_only: bool = False) -> Replica | None:
        """Reserve a slot on a replica serving `model` (power of two choices), or None.
        `idle_only`: only a replica with no batch in flight will do."""
        route = self.route(model)
        limit = 1 if idle_only else self.max_inflight
        if route is Route.SERVED:
            eligible = [r for r in self.replicas.values()
                        if r.outstanding < limit and r is not exclude and r.serves(model)]
        elif route is Route.MISSING:
            # No replica has the model: one of them answers with TFS's own NOT_FOUND.
            eligible = [r for r in self.replicas.values()
                        if r.outstanding < limit and r is not exclude
                        and r.state is ReplicaState.HEALTHY]
        else:
            return None
        if not eligible:
            return None
        if len(eligible) > 2:
            eligible = random.sample(eligible, 2)
        replica = min(eligible, key=lambda r: r.outstanding)
        replica.outstanding += 1
        replica.batches_sent += 1
        return replica

    async def acquire(self, model: str, exclude: Replica | None = None,
                      timeout: float | None = None) -> Replica:
        """Wait for a slot on a replica serving `model`."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            replica = self.try_acquire(model, exclude)
            if replica is not None:
                return replica
            if self.route(model) is Route.NOWHERE:
                raise ProxyError(grpc.StatusCode.UNAVAILABLE,
                                 f"no healthy replica serves model '{model}'")
            waiter = loop.create_future()
            self._waiters.append(waiter)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise ProxyError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 "Deadline exceeded while waiting for a replica")
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                raise ProxyError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 "Deadline exceeded while waiting for a replica") from None

    def release(self, replica: Replica) -> None:
        replica.outstanding -= 1
        self._drop_if_drained(replica)
        self._notify_capacity()

    def _notify_capacity(self) -> None:
        for listener in self.capacity_listeners:
            listener()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def any_healthy(self) -> bool:
        return any(r.state is ReplicaState.HEALTHY for r in self.replicas.values())

    # -- calls ------------------------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float:
        return self.default_timeout_s if timeout is None else timeout

    async def predict(self, replica: Replica, request: bytes, timeout: float | None) -> bytes:
        """One merged batch to `replica`; the caller holds a slot from acquire()."""
        try:
            response = await replica.method(PREDICT)(request, timeout=self._timeout(timeout))
        except grpc.aio.AioRpcError as err:
            error = ProxyError.from_rpc_error(err)
            if is_replica_failure(error):
                self.record_failure(replica, error)
            raise error from None
        self.record_success(replica)
        return response

    async def forward(self, path: str, request: bytes, timeout: float | None,
                      model: str = "") -> bytes:
        """An unbatched call (metadata, status, classify, ...) to a healthy replica that
        serves `model` (any healthy one when the model is not known).

        These calls take no batch slot: they are small and must not wait behind batches.
        A replica failure is retried once on another replica."""
        tried: Replica | None = None
        by_model = bool(model) and self.route(model) is Route.SERVED
        for _ in range(2):
            candidates = [r for r in self.replicas.values()
                          if r is not tried and (r.serves(model) if by_model
                                                 else r.state is ReplicaState.HEALTHY)]
            if not candidates:
                candidates = [r for r in self.replicas.values()
                              if r.state is not ReplicaState.DRAINING and r is not tried]
            if not candidates:
                raise ProxyError(grpc.StatusCode.UNAVAILABLE, "no healthy replica")
            replica = min(candidates, key=lambda r: r.outstanding)
            try:
                return await replica.method(path)(request, timeout=self._timeout(timeout))
            except grpc.aio.AioRpcError as err:
                error = ProxyError.from_rpc_error(err)
                if not is_replica_failure(error):
                    raise error from None
                self.record_failure(replica, error)
                tried = replica
        raise error

    async def close(self) -> None:
        replicas = list(self.replicas.values()) + self._closing
        await asyncio.gather(*(replica.channel.close() for replica in replicas))

    async def close_dropped(self) -> None:
        """Close channels of replicas that drained; called by the health loop."""
        closing, self._closing = self._closing, []
        await asyncio.gather(*(replica.channel.close() for replica in closing))
