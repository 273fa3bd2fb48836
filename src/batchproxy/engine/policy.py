"""Flush policies: the one place that decides when a queue's rows leave, and for which kind
of replica slot. The scheduler asks; it never decides itself. A new policy is a new class
that implements `FlushPolicy`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from batchproxy.config import BatchingConfig
from batchproxy.engine.queues import KeyQueue
from batchproxy.fleet.costs import CostModel
from batchproxy.fleet.slots import Endpoint, ReplicaPool


@dataclass(frozen=True, slots=True)
class Flush:
    """Send a batch now. `idle_only`: only a replica with no batch in flight will do;
    `replica`: the policy chose this one (else the fleet chooses)."""

    idle_only: bool
    replica: Endpoint | None = None
    # Sent to a replica still busy at its concurrency, which frees within the lead: the
    # batch waits there behind the one it runs (engine/dispatcher.py times it from that
    # one's answer).
    behind: bool = False


@dataclass(frozen=True, slots=True)
class Hold:
    """Keep filling; ask again at `until` (loop time), or when woken."""

    until: float


FLUSH_TO_ANY = Flush(idle_only=False)
FLUSH_TO_IDLE = Flush(idle_only=True)


class FlushPolicy(Protocol):
    name: str

    def decide(self, queue: KeyQueue, now: float) -> Flush | Hold:
        """What to do with a non-empty queue now."""
        ...

    def wake_on_submit(self, queue: KeyQueue, rows_before: int) -> bool:
        """Whether rows just added to `queue` (it held `rows_before`) can change a
        decision, so the scheduler must look again before its next due time."""
        ...

    def on_dispatch(self, queue: KeyQueue, replica: Endpoint, rows: int, now: float) -> None:
        """A batch of `rows` rows of `queue` left for `replica`."""
        ...

    def answer_by(self, replica: Endpoint, model: str, rows: int, now: float) -> float | None:
        """The earliest time `replica` can be expected to answer a batch of `rows` rows of
        `model` that starts now; a call whose deadline falls before it is refused at once
        rather than sent to be late. None: the policy does not judge deadlines."""
        ...

    def parallel_batches(self, replica: Endpoint, model: str, limit: int) -> int:
        """How many batches of `model` the policy keeps in flight on `replica` at once
        (`limit`: the replica's slots): what the admission's wait estimate divides the
        batches ahead by."""
        ...


class FixedTimeoutPolicy:
    """TFS's rule, as TensorFlow's shared batch scheduler applies it: a full batch leaves at
    once for any replica slot; a partial batch leaves once its oldest call has waited
    `batch_timeout_micros`, and then only for a replica with nothing in flight. While every
    replica is busy the partial batch keeps filling here (a GPU runs one batch at a time, and
    what waits at a replica is frozen at the size it had when sent), so batches grow with
    load. Rows left over after a full batch are due at their own oldest call's time."""

    name = "fixed"

    def __init__(self, config: BatchingConfig) -> None:
        self.full = config.max_batch_size
        self.timeout_s = config.batch_timeout_s

    def decide(self, queue: KeyQueue, now: float) -> Flush | Hold:
        full = queue.full or self.full
        if queue.critical_rows >= full:
            return FLUSH_TO_ANY
        if queue.rows >= full:
            # Full only with sheddable rows: it waits for an idle replica, so that it takes
            # no room that critical calls arriving meanwhile would need (queued behind a
            # busy replica's batch, its rows would be fixed a whole batch time early).
            return FLUSH_TO_IDLE
        head = queue.head()
        timeout_s = self.timeout_s if queue.timeout_s is None else queue.timeout_s
        due = now if head is None else head.enqueued_at + timeout_s
        if due <= now:
            return FLUSH_TO_IDLE
        return Hold(due)

    def wake_on_submit(self, queue: KeyQueue, rows_before: int) -> bool:
        # A new head has a due time the scheduler has not seen; a queue that just became
        # full leaves at once. Anything else changes nothing until the due time.
        return rows_before == 0 or rows_before < (queue.full or self.full) <= queue.rows

    def on_dispatch(self, queue: KeyQueue, replica: Endpoint, rows: int, now: float) -> None:
        pass

    def answer_by(self, replica: Endpoint, model: str, rows: int, now: float) -> float | None:
        return None  # TFS sends every call it took, however late it will be

    def parallel_batches(self, replica: Endpoint, model: str, limit: int) -> int:
        # Every slot takes a batch; one queued at a busy replica is timed with its wait there.
        return limit


class AdaptivePolicy:
    """Plans with the fleet's learned costs (fleet/costs.py) instead of a fixed timeout.

    - **Finish-time routing:** a batch goes to the replica expected to finish it first: one
      that can start it now, or a busy one that frees early enough to still win. A slow
      replica gets work only when it would finish no later than a faster one.
    - **Staggered, just-in-time dispatch:** batch starts for one model are spaced about one
      expected batch time divided by the replicas serving it, so every arrival meets a
      replica that is about to start, and while they are all busy the batch keeps filling
      here and leaves the moment the chosen replica can start it.
    - A full batch leaves at once for its replica; no call waits for a start longer than
      `max(batch_timeout_micros, spacing)`.

    Routes the fleet cannot plan for (no replica known to serve the model yet) fall back to
    the fixed rule."""

    name = "adaptive"

    def __init__(self, config: BatchingConfig, pool: ReplicaPool) -> None:
        self.full = config.max_batch_size
        self.timeout_s = config.batch_timeout_s
        self.pool = pool
        self.fallback = FixedTimeoutPolicy(config)
        self._last_start: dict[str, float] = {}
        self._mean_rows: dict[str, float] = {}

    def decide(self, queue: KeyQueue, now: float) -> Flush | Hold:
        model = queue.model
        limit = self.pool.max_inflight
        full = queue.full or self.full
        is_full = queue.rows >= full
        # When each replica serving the model could start a batch, and what it costs there.
        starts: list[tuple[float, Endpoint, CostModel, bool]] = []
        candidates, weight = self._candidates(model, queue.version)
        cold = False
        for replica in candidates:
            cost = replica.cost(model)
            level = min(cost.concurrency, limit)
            cold = cold or not cost.batches
            if replica.outstanding < level:
                starts.append((now, replica, cost, True))
                continue
            # A busy replica past its expected free time is late by an unknown amount: it
            # never ties with one that can start now, and gets no batch ahead. One that
            # frees within the lead takes its next batch now, behind the one it runs, so
            # that neither the proxy's own turn between its answer and the next send nor the
            # trip there leaves it idle.
            start = max(now + LATE_S, replica.free_at)
            ready = (replica.outstanding == level < limit and cost.warm
                     and now < replica.free_at <= now + self._lead_s(replica, cost, is_full))
            starts.append((start, replica, cost, ready))
        if not starts:
            return self.fallback.decide(queue, now)
        if cold:
            starts = self._judged_by_peers(starts)
        first, planned = self._plan(queue.rows, starts, full)
        _, best, best_cost, best_ready = first
        mean_rows = self._mean_rows.get(model, queue.rows)
        backlog = queue.rows >= full or queue.rows >= BACKLOG_ROWS * mean_rows
        if not best_ready:
            idle = [entry for entry in planned if entry[3]]
            if idle:
                # The queue holds more than the replica finishing first can take: a replica
                # free now has a batch in the plan, so it starts the oldest rows at once.
                return send_to(idle[0], now)
            head = queue.head()
            if backlog and head is not None and now - head.enqueued_at >= \
                    best_cost.predict(full):
                # Rows back up for longer than a whole batch takes: the fleet is short of
                # capacity at the concurrency it is known to have. Try for more.
                probe = self._probe(starts, limit, model)
                if probe is not None:
                    return Flush(idle_only=False, replica=probe)
            # Woken when a slot frees, or when the replica is within the lead of freeing
            # (a slot to spare and a warm fit); the time is also a backstop for a late
            # estimate.
            if best.free_at <= now:
                return Hold(now + IDLE_RECHECK_S)
            own = best.cost(model)  # best_cost may be a peer's, standing in
            if best.outstanding < limit and own.warm:
                lead = self._lead_s(best, own, is_full)
                return Hold(max(best.free_at - lead, now + LATE_S))
            return Hold(best.free_at)
        if backlog:
            # Full, or already well past the usual batch: the load outruns the plan (costs
            # above their estimate, a burst), and holding a free replica idle would only
            # add to the queue.
            return send_to(first, now)
        typical = round(mean_rows)
        batch_s = best_cost.predict(typical)
        spacing = batch_s / max(self._parallel(starts, typical, batch_s) * weight, 1.0)
        head = queue.head()
        waited_since = now if head is None else head.enqueued_at
        timeout_s = self.timeout_s if queue.timeout_s is None else queue.timeout_s
        latest = waited_since + max(timeout_s, spacing)
        start_at = self._last_start.get(model, -math.inf) + spacing
        if now >= start_at or now >= latest:
            return send_to(first, now)
        return Hold(min(start_at, latest))

    def _lead_s(self, replica: Endpoint, cost: CostModel, is_full: bool) -> float:
        """How long before `replica` is expected to free a batch may leave to wait there.
        Only a full batch leaves ahead: it can gather no more rows, so sending it early
        costs it nothing. A partial one would close with fewer rows, where the turn it waits
        through also gathers more (what open loops see)."""
        if not is_full:
            return 0.0
        return lead_s(cost, self.pool.turn.seconds, replica.trip_s)

    def _candidates(self, model: str, version: int | None = None
                    ) -> tuple[list[Endpoint], float]:
        """The replicas serving `model` that a decision weighs, and how many replicas each
        stands for. A fleet too large to scan on every decision is sampled: power of two
        choices (here, of SAMPLED_REPLICAS), by expected finish time instead of by load,
        and the spacing counts each sampled replica for its share of the fleet."""
        serving = [r for r in self.pool.replicas.values() if r.serves(model, version)]
        if len(serving) <= SCAN_LIMIT:
            return serving, 1.0
        # Drawn apart from the idle and the busy ones, so that a decision never holds rows
        # for a busy replica while idle ones exist, nor misses a busy one about to free.
        idle = [r for r in serving if not r.outstanding]
        busy = [r for r in serving if r.outstanding]
        draw = self.pool.random.sample
        sample = (draw(idle, min(SAMPLED_REPLICAS, len(idle)))
                  + draw(busy, min(SAMPLED_REPLICAS, len(busy))))
        return sample, len(serving) / len(sample)

    @staticmethod
    def _probe(starts: list[tuple[float, Endpoint, CostModel, bool]], limit: int,
               model: str) -> Endpoint | None:
        """While rows back up with every replica busy at its known concurrency: a replica
        with a slot free where one more batch beside the others would test a concurrency
        not yet judged (a GPU may run several batches at once). A few such batches tell;
        a replica that slows down beside another is not probed again."""
        for _, replica, _, _ in starts:
            outstanding = replica.outstanding
            if outstanding < limit and replica.cost(model).untried_beside(outstanding):
                return replica
        return None

    @staticmethod
    def _judged_by_peers(starts: list[tuple[float, Endpoint, CostModel, bool]]
                         ) -> list[tuple[float, Endpoint, CostModel, bool]]:
        """A replica no batch has timed yet is planned at its fastest warm peer's cost
        rather than the prior's guess: a prior slower than the fleet would keep it idle for
        good (it would never finish first, so it would never be timed), and one faster
        would flood it. From its first batch on, its own times judge it."""
        warm = [cost for _, _, cost, _ in starts if cost.warm]
        if not warm:
            return starts
        fastest = min(warm, key=lambda cost: cost.predict(1))
        return [entry if entry[2].batches else (entry[0], entry[1], fastest, entry[3])
                for entry in starts]

    @staticmethod
    def _parallel(starts: list[tuple[float, Endpoint, CostModel, bool]], rows: int,
                  batch_s: float) -> float:
        """How many replicas' worth of batches the fleet runs at once, a replica counted by
        its speed against the fastest: the divisor of the spacing between batch starts. A
        replica more than twice as slow counts for nothing: the plan gives it work only from
        a backlog, and counting it would space the fast replicas' starts too tightly."""
        total = 0.0
        for _, _, cost, _ in starts:
            share = batch_s / max(cost.predict(rows), 1e-9)
            if share >= SLOW_SHARE:
                total += min(share, 1.0) * cost.concurrency
        return total

    def _plan(self, rows: int, starts: list[tuple[float, Endpoint, CostModel, bool]],
              full: int) -> tuple[tuple[float, Endpoint, CostModel, bool],
                         list[tuple[float, Endpoint, CostModel, bool]]]:
        """Place the queue's rows, a batch at a time, each on the replica that would finish
        it first (list scheduling). Returns the first batch's replica and every replica the
        plan gives a batch to. With a backlog, a slower replica earns a later batch when
        it would finish it before the faster ones could get to it."""
        batches = min(max(1, -(-rows // full)), MAX_PLANNED_BATCHES)
        if batches == 1:  # the usual case, asked on every decision: no plan to build
            best = starts[soonest(starts, rows)[0]]
            return best, [best]
        free = list(starts)
        used: dict[int, None] = {}  # indexes into `starts`, in the order first picked
        for index in range(batches):
            pick, finish = soonest(free, min(full, rows - index * full))
            used.setdefault(pick)
            _, replica, cost, _ = free[pick]
            free[pick] = (finish, replica, cost, False)
        picks = [starts[index] for index in used]
        return picks[0], picks

    def wake_on_submit(self, queue: KeyQueue, rows_before: int) -> bool:
        return rows_before == 0 or rows_before < (queue.full or self.full) <= queue.rows

    def on_dispatch(self, queue: KeyQueue, replica: Endpoint, rows: int, now: float) -> None:
        model = queue.model
        # A batch sent to wait behind another starts when its replica frees: the spacing
        # runs from then, or the next batch would be spaced from a start that never was.
        self._last_start[model] = max(now, replica.free_at)
        mean = self._mean_rows.get(model)
        self._mean_rows[model] = rows if mean is None else mean + ROWS_EWMA * (rows - mean)

    def answer_by(self, replica: Endpoint, model: str, rows: int, now: float) -> float | None:
        cost = replica.cost(model)
        if not cost.warm:
            return None  # a guess from the prior must not refuse anyone
        # The batch starts now on a replica the plan found ready; a margin under the
        # expected time, so that only calls that would surely be late are refused.
        return now + DEADLINE_MARGIN * cost.predict(rows)

    def parallel_batches(self, replica: Endpoint, model: str, limit: int) -> int:
        # A batch leaves only for a replica that can start it (`decide`), so only the
        # batches it runs at once are in flight, each timed without a wait there.
        return min(replica.cost(model).concurrency, limit)


# Fleets up to this many replicas serving a model are scanned whole on every decision;
# larger ones are sampled, SAMPLED_REPLICAS idle and as many busy ones at a time.
SCAN_LIMIT = 64
SAMPLED_REPLICAS = 2
# A queue holding this many times the usual batch's rows leaves at once for a free replica.
BACKLOG_ROWS = 1.5
# A replica slower than this share of the fastest's speed does not set the spacing.
SLOW_SHARE = 0.5
# Batches of a backlog planned ahead when choosing where the oldest rows go.
MAX_PLANNED_BATCHES = 64
# What a busy replica past its expected free time is assumed to still need.
LATE_S = 0.001
# How long before a busy replica is expected to free its next batch may leave, to wait
# there behind the one it runs: this many times the proxy's own turn (fleet/turn.py) and the
# replica's round trip together, at most this share of a batch's time.
TURN_MARGIN = 1.5
PIPELINE_SHARE = 0.25
# A backstop for a replica whose batch runs past its expected time: look again this often.
IDLE_RECHECK_S = 0.05
# Weight of each new batch in the mean batch size that sets the spacing.
ROWS_EWMA = 0.1
# A call is refused before it is sent when its deadline falls before this share of the
# batch's expected time at its replica: an answer it would surely miss.
DEADLINE_MARGIN = 0.9

POLICIES = ("fixed", "adaptive")


def send_to(entry: tuple[float, Endpoint, CostModel, bool], now: float) -> Flush:
    """Send the batch to the replica of a plan's entry; one that starts later than now
    takes it to wait behind the batch it runs."""
    start, replica, _, _ = entry
    return Flush(idle_only=False, replica=replica, behind=start > now)


def soonest(entries: list[tuple[float, Endpoint, CostModel, bool]], rows: int
            ) -> tuple[int, float]:
    """Which entry would finish a batch of `rows` rows first, the first of equals, and when:
    (index, finish time)."""
    pick, finish = 0, entries[0][0] + entries[0][2].predict(rows)
    for index in range(1, len(entries)):
        end = entries[index][0] + entries[index][2].predict(rows)
        if end < finish:
            pick, finish = index, end
    return pick, finish


def lead_s(cost: CostModel, turn_s: float, trip_s: float) -> float:
    """How long before a replica is expected to free a batch may be sent to wait there: a
    margin over what would otherwise leave the replica idle, the proxy's own turn between an
    answer and the next send and the replica's round trip (`trip_s`: the batch on its way
    there, the answer before it on its way back, which the expected free time counts as the
    replica's), but never so much of a batch's time that the early batch closes with far
    fewer rows. No lead where neither costs anything (virtual time, no distance)."""
    return min(TURN_MARGIN * (turn_s + trip_s), PIPELINE_SHARE * cost.predict(1))


def make_policy(name: str, config: BatchingConfig, pool: ReplicaPool) -> FlushPolicy:
    if name == FixedTimeoutPolicy.name:
        return FixedTimeoutPolicy(config)
    if name == AdaptivePolicy.name:
        return AdaptivePolicy(config, pool)
    raise ValueError(f"unknown batching policy {name!r}; known: {', '.join(POLICIES)}")
