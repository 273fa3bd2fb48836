"""The replicas behind the proxy: channels, health, in-flight accounting, choice of replica.

A batch goes to a healthy replica that serves its model, chosen by the power of two choices
over outstanding batches, each replica holding at most `max_inflight` batches: a slow replica
keeps its slots longer and so receives less work. Calls travel as raw bytes.

Endpoint states: JOINING (found, not yet checked) -> HEALTHY <-> EJECTED (failing, out for a
back-off that grows with each ejection), and DRAINING (gone from discovery: in-flight batches
finish, then it is dropped). Health itself is probed by `health_checks.py`; this module only
keeps the state and decides."""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import time
from collections.abc import Callable, Collection, Coroutine, Iterable
from typing import Any

import grpc

from batchproxy.errors import ProxyError
from batchproxy.fleet.costs import CostModel
from batchproxy.fleet.transport import Transport, TransportFactory, grpc_transports
from batchproxy.fleet.turn import TurnLag, follow
from batchproxy.methods import PREDICT

log = logging.getLogger(__name__)

# TFS's ModelVersionStatus.State AVAILABLE.
AVAILABLE_STATE = 30
COMING_STATES = (10, 20)  # START, LOADING: on their way to AVAILABLE

# Model names come from clients: bound what is tracked per name.
MAX_TRACKED_MODELS = 256

# Timed-out health checks in a row that eject a replica (a refused one ejects at once).
UNCERTAIN_FAILED_CHECKS = 2

# Codes that mean "this replica, not this request": worth ejecting for, and worth a retry.
REPLICA_FAILURES = frozenset({grpc.StatusCode.UNAVAILABLE})


def is_replica_failure(error: ProxyError) -> bool:
    if error.code in REPLICA_FAILURES:
        return True
    # A replica that dies mid-call can surface as UNKNOWN/INTERNAL "Stream removed".
    return error.code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and (
        "Stream removed" in error.message or "RST_STREAM" in error.message
    )


def loop_time() -> float:
    """The running loop's clock (virtual in the simulator); monotonic time outside a loop,
    which is what asyncio's default clock reads anyway."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


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


class Endpoint:
    """One replica as the proxy sees it: its transport, state and in-flight batches."""

    def __init__(self, address: str, transport: Transport) -> None:
        self.address = address
        self.transport = transport
        self.state = ReplicaState.JOINING
        self.outstanding = 0
        self.batches_sent = 0
        # What the last health check said of each model; absent: not checked yet.
        self.models: dict[str, ModelState] = {}
        # Every version the last health check listed, per model: version -> state (TFS's
        # ModelVersionStatus.State number). Absent: the replica has not said.
        self.versions: dict[str, dict[int, int]] = {}
        self.consecutive_failures = 0
        self.ejections = 0
        self.ejected_until = 0.0
        self.healthy_since = 0.0
        self.failed_checks = 0  # active health checks failed in a row
        # Learned per model (fleet/costs.py), and when the replica is expected to be free of
        # the batches it holds (loop time): what the adaptive policy plans with.
        self.costs: dict[str, CostModel] = {}
        self.free_at = 0.0
        # When the last batch answered here came back (loop time): where a batch sent to
        # wait behind it began its own run (engine/dispatcher.py).
        self.answered_at = -math.inf
        # The round trip of a call that costs the replica nothing (its health checks; fleet/
        # turn.py, follow): what a batch spends on the way there and its answer on the way
        # back, beside the replica's own time. 0 until a check was timed.
        self.trip_s = 0.0

    def note_trip(self, seconds: float) -> None:
        """A health check was answered `seconds` after it left."""
        if math.isfinite(seconds) and seconds >= 0:
            self.trip_s = follow(self.trip_s, seconds)

    def cost(self, model: str) -> CostModel:
        model_cost = self.costs.get(model)
        if model_cost is None:
            if len(self.costs) >= MAX_TRACKED_MODELS:
                self.costs.clear()  # model names come from clients: bound the table
            model_cost = self.costs[model] = CostModel()
        return model_cost

    def serves(self, model: str, version: int | None = None) -> bool:
        """Healthy and serving `model`; with `version`, that version is AVAILABLE here (or
        the replica has not listed its versions yet, as a model not yet checked counts)."""
        if not (self.state is ReplicaState.HEALTHY and self.models.get(
                model, ModelState.AVAILABLE) is ModelState.AVAILABLE):
            return False
        if version is None:
            return True
        versions = self.versions.get(model)
        return versions is None or versions.get(version) == AVAILABLE_STATE

    def __repr__(self) -> str:
        return f"Endpoint({self.address}, {self.state.value}, outstanding={self.outstanding})"


StateListener = Callable[[Endpoint, ReplicaState, str], None]


class ReplicaPool:
    def __init__(self, addresses: Iterable[str] = (), max_inflight: int = 2,
                 default_timeout_s: float = 30.0, *, eject_after_failures: int = 2,
                 ejection_base_s: float = 1.0, ejection_max_s: float = 30.0,
                 transports: TransportFactory | None = None,
                 seed: int | None = None) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.max_inflight = max_inflight
        self.default_timeout_s = default_timeout_s
        self.eject_after_failures = eject_after_failures
        self.ejection_base_s = ejection_base_s
        self.ejection_max_s = ejection_max_s
        self.transports = transports or grpc_transports()
        # The choice of replica is random (power of two choices); seeded, it is repeatable.
        self.random = random.Random(seed)
        # How late the proxy's loop turns back to a replica that answered (fleet/turn.py):
        # how long before its expected free time the adaptive policy sends the next batch.
        self.turn = TurnLag()
        self.replicas: dict[str, Endpoint] = {}
        self._routes: dict[tuple[str, int | None], Route] = {}
        # What others derive from the replicas' states (the versions' view, fleet/versions.py),
        # dropped whenever the routes are: at every state, model or membership change.
        self.derived: dict[object, object] = {}
        self.known_models: set[str] = set()
        # Called on every state change (replica, old state, reason): logs, metrics, waiters.
        self.listeners: list[StateListener] = []
        # Called whenever a slot frees or a replica becomes usable: the batcher re-schedules.
        self.capacity_listeners: list[Callable[[], None]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._closing: list[Endpoint] = []
        for address in addresses:
            self.add(address)

    def _changed(self) -> None:
        """A replica's state, a model's or a version's, or the membership changed: what was
        worked out from them is worked out again when next asked."""
        self._routes.clear()
        self.derived.clear()

    # -- membership -------------------------------------------------------------------------

    def add(self, address: str) -> Endpoint:
        replica = self.replicas.get(address)
        if replica is None:
            self._changed()
            replica = self.replicas[address] = Endpoint(address,
                                                        self.transports(address))
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

    def _drop_if_drained(self, replica: Endpoint) -> None:
        if (replica.state is ReplicaState.DRAINING and replica.outstanding == 0
                and self.replicas.get(replica.address) is replica):
            del self.replicas[replica.address]
            self._changed()
            log.info("replica %s drained and dropped", replica.address)
            self._closing.append(replica)

    def _set_state(self, replica: Endpoint, state: ReplicaState, reason: str) -> None:
        old = replica.state
        if old is state:
            return
        replica.state = state
        self._changed()
        if state is ReplicaState.HEALTHY:
            replica.healthy_since = loop_time()
        for listener in self.listeners:
            listener(replica, old, reason)
        # Every state change wakes whoever waits for a slot: a replica turning healthy may
        # take the wait, one going away may leave it with nowhere to go.
        self._notify_capacity()

    # -- health -----------------------------------------------------------------------------

    def record_check(self, replica: Endpoint, passed: bool, reason: str = "",
                     models: dict[str, ModelState] | None = None,
                     certain: bool = True,
                     versions: dict[str, dict[int, int]] | None = None) -> None:
        """The result of an active health check. A failure that is not `certain` (a check
        that timed out) ejects only when the check before it failed too. `versions`: every
        version listed per model (version -> state)."""
        if versions is not None:
            for name, listed in versions.items():
                old = replica.versions.get(name)
                if old != listed:
                    self._changed()
                    replica.versions[name] = listed
                    if any(state == AVAILABLE_STATE and (old or {}).get(version) != state
                           for version, state in listed.items()):
                        self._notify_capacity()  # a version queued calls wait for arrived
            for name in list(replica.versions):
                if models is not None and models.get(name) is ModelState.MISSING:
                    del replica.versions[name]
        if models:
            became_available = any(
                state is ModelState.AVAILABLE and replica.models.get(name) is not state
                for name, state in models.items())
            if any(replica.models.get(name) is not state for name, state in models.items()):
                self._changed()
            replica.models.update(models)
            if became_available or any(state is not ModelState.AVAILABLE
                                       for state in models.values()):
                self._notify_capacity()
        now = loop_time()
        if replica.state is ReplicaState.DRAINING:
            return
        if not passed:
            replica.failed_checks += 1
            if replica.state is not ReplicaState.EJECTED and (
                    certain or replica.failed_checks >= UNCERTAIN_FAILED_CHECKS):
                self._eject(replica, reason or "health check failed")
            return
        replica.failed_checks = 0
        if replica.state is ReplicaState.EJECTED and now < replica.ejected_until:
            return  # still serving its back-off
        replica.consecutive_failures = 0
        self._set_state(replica, ReplicaState.HEALTHY, reason or "health check passed")

    def record_success(self, replica: Endpoint) -> None:
        replica.consecutive_failures = 0

    def record_failure(self, replica: Endpoint, error: ProxyError) -> None:
        """A call failed in a way that blames the replica (passive health)."""
        replica.consecutive_failures += 1
        if (replica.consecutive_failures >= self.eject_after_failures
                and replica.state is ReplicaState.HEALTHY):
            self._eject(replica, f"{replica.consecutive_failures} consecutive failures: "
                                 f"{error.code.name} {error.message}")

    def _eject(self, replica: Endpoint, reason: str) -> None:
        now = loop_time()
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

    def note_missing(self, replica: Endpoint, model: str) -> None:
        """`replica` answered NOT_FOUND for `model` before a health check asked it about the
        model: route around it now, not after the next check (which has the last word)."""
        if model in self.known_models and model not in replica.models:
            replica.models[model] = ModelState.MISSING
            self._changed()

    def note_version_gone(self, replica: Endpoint, model: str, version: int) -> None:
        """`replica` answered NOT_FOUND for `version` of `model` before a health check said
        it was gone (a roll-back): route calls for it elsewhere now."""
        versions = replica.versions.setdefault(model, {})
        if versions.get(version) == AVAILABLE_STATE or version not in versions:
            versions[version] = 0  # UNKNOWN: listed by no check, so not served
            self._changed()

    def forget_missing_models(self, keep: set[str]) -> None:
        """Stop health-checking models that every replica reports missing."""
        for model in list(self.known_models - keep):
            states = [r.models.get(model) for r in self.replicas.values()
                      if r.state is not ReplicaState.DRAINING]
            if states and all(state is ModelState.MISSING for state in states):
                self.known_models.discard(model)
                for replica in self.replicas.values():
                    replica.models.pop(model, None)
                    replica.versions.pop(model, None)
                self._changed()

    def route(self, model: str, version: int | None = None) -> Route:
        """Where calls for `model` (and `version`, when given) can go now (see Route).
        Asked on every call: cached until a replica's state, a model's state or the
        membership changes."""
        route = self._routes.get((model, version))
        if route is None:
            if len(self._routes) >= MAX_TRACKED_MODELS:
                self._changed()  # model names come from clients: keep the cache small
            route = self._compute_route(model)
            if version is not None and route is Route.SERVED and not any(
                    r.serves(model, version) for r in self.replicas.values()):
                # No replica holds that version. While one is loading it, calls wait for it
                # (within their deadlines); else one that serves the model answers with
                # TFS's own NOT_FOUND for it.
                route = Route.WAIT if any(
                    r.serves(model) and r.versions.get(model, {}).get(version)
                    in COMING_STATES for r in self.replicas.values()) else Route.MISSING
            self._routes[(model, version)] = route
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
            # A replica still joining may have it (replicas may serve different models):
            # wait for its check rather than answer NOT_FOUND from one that lacks it.
            if any(r.state is ReplicaState.JOINING
                   and r.models.get(model) is not ModelState.MISSING
                   for r in self.replicas.values()):
                return Route.WAIT
            return Route.MISSING
        return Route.NOWHERE

    def try_acquire(self, model: str, exclude: Endpoint | None = None,
                    idle_only: bool = False, version: int | None = None) -> Endpoint | None:
        """Reserve a slot on a replica serving `model` (and `version`, when given) by the
        power of two choices, or None. `idle_only`: only a replica with no batch in flight
        will do."""
        route = self.route(model, version)
        limit = 1 if idle_only else self.max_inflight
        if route is Route.SERVED:
            eligible = [r for r in self.replicas.values()
                        if r.outstanding < limit and r is not exclude
                        and r.serves(model, version)]
        elif route is Route.MISSING:
            # No replica has the model: one of them answers with TFS's own NOT_FOUND.
            eligible = [r for r in self.replicas.values()
                        if r.outstanding < limit and r is not exclude
                        and r.state is ReplicaState.HEALTHY]
        else:
            return None
        if not eligible:
            return self._no_slot(model, exclude, idle_only, version)
        if len(eligible) > 2:
            eligible = self.random.sample(eligible, 2)
        replica = min(eligible, key=lambda r: r.outstanding)
        if not self._take(replica, limit):
            return self._no_slot(model, exclude, idle_only, version)
        return replica

    def try_acquire_on(self, replica: Endpoint, model: str,
                       version: int | None = None) -> Endpoint | None:
        """Reserve a slot on `replica` itself (a policy chose it), or None if it has none
        free or no longer serves `model` (and `version`)."""
        if replica.outstanding >= self.max_inflight or not replica.serves(model, version) \
                or self.replicas.get(replica.address) is not replica:
            return None
        if not self._take(replica, self.max_inflight):
            return None
        return replica

    # One worker owns every slot: a reservation is a count on the endpoint. Workers that
    # share the fleet (fleet/shared_slots.py) keep the count in shared memory instead.

    def _take(self, replica: Endpoint, limit: int) -> bool:
        """Reserve one of `replica`'s slots, whose count the caller saw under `limit`."""
        replica.outstanding += 1
        replica.batches_sent += 1
        return True

    def _give(self, replica: Endpoint) -> None:
        replica.outstanding -= 1

    def _no_slot(self, model: str, exclude: Endpoint | None,
                 idle_only: bool, version: int | None = None) -> Endpoint | None:
        """try_acquire found every slot taken: a freed one notifies capacity listeners."""
        return None

    def note_planned(self, replica: Endpoint, model: str, rows: int) -> None:
        """The scheduler took a batch of `rows` rows for `replica` (its slot held): the
        replica's expected free time moves past it at once. The batch is sent from a task
        of its own, a turn of the loop later, and the scheduler's next decision in the same
        pass must not see the replica as free now: it would queue a second batch behind
        the first there instead of on the replica that frees next."""
        replica.free_at = max(loop_time(), replica.free_at) + _occupies_s(replica, model, rows)

    def note_sent(self, replica: Endpoint, model: str, rows: int,
                  planned: bool = False) -> int:
        """A batch of `rows` rows leaves for `replica` now (its slot already held). Returns
        how many other batches it holds (what the batch's time is learned against), and
        moves the replica's expected free time past this batch; `planned`: note_planned()
        already did, and the time moves on only if the send came later than planned."""
        now = loop_time()
        beside = replica.outstanding - 1
        alone = _occupies_s(replica, model, rows)
        if planned:
            replica.free_at = max(replica.free_at, now + alone)
            self.turn.sending(now)
        else:
            replica.free_at = max(now, replica.free_at) + alone
        return beside

    def note_answered(self, replica: Endpoint, model: str, rows: int,
                      seconds: float | None, beside: int,
                      expected_at: float | None = None) -> None:
        """A batch sent with note_sent() was answered after `seconds` (None: it failed),
        its slot still held: the cost model learns, and a replica left with nothing is free
        now. `expected_at`: when it was expected to answer (its free time as sent); the
        batches sent to wait behind it start now, so their expected free time moves by as
        much as this answer was early or late."""
        if seconds is not None:
            replica.answered_at = loop_time()
            self.turn.answered(replica.answered_at)
            cost = replica.cost(model)
            if cost.first_seen:
                cost.observe(rows, seconds, beside)
            else:
                # The first batch's time is not learned: a model's first run on a replica
                # pays for lazy set-up (why TFS has warm-up files; 10 ms against the 2 ms
                # of every later batch was seen), and a policy judging the replica by it
                # would keep it idle.
                cost.first_seen = True
            cost.timed_at = loop_time()
        if replica.outstanding <= 1:
            replica.free_at = loop_time()
        elif seconds is not None and expected_at is not None:
            now = loop_time()
            replica.free_at = max(now, replica.free_at + (now - expected_at))

    def lacks(self, replica: Endpoint, model: str, exclude: Endpoint | None = None,
              skip: Collection[Endpoint] = (), version: int | None = None) -> bool:
        """`replica` answered NOT_FOUND for `model`: marked as lacking it (note_missing).
        Returns whether another replica (not `exclude`, not in `skip`) may still have it,
        so the call is worth sending on: fleets may serve different models, and each
        replica is asked once."""
        self.note_missing(replica, model)
        return self.can_serve(model, exclude=exclude, skip=(*skip, replica), version=version)

    def can_serve(self, model: str, exclude: Endpoint | None = None,
                  skip: Collection[Endpoint] = (), version: int | None = None) -> bool:
        """Whether a replica other than `exclude` (and those in `skip`) could take `model` now
        or soon (healthy and serving it, or joining and not yet checked): what makes a retry
        worth waiting for."""
        for replica in self.replicas.values():
            if replica is exclude or replica in skip:
                continue
            if replica.serves(model, version):
                return True
            if replica.state is ReplicaState.JOINING:
                return True
        return False

    async def acquire(self, model: str, exclude: Endpoint | None = None,
                      timeout: float | None = None,
                      version: int | None = None) -> Endpoint:
        """Wait for a slot on a replica serving `model`. Gives up with UNAVAILABLE as soon as
        no replica but `exclude` could serve it, and with DEADLINE_EXCEEDED after `timeout`
        (the pool's default replica timeout when None: no wait is unbounded)."""
        loop = asyncio.get_running_loop()
        if timeout is None:
            timeout = self.default_timeout_s
        deadline = loop.time() + timeout
        while True:
            replica = self.try_acquire(model, exclude, version=version)
            if replica is not None:
                return replica
            route = self.route(model, version)
            if route is Route.NOWHERE or not (
                    route is Route.MISSING or self.can_serve(model, exclude, version=version)):
                raise ProxyError(grpc.StatusCode.UNAVAILABLE,
                                 f"no healthy replica serves model '{model}'")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ProxyError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 "Deadline exceeded while waiting for a replica")
            waiter = loop.create_future()
            self._waiters.append(waiter)
            timer = loop.call_at(deadline, _wake_waiter, waiter)
            try:
                await waiter
            finally:
                timer.cancel()

    def capacity_changed(self) -> asyncio.Future[None]:
        """A future done at the next state change or freed slot: for a wait that may end
        another way too (a hedge waits for a slot only while its batch is unanswered)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    async def hold_slot(self, replica: Endpoint) -> None:
        """Wait for, and reserve, a slot on `replica` whatever its routing state: warm-up
        calls count against `--max_inflight_per_replica` as batches do. Freed by
        release()."""
        while replica.outstanding >= self.max_inflight \
                or not self._take(replica, self.max_inflight):
            changed = self.capacity_changed()
            self._wait_elsewhere()
            await changed

    def _wait_elsewhere(self) -> None:
        """A wait for a slot begins: workers sharing slots ask to be woken by the others."""

    def release(self, replica: Endpoint) -> None:
        self._give(replica)
        self._drop_if_drained(replica)
        self._notify_capacity()

    def _notify_capacity(self) -> None:
        for listener in self.capacity_listeners:
            listener()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            _wake_waiter(waiter)

    def any_healthy(self) -> bool:
        return any(r.state is ReplicaState.HEALTHY for r in self.replicas.values())

    def pick_unbatched(self, model: str, exclude: Endpoint | None = None,
                       skip: Collection[Endpoint] = (),
                       version: int | None = None) -> Endpoint | None:
        """A replica for an unbatched call (metadata, status, classify, ...): the least busy
        healthy one that serves `model` (any healthy one when the model is not known). These
        calls take no batch slot: they are small and must not wait behind batches. `skip`:
        replicas that already answered this call NOT_FOUND. `version`: prefer replicas where
        that version is AVAILABLE (a label the proxy resolved)."""
        by_model = bool(model) and self.route(model) is Route.SERVED
        candidates = [r for r in self.replicas.values()
                      if r is not exclude and r not in skip
                      and (r.serves(model) if by_model else r.state is ReplicaState.HEALTHY)]
        if version is not None and by_model:
            candidates = [r for r in candidates if r.serves(model, version)] or candidates
        if not candidates:
            candidates = [r for r in self.replicas.values()
                          if r.state is not ReplicaState.DRAINING and r is not exclude
                          and r not in skip]
        if not candidates:
            return None
        return min(candidates, key=lambda r: r.outstanding)

    # -- calls ------------------------------------------------------------------------------

    def timeout_for(self, timeout: float | None) -> float:
        return self.default_timeout_s if timeout is None else timeout

    async def call(self, replica: Endpoint, path: str, request: bytes,
                   timeout: float | None) -> bytes:
        """One call to `replica`, its failure recorded against the replica when it is the
        replica's fault (passive health)."""
        try:
            response = await replica.transport.call(path, request, self.timeout_for(timeout))
        except ProxyError as error:
            if is_replica_failure(error):
                self.record_failure(replica, error)
            raise
        self.record_success(replica)
        return response

    def predict(self, replica: Endpoint, request: bytes,
                timeout: float | None) -> Coroutine[Any, Any, bytes]:
        """One merged batch to `replica`; the caller holds a slot from acquire(). The call's
        own coroutine, for the caller to await (or run as a task)."""
        return self.call(replica, PREDICT, request, timeout)

    async def close(self) -> None:
        replicas = list(self.replicas.values()) + self._closing
        await asyncio.gather(*(replica.transport.close() for replica in replicas))

    async def close_dropped(self) -> None:
        """Close transports of replicas that drained; called by the health loop."""
        closing, self._closing = self._closing, []
        await asyncio.gather(*(replica.transport.close() for replica in closing))


def _wake_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _occupies_s(replica: Endpoint, model: str, rows: int) -> float:
    """How far a batch of `rows` rows moves `replica`'s expected free time: its expected
    time, shared among the batches the replica runs at once."""
    cost = replica.cost(model)
    return cost.predict(rows) / cost.concurrency
