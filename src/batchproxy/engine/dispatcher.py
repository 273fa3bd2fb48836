"""The dispatcher: sends a batch to its replica, retries a replica failure elsewhere (the one
retry policy, which forwarded calls use too), bisects a batch the replica refused for its
content, then splits the answer and delivers each caller's rows. A batch overdue on its
replica is hedged on another (hedging.py).

A call never fails because of another call's deadline: a batch waits for its answer as long
as its most patient caller would; a caller whose own deadline passes is answered by its
timer (scheduler.py) while the batch goes on for the rest."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from batchproxy import codec
from batchproxy.engine.admission import Admission
from batchproxy.engine.hedging import Hedger, HedgeWin
from batchproxy.engine.queues import Batch, Entry
from batchproxy.engine.retry import RetryPolicy
from batchproxy.engine.shadow import Shadower
from batchproxy.errors import ProxyError
from batchproxy.fleet.slots import Endpoint, ModelState, ReplicaPool
from batchproxy.fleet.versions import VersionRouter, version_override
from batchproxy.metrics import ProxyMetrics
from batchproxy.protos import model_spec_holder_pb2

log = logging.getLogger(__name__)

# A replica refusing a merged batch's content may be refusing just one call in it.
POISON_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT,
                          grpc.StatusCode.FAILED_PRECONDITION})


def bisect_budget(calls: int) -> int:
    """Extra replica calls a batch of `calls` calls may cost while bisecting: enough to
    isolate two bad calls among good ones (each costs about two calls per level, and a
    resend of what is left after a probe), while a batch whose calls fail each in its own
    way never costs 2n - 1 calls. Uniformly bad batches stop far earlier (see _bisect)."""
    return 6 * max(1, math.ceil(math.log2(calls)))


# Times a batch may be sent on after replicas answer NOT_FOUND for its version (a version
# rolled back before a health check said so): enough for a fleet that changes under it.
MAX_VERSION_MOVES = 8
# How often a `latest` batch with no version to go to looks at the fleet again.
VERSION_WAIT_S = 0.05

# Below this a caller's remaining time counts as spent (timers and replies race by this much).
SPENT_S = 1e-3

SHUTTING_DOWN = ProxyError(grpc.StatusCode.UNAVAILABLE, "batchproxy is shutting down")


def same_failure(a: ProxyError, b: ProxyError) -> bool:
    return a.code is b.code and a.message == b.message


class Dispatcher:
    def __init__(self, pool: ReplicaPool, admission: Admission, metrics: ProxyMetrics,
                 abandon: Callable[[Entry], None], retry: RetryPolicy | None = None,
                 hedge_percent: float = 0.0,
                 versions: VersionRouter | None = None) -> None:
        self.pool = pool
        self.admission = admission
        self.metrics = metrics
        self.abandon = abandon
        self.retry = retry or RetryPolicy()
        self.hedger = Hedger(pool, admission, metrics, hedge_percent)
        self.versions = versions
        self.shadow = Shadower(pool, metrics, versions) if versions is not None else None
        self.sending: set[asyncio.Task[None]] = set()

    # -- batches ---------------------------------------------------------------------------

    def dispatch(self, replica: Endpoint, batch: Batch) -> None:
        """Send `batch` on the slot the scheduler reserved on `replica`."""
        self._spawn(self._run(replica, batch))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def _run(self, replica: Endpoint, batch: Batch) -> None:
        try:
            error, batch = await self._attempt(batch, replica)
            if error is None:
                return
            await self._bisect(batch, error, [bisect_budget(len(batch.pieces))])
        except asyncio.CancelledError:
            self._fail(batch, SHUTTING_DOWN)
            raise
        except Exception:  # a bug must not leave callers waiting or a slot taken
            log.exception("a batch for model '%s' failed inside the proxy", batch.model)
            self._fail(batch, ProxyError(grpc.StatusCode.INTERNAL,
                                         "batchproxy failed while sending the batch"))

    async def _attempt(self, batch: Batch,
                       replica: Endpoint | None) -> tuple[ProxyError | None, Batch]:
        """Send `batch` (on `replica`'s reserved slot, or on one acquired here) and deliver
        its answer; a replica failure is retried per the retry policy. Returns the error the
        batch's callers are still owed, with the batch as last sent."""
        loop = asyncio.get_running_loop()
        pool = self.pool
        held = replica
        # A slot the scheduler reserved: it moved the replica's expected free time when it
        # took the batch (ReplicaPool.note_planned), for the first send only.
        planned = replica is not None
        failed: Endpoint | None = None
        retries = 0
        moves = 0
        try:
            while True:
                if not batch.waiting():
                    return None, batch
                patience = batch.patience(loop.time(), pool.default_timeout_s)
                if held is None:
                    try:
                        held = await pool.acquire(batch.model, exclude=failed,
                                                  timeout=patience, version=batch.version)
                    except ProxyError as err:
                        return err, batch
                    patience = batch.patience(loop.time(), pool.default_timeout_s)
                sent_at = loop.time()
                self.metrics.observe_batch(held.address, batch.rows, len(batch.pieces),
                                           batch.padding)
                beside = pool.note_sent(held, batch.model, batch.sent_rows, planned=planned)
                expected_at = held.free_at  # when this batch is expected to answer
                planned = False
                try:
                    response = await self.hedger.predict(held, batch, patience, beside)
                except ProxyError as err:
                    used, held = held, None
                    pool.note_answered(used, batch.model, batch.sent_rows, None, beside)
                    pool.release(used)
                    # Someone can still wait: the timeout was the proxy's, not a caller's.
                    ours = batch.patience(loop.time(), pool.default_timeout_s) > SPENT_S
                    timed_out = err.code is grpc.StatusCode.DEADLINE_EXCEEDED and ours
                    if timed_out:
                        pool.record_failure(used, err)  # a hung replica is ejected too
                    if (err.code is grpc.StatusCode.NOT_FOUND and batch.version is not None
                            and moves < MAX_VERSION_MOVES
                            and batch.model in used.versions):
                        moved = await self._move_version(used, batch)
                        if moved is not None:
                            moves += 1
                            # Routed around for the version it refused only: moved to
                            # another version, the batch may go back to it.
                            failed = used if moved.version == batch.version else None
                            batch = moved
                            continue
                    if (err.code is grpc.StatusCode.NOT_FOUND
                            and used.models.get(batch.model, ModelState.MISSING)
                            is ModelState.MISSING
                            and batch.model in pool.known_models  # so the mark holds
                            and pool.lacks(used, batch.model)):
                        # The replica lacks a model no health check had asked it about
                        # when the batch left (fleets may serve different models; a check
                        # may have found it missing since): send the batch to one that may
                        # have it. Each replica is asked once, as the mark holds.
                        failed = used
                        batch = batch.without_answered()
                        continue
                    if (self.retry.should_retry(err, retries, timed_out)
                            and pool.can_serve(batch.model, exclude=used,
                                               version=batch.version)):
                        retries += 1
                        failed = used
                        self.metrics.retries.inc()
                        batch = batch.without_answered()
                        continue
                    if timed_out:
                        err = ProxyError(grpc.StatusCode.UNAVAILABLE,
                                         f"replica {used.address} did not answer within "
                                         f"{patience:.3f}s")
                    return err, batch
                if isinstance(response, HedgeWin):
                    # Another replica answered first; this one's call was cancelled.
                    pool.note_answered(held, batch.model, batch.sent_rows, None, beside)
                    pool.release(held)
                    held = None
                    self._deliver(response.batch, response.response, response.address)
                    return None, batch
                took = loop.time() - sent_at
                alone = beside
                if batch.behind:
                    # One sent to wait behind another ran beside one batch fewer than were
                    # there when it left, and began its own run when that one's answer came:
                    # timed from its send, the wait would teach the fit a slower replica,
                    # and the next batch would leave that much later, undoing the lead.
                    alone = max(beside - 1, 0)
                    took = loop.time() - max(sent_at, held.answered_at)
                self.admission.note_service_time(took)
                pool.note_answered(held, batch.model, batch.sent_rows, took, alone,
                                   expected_at)
                address = held.address
                pool.release(held)
                held = None
                self._deliver(batch, response, address)
                if self.shadow is not None:
                    self.shadow.maybe_copy(batch, response)
                return None, batch
        finally:
            if held is not None:
                if planned:  # never sent: the replica is not busy with it after all
                    pool.note_answered(held, batch.model, batch.sent_rows, None, 0)
                pool.release(held)

    async def _move_version(self, used: Endpoint, batch: Batch) -> Batch | None:
        """`used` answered NOT_FOUND for the batch's version, which it listed before (a
        version removed since the last health check): it is routed around for that version,
        and the batch goes on, to another replica that holds it, or, for `latest` calls, to
        the version the policy picks now. While a roll-back leaves nothing to serve a
        `latest` batch (the old version still loading again), it waits for the fleet to
        change, within its callers' patience: an accepted call is not failed for a moment's
        gap. None: nowhere to go; the callers get the replica's answer."""
        assert batch.version is not None
        pool = self.pool
        pool.note_version_gone(used, batch.model, batch.version)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + batch.patience(loop.time(), pool.default_timeout_s)
        while True:
            if batch.latest and self.versions is not None:
                version = self.versions.resolve_latest(batch.model)
                if (version is not None and version != batch.version
                        and pool.can_serve(batch.model, version=version)):
                    return batch.without_answered().for_version(version)
                if version == batch.version and \
                        self.versions.holds(batch.model, version) == "absent":
                    return None  # pinned to a version the fleet dropped: nothing to wait for
            if pool.can_serve(batch.model, exclude=used, version=batch.version):
                return batch.without_answered()
            remaining = deadline - loop.time()
            if not batch.latest or remaining <= SPENT_S or not batch.waiting():
                return None
            await asyncio.wait((pool.capacity_changed(),),
                               timeout=min(remaining, VERSION_WAIT_S))

    async def _resolve(self, batch: Batch, error: ProxyError, budget: list[int]) -> None:
        """Send `batch` on a slot of its own and, if it is refused for its content, bisect.
        With no budget left it fails with `error`, what the batch it came from was told."""
        if not batch.pieces:
            return
        if budget[0] < 1:
            self._fail(batch, error)
            return
        budget[0] -= 1
        refused, batch = await self._attempt(batch, None)
        if refused is not None:
            await self._bisect(batch, refused, budget)

    async def _bisect(self, batch: Batch, error: ProxyError, budget: list[int]) -> None:
        """One call may have poisoned the batch: send each half on its own, recursively, so
        that only the offending calls fail and the others get their answers.

        When both halves fail alike, the batch may be uniformly bad (a client sending the
        same bad input 32 times must not cost 63 replica calls): one call of each half is
        probed alone, and if both fail alike too, every call gets that error. Otherwise the
        probes were answered and the rest of each half is resolved anew. The budget bounds
        the extra calls whatever the replica answers."""
        if (error.code not in POISON_CODES or len(batch.pieces) < 2 or budget[0] < 2
                or not batch.waiting()):
            self._fail(batch, error)
            return
        budget[0] -= 2
        left, right = batch.halves()
        (left_error, left), (right_error, right) = await asyncio.gather(
            self._attempt(left, None), self._attempt(right, None))
        if (left_error and right_error and same_failure(left_error, right_error)
                and len(left.pieces) > 1 and len(right.pieces) > 1 and budget[0] >= 2):
            if await self._uniformly_bad(left, right, left_error, budget):
                return
            await asyncio.gather(self._resolve(left.rest(), left_error, budget),
                                 self._resolve(right.rest(), right_error, budget))
            return
        await asyncio.gather(*(self._bisect(half, half_error, budget)
                               for half, half_error in ((left, left_error),
                                                        (right, right_error))
                               if half_error is not None))

    async def _uniformly_bad(self, left: Batch, right: Batch, error: ProxyError,
                             budget: list[int]) -> bool:
        """Probe the first call of each half alone. True (and every call failed with
        `error`) when both fail the same way; else the probes are answered or failed on
        their own, and the caller resolves the rest."""
        budget[0] -= 2
        probes = [left.first(), right.first()]
        results = await asyncio.gather(*(self._attempt(probe, None) for probe in probes))
        if all(probe_error is not None and same_failure(probe_error, error)
               for probe_error, _ in results):
            self._fail(left, error)
            self._fail(right, error)
            return True
        for probe_error, probe in results:
            if probe_error is not None:
                self._fail(probe, probe_error)
        return False

    def _deliver(self, batch: Batch, response: bytes, address: str) -> None:
        try:
            # The padding rows' part, if any, is the last one: cut off, never delivered.
            parts = codec.split_predict_response(response, batch.answer_rows())
        except codec.CodecError as err:
            error = ProxyError.from_codec_error(err)
            log.warning("replica %s answered a batch that cannot be split: %s",
                        address, error.message)
            self._fail(batch, error)
            return
        lengths = batch.lengths
        for (entry, start, stop), part in zip(batch.pieces, parts[:len(batch.pieces)],
                                              strict=True):
            if lengths is not None:
                try:
                    part = lengths.trim(part, entry.call)
                except codec.CodecError as err:
                    entry.fail(ProxyError.from_codec_error(err))
                    self.abandon(entry)
                    continue
            entry.deliver(start, stop, part)

    def _fail(self, batch: Batch, error: ProxyError) -> None:
        # A call cut into pieces fails whole: its rows still queued are dropped too.
        for entry, _, _ in batch.pieces:
            entry.fail(error)
            self.abandon(entry)

    async def close(self, grace_s: float | None = None) -> None:
        """Let in-flight batches finish within `grace_s`, then cancel them: their callers
        are told the proxy is shutting down, and no hung replica holds the exit."""
        if self.shadow is not None:
            await self.shadow.close()  # copies nobody waits for
        if not self.sending:
            return
        _, pending = await asyncio.wait(set(self.sending), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    # -- unbatched calls -------------------------------------------------------------------

    def _resolve_label(self, model: str, request: bytes) -> tuple[bytes, int | None]:
        """A forwarded call (metadata, status, classify, regress) naming a version label the
        proxy's model config knows: sent for that version, as a Predict is, so a label means
        the same on every replica. Other calls go as they came."""
        assert self.versions is not None
        if not self.versions.settings_of(model).labels:
            return request, None
        try:
            spec = model_spec_holder_pb2.ModelSpecHolder.FromString(request).model_spec
        except (DecodeError, ValueError):
            return request, None  # the replica says what is wrong with it
        if spec.WhichOneof("version_choice") != "version_label":
            return request, None
        version = self.versions.resolve_label(model, spec.version_label)
        if version is None:
            return request, None
        return request + version_override(version), version

    async def forward(self, path: str, request: bytes, timeout: float | None,
                      model: str = "") -> bytes:
        """An unbatched call (metadata, status, classify, an unbatchable Predict, ...) to a
        healthy replica that serves `model`, under admission and the same retry policy."""
        admission = self.admission
        admission.admit_forwarded()
        admission.forwarded += 1
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        failed: Endpoint | None = None
        retries = 0
        # Health checks cover the model from now on, as they do a model seen in a Predict:
        # a REST caller's first call is a signature fetch, never a Predict.
        if model:
            self.pool.note_model(model)
        said_not_found: list[Endpoint] = []
        version = None
        try:
            if model and self.versions is not None:
                request, version = self._resolve_label(model, request)
            while True:
                replica = self.pool.pick_unbatched(model, exclude=failed,
                                                   skip=said_not_found, version=version)
                if replica is None:
                    raise ProxyError(grpc.StatusCode.UNAVAILABLE, "no healthy replica")
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise ProxyError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                     "Deadline exceeded before the call was sent")
                try:
                    return await self.pool.call(replica, path, request, remaining)
                except ProxyError as err:
                    if model and err.code is grpc.StatusCode.NOT_FOUND:
                        # A replica not yet health-checked for the model is tried as if it
                        # had it (a joining one too); the answer is NOT_FOUND once every
                        # replica that might have it said so.
                        said_not_found.append(replica)
                        if self.pool.lacks(replica, model, exclude=failed,
                                           skip=said_not_found):
                            continue
                        raise
                    timed_out = (deadline is None
                                 and err.code is grpc.StatusCode.DEADLINE_EXCEEDED)
                    if timed_out:
                        self.pool.record_failure(replica, err)
                    if not (self.retry.should_retry(err, retries, timed_out)
                            and self.pool.pick_unbatched(model, exclude=replica)):
                        if timed_out:
                            raise ProxyError(grpc.StatusCode.UNAVAILABLE,
                                             f"replica {replica.address} did not answer "
                                             f"in time") from None
                        raise
                    retries += 1
                    failed = replica
                    self.metrics.retries.inc()
        finally:
            admission.forwarded -= 1

