"""Warm-up: a replica, or a version on it, that becomes available gets one Predict at each
batch size the proxy will send it before it takes a real call, so first-call latency (graph
tracing, XLA or TensorRT building a profile per shape) never lands on a caller.

How it gates traffic without a second notion of health: `WarmingPool` is the replica pool
with a filter on health-check results. A check that finds a model (or, when the check lists
versions, a version) AVAILABLE on a replica where it has not been warmed starts a warm-up
and, until it ends, reports what the replica held before: a replica that is joining (or
coming back from an ejection) stays so, and calls wait for it or go to the others; a version
new on a healthy replica reads LOADING there. When the warm-up ends, the last check is
applied as it came. A replica that is ejected or drained forgets what was warmed (it may
come back as a new process).

What a warm-up sends: for each batch size the batcher can make for the model (its allowed
batch sizes, else 1..max_batch_size; the model's own settings where the proxy config file
gives it some, else the flags), a Predict built from a template. Templates come from TFS's
warm-up records when the proxy is given them (`--warmup_requests_file`, the TFRecord of
PredictionLog that TFS reads from assets.extra/tf_serving_warmup_requests; its predict_log
requests, per model name), else from the model's serving_default signature
(GetModelMetadata from that replica): zeros, every unknown dimension but the batch one 1. A
template's rows are repeated or cut to each batch size. Warm-up calls go straight to the
replica, outside the batcher, and are counted apart (batchproxy_warmup_calls_total). A
warm-up call the replica refuses for its content ends that warm-up (logged, counted
failed): a template the model rejects must not keep a replica out for ever; one that finds
the replica down leaves it unwarmed, to try again on its next passing check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from batchproxy import codec
from batchproxy.codec import dtypes
from batchproxy.errors import ProxyError
from batchproxy.fleet.shared_slots import SharedReplicaPool
from batchproxy.fleet.slots import Endpoint, ModelState, ReplicaPool, ReplicaState
from batchproxy.fleet.warmup_claims import WarmupClaims
from batchproxy.methods import GET_MODEL_METADATA, PREDICT
from batchproxy.protos import get_model_metadata_pb2, predict_pb2, tensor_pb2

log = logging.getLogger(__name__)

SERVING_DEFAULT = "serving_default"
# TFS's ModelVersionStatus.State numbers (the versions a health check lists).
LOADING_STATE = 20
AVAILABLE_STATE = 30
# How often a worker waiting for another's warm-up of a replica looks whether it ended.
CLAIM_POLL_S = 0.05
# Codes that say the replica is down, not that the warm-up call was wrong.
DOWN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                  grpc.StatusCode.CANCELLED})

# (signature name, {alias: array with the batch dimension first})
Template = tuple[str, dict[str, np.ndarray]]
# What warm-up counts: (model, outcome) with outcome "ok" or "failed".
CallCounter = Callable[[str, str], None]


@dataclass(frozen=True)
class WarmupConfig:
    enabled: bool = True
    max_batch_size: int = 32
    requests_file: str | None = None
    timeout_s: float = 30.0
    # Warm-up calls in flight on one replica at once: tracing is mostly CPU work, so a few
    # batch sizes warm together.
    concurrency: int = 8
    # The batch sizes the proxy sends for a model (its own max_batch_size or allowed
    # sizes, engine/model_batching.py); None: 1..max_batch_size for every model.
    sizes_of: Callable[[str], Sequence[int]] | None = None

    def batch_sizes(self, model: str) -> Sequence[int]:
        if self.sizes_of is not None:
            return self.sizes_of(model)
        return range(1, self.max_batch_size + 1)


# -- TFS warm-up records --------------------------------------------------------------------


class WarmupFileError(ValueError):
    """The warm-up requests file cannot be read: start-up stops with this message."""


def tfrecords(data: bytes) -> Iterator[bytes]:
    """The records of a TFRecord file: uint64 length, uint32 masked CRC of it, the data,
    uint32 masked CRC of the data (little-endian). The CRCs are not checked: a cut file
    still fails on its lengths."""
    offset = 0
    while offset < len(data):
        if offset + 12 > len(data):
            raise WarmupFileError(f"TFRecord cut short at byte {offset}")
        (length,) = struct.unpack_from("<Q", data, offset)
        start = offset + 12
        end = start + length
        if end + 4 > len(data):
            raise WarmupFileError(f"TFRecord at byte {offset} claims {length} bytes; "
                                  f"the file ends first")
        yield data[start:end]
        offset = end + 4


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data):
            raise WarmupFileError("protobuf varint cut short")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def _field(data: bytes, number: int) -> bytes | None:
    """The last length-delimited field `number` of a serialized message (protobuf's rule
    for a singular message field seen twice is to merge; warm-up records never repeat it)."""
    found = None
    offset = 0
    while offset < len(data):
        key, offset = _varint(data, offset)
        wire = key & 7
        if wire == 0:
            _, offset = _varint(data, offset)
        elif wire == 1:
            offset += 8
        elif wire == 5:
            offset += 4
        elif wire == 2:
            length, offset = _varint(data, offset)
            if key >> 3 == number:
                found = data[offset:offset + length]
            offset += length
        else:
            raise WarmupFileError(f"protobuf wire type {wire} not expected in a PredictionLog")
    return found


# PredictionLog.predict_log = 6; PredictLog.request = 1.
PREDICTION_LOG_PREDICT = 6
PREDICT_LOG_REQUEST = 1


def read_warmup_requests(path: str | Path) -> dict[str, list[Template]]:
    """The predict_log requests of a TFS warm-up file, as templates per model name. Other
    kinds of log (classify, regress, multi-inference) are skipped: the proxy batches
    Predict only."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise WarmupFileError(f"warm-up requests file {path}: {err}") from None
    templates: dict[str, list[Template]] = {}
    skipped = 0
    for index, record in enumerate(tfrecords(data)):
        predict_log = _field(record, PREDICTION_LOG_PREDICT)
        request = _field(predict_log, PREDICT_LOG_REQUEST) if predict_log is not None else None
        if request is None:
            skipped += 1
            continue
        try:
            call = codec.decode_predict_request(request)
        except codec.CodecError as err:
            raise WarmupFileError(f"{path}: record {index}: {err.message}") from None
        arrays = {alias: np.asarray(dtypes.to_numpy(t.dtype, t.shape, t.data))
                  for alias, t in call.inputs.items()}
        if not arrays or any(a.ndim == 0 or a.shape[0] == 0 for a in arrays.values()):
            raise WarmupFileError(f"{path}: record {index}: every input needs a batch "
                                  "dimension with at least one row")
        templates.setdefault(call.model_name, []).append(
            (call.signature_name or SERVING_DEFAULT, arrays))
    if skipped:
        log.info("%s: %d records other than predict_log skipped", path, skipped)
    if not templates:
        raise WarmupFileError(f"{path}: no predict_log records")
    return templates


# -- synthesized from the signature ---------------------------------------------------------


def signature_template(response: bytes) -> Template:
    """Zeros of serving_default's inputs, one row, other unknown dimensions 1, from a
    serialized GetModelMetadataResponse."""
    metadata = get_model_metadata_pb2.GetModelMetadataResponse.FromString(response)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    if "signature_def" not in metadata.metadata or not metadata.metadata[
            "signature_def"].Unpack(signatures):
        raise ValueError("the metadata holds no signature_def")
    if SERVING_DEFAULT not in signatures.signature_def:
        raise ValueError(f"the model has no {SERVING_DEFAULT} signature")
    arrays: dict[str, np.ndarray] = {}
    for alias, info in signatures.signature_def[SERVING_DEFAULT].inputs.items():
        dims = [d.size for d in info.tensor_shape.dim]
        if info.tensor_shape.unknown_rank or not dims:
            dims = [-1]
        shape = tuple([1] + [size if size >= 0 else 1 for size in dims[1:]])
        if info.dtype == dtypes.DT_STRING:
            array = np.full(shape, b"", dtype=object)
        elif info.dtype in dtypes.NUMPY_DTYPES:
            array = np.zeros(shape, dtype=dtypes.NUMPY_DTYPES[info.dtype])
        else:
            raise ValueError(f"input {alias}: no zeros for dtype {info.dtype}")
        arrays[alias] = array
    return SERVING_DEFAULT, arrays


def dtype_of(array: np.ndarray) -> int:
    if array.dtype == object:
        return dtypes.DT_STRING
    for dtype, numpy_dtype in dtypes.NUMPY_DTYPES.items():
        if numpy_dtype == array.dtype:
            return dtype
    raise ValueError(f"no TensorFlow dtype for {array.dtype}")


def warmup_request(model: str, version: int | None, template: Template, rows: int,
                   dtype_for: Callable[[np.ndarray], int] = dtype_of) -> bytes:
    """A serialized PredictRequest of `rows` rows: the template's rows repeated, then cut."""
    signature, arrays = template
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for alias, array in arrays.items():
        repeats = -(-rows // array.shape[0])
        batch = np.concatenate([array] * repeats)[:rows]
        tensor = tensor_pb2.TensorProto(dtype=dtype_for(array))  # type: ignore[arg-type]
        for size in batch.shape:
            tensor.tensor_shape.dim.add(size=size)
        if batch.dtype == object:
            tensor.string_val.extend(bytes(v) for v in batch.ravel())
        else:
            tensor.tensor_content = np.ascontiguousarray(batch).tobytes()
        request.inputs[alias].CopyFrom(tensor)
    return request.SerializeToString()


# -- the pool that warms ---------------------------------------------------------------------

# What a warm-up is for: (replica address, model, version or None when the check lists none).
Key = tuple[str, str, int | None]


@dataclass
class _Check:
    """A health check's result as the pool was to receive it."""

    passed: bool
    reason: str
    models: dict[str, ModelState] | None
    certain: bool
    more: dict[str, Any] = field(default_factory=dict)


class WarmingPool(ReplicaPool):
    """A ReplicaPool whose replicas (and versions) are warmed before they take calls; see
    the module doc. With warm-up off it is a plain ReplicaPool."""

    def __init__(self, *args: Any, warmup: WarmupConfig | None = None,
                 count: CallCounter | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warmup = warmup or WarmupConfig()
        self.count = count or (lambda model, outcome: None)
        self.templates: dict[str, list[Template]] = {}
        if self.warmup.enabled and self.warmup.requests_file:
            self.templates = read_warmup_requests(self.warmup.requests_file)
        self.warmed: set[Key] = set()
        self._warming: dict[str, asyncio.Task[None]] = {}  # by replica address
        self._last: dict[str, _Check] = {}
        self.listeners.append(self._forget_warmed)

    # -- the filter on health checks ---------------------------------------------------------

    def record_check(self, replica: Endpoint, passed: bool, reason: str = "",
                     models: dict[str, ModelState] | None = None, certain: bool = True,
                     *extra: Any, **more: Any) -> None:
        # Whatever else a check carries (the versions it lists) passes through, by name.
        if extra:
            more.update(zip(("versions",), extra, strict=False))
        if not (self.warmup.enabled and passed and models) \
                or replica.state is ReplicaState.DRAINING:
            if not passed:
                # A held passing check is stale now: the warm-up must not replay it.
                self._last.pop(replica.address, None)
            super().record_check(replica, passed, reason, models, certain, **more)
            return
        check = _Check(passed, reason, models, certain, dict(more))
        due = self._due(replica, check)
        if not due:
            self._last.pop(replica.address, None)
            super().record_check(replica, passed, reason, models, certain, **more)
            return
        self._last[replica.address] = check
        if replica.address not in self._warming:
            task = asyncio.ensure_future(self._warm(replica, due))
            self._warming[replica.address] = task
        if replica.state is ReplicaState.HEALTHY:
            # Healthy already: what is new on it stays out until warmed.
            models, more = self._held(replica, check, due)
            super().record_check(replica, passed, reason, models, certain, **more)
        # Joining or ejected: the check waits for the warm-up; the replica stays as it is.

    def _due(self, replica: Endpoint, check: _Check) -> list[Key]:
        """What this check shows available that is not warmed. A model a healthy replica
        was already taking calls for before any check listed it (a model first seen in live
        traffic) is not warmed: those calls ran cold already, and warm-up batches now would
        only take the replica's slots from them. Name it with --health_check_model to have
        it warmed before any call."""
        due: list[Key] = []
        assert check.models is not None
        listed = check.more.get("versions") or {}
        for model, state in check.models.items():
            if state is not ModelState.AVAILABLE:
                continue
            versions = listed.get(model)
            if versions:
                keys = [(replica.address, model, v) for v, s in sorted(versions.items())
                        if s == AVAILABLE_STATE]
            else:
                keys = [(replica.address, model, None)]
            if replica.state is ReplicaState.HEALTHY and model not in replica.models:
                self.warmed.update(keys)
                continue
            due += [key for key in keys if key not in self.warmed]
        return due

    def _held(self, replica: Endpoint, check: _Check,
              due: list[Key]) -> tuple[dict[str, ModelState] | None, dict[str, Any]]:
        """The check as the pool should see it while `due` warms on a healthy replica."""
        assert check.models is not None
        models = dict(check.models)
        more = dict(check.more)
        versions = {name: dict(listed) for name, listed in (more.get("versions") or {}).items()}
        for _, model, version in due:
            before = replica.models.get(model)
            if version is None or before is not ModelState.AVAILABLE:
                if before is not None and before is not ModelState.AVAILABLE:
                    models[model] = before  # the model comes back only once warmed
                continue
            if model in versions:
                versions[model][version] = LOADING_STATE  # a new version: not yet
        if "versions" in more:
            more["versions"] = versions
        return models, more

    def _forget_warmed(self, replica: Endpoint, old: ReplicaState, reason: str) -> None:
        if replica.state in (ReplicaState.EJECTED, ReplicaState.DRAINING):
            self.warmed = {key for key in self.warmed if key[0] != replica.address}

    # -- warming -----------------------------------------------------------------------------

    async def _warm(self, replica: Endpoint, due: list[Key]) -> None:
        down = False
        try:
            for key in due:
                if await self._warm_key(replica, key):
                    self.warmed.add(key)
                else:
                    down = True
                    break
        finally:
            self._warming.pop(replica.address, None)
        check = self._last.pop(replica.address, None)
        # Down meanwhile: the next health check says what it is now (and warms again).
        if check is not None and not down and self.replicas.get(replica.address) is replica:
            # The latest check, as it came: the pool now sees what was warmed.
            self.record_check(replica, check.passed, check.reason, check.models,
                              check.certain, **check.more)

    async def _warm_key(self, replica: Endpoint, key: Key) -> bool:
        """Warm `key` (see _warm_one); workers sharing the fleet warm each key once."""
        return await self._warm_one(replica, key)

    async def _templates(self, replica: Endpoint, model: str,
                         version: int | None) -> list[Template]:
        if model in self.templates:
            return self.templates[model]
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            metadata_field=["signature_def"])
        request.model_spec.name = model
        if version is not None:
            request.model_spec.version.value = version
        response = await replica.transport.call(GET_MODEL_METADATA,
                                                request.SerializeToString(),
                                                self.warmup.timeout_s)
        return [signature_template(response)]

    async def _warm_one(self, replica: Endpoint, key: Key) -> bool:
        """Warm one model version on `replica`: True when done (or given up on for good),
        False when the replica went down meanwhile."""
        _, model, version = key
        what = f"model {model}" + (f" version {version}" if version is not None else "")
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            templates = await self._templates(replica, model, version)
        except ProxyError as err:
            if err.code in DOWN:
                return False
            log.warning("warm-up of %s on %s skipped: GetModelMetadata %s %s", what,
                        replica.address, err.code.name, err.message)
            return True
        except ValueError as err:
            log.warning("warm-up of %s on %s skipped: %s", what, replica.address, err)
            return True
        concurrency = self.warmup.concurrency
        if replica.state is ReplicaState.HEALTHY and self.max_inflight > 1:
            # A new version on a replica that serves calls: the warm-up runs beside them,
            # outside their slots, and at most one fewer at once than a replica's batches.
            concurrency = min(concurrency, self.max_inflight - 1)
        limit = asyncio.Semaphore(concurrency)
        sizes = self.warmup.batch_sizes(model)
        down = False
        failure: ProxyError | None = None

        async def send(template: Template, rows: int) -> None:
            nonlocal down, failure
            async with limit:
                if down or failure is not None:
                    return
                request = warmup_request(model, version, template, rows)
                # A replica that serves nothing yet (joining, or back from an ejection) is
                # warmed within --max_inflight_per_replica, all workers together. A new
                # version on a serving one is not: its slots stay with the calls it is
                # answering for the version in use, and the warm-up runs beside them.
                slotted = replica.state is not ReplicaState.HEALTHY
                if slotted:
                    await self.hold_slot(replica)
                try:
                    await replica.transport.call(PREDICT, request, self.warmup.timeout_s)
                except ProxyError as err:
                    self.count(model, "failed")
                    if err.code in DOWN:
                        down = True
                    else:
                        failure = err
                    return
                finally:
                    if slotted:
                        self.release(replica)
                self.count(model, "ok")

        await asyncio.gather(*(send(template, rows) for template in templates
                               for rows in sizes))
        if down:
            log.info("warm-up of %s on %s stopped: the replica went down", what,
                     replica.address)
            return False
        if failure is not None:
            log.warning("warm-up of %s on %s given up: Predict %s %s", what, replica.address,
                        failure.code.name, failure.message)
            return True
        log.info("warmed %s on %s: %d batch sizes in %.2fs", what, replica.address,
                 len(sizes) * len(templates), loop.time() - started)
        return True

    async def close(self) -> None:
        for task in list(self._warming.values()):
            task.cancel()
        for task in list(self._warming.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().close()


class SharedWarmingPool(WarmingPool, SharedReplicaPool):
    """Warm-up before traffic over slot counts and ejections shared by `--workers`: one
    worker warms each replica's model version, the others wait for it to end
    (fleet/warmup_claims.py)."""

    _claims: WarmupClaims | None = None

    @property
    def claims(self) -> WarmupClaims | None:
        if self._claims is None and self.table.warmup_dir is not None:
            self._claims = WarmupClaims(self.table.warmup_dir)
        return self._claims

    def _wait_bound_s(self, model: str) -> float:
        """How long another worker's warm-up is waited for before this one warms on its
        own: what a live one takes at worst (its metadata call, then every batch size,
        `concurrency` at a time, each within the warm-up timeout)."""
        rounds = -(-len(self.warmup.batch_sizes(model)) // self.warmup.concurrency)
        return self.warmup.timeout_s * (1 + rounds)

    async def _warm_key(self, replica: Endpoint, key: Key) -> bool:
        claims = self.claims
        if claims is None:
            return await self._warm_one(replica, key)
        _, model, version = key
        what = f"model {model}" + (f" version {version}" if version is not None else "")
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._wait_bound_s(model)
        while True:
            if claims.done(key):
                log.info("%s on %s was warmed by another worker", what, replica.address)
                return True
            if claims.try_lock(key):
                try:
                    if claims.done(key):  # ended between the look and the lock
                        return True
                    warmed = await self._warm_one(replica, key)
                    if warmed:
                        claims.mark_done(key)
                    return warmed
                finally:
                    claims.unlock(key)
            if loop.time() >= give_up_at:
                log.warning("another worker's warm-up of %s on %s took over %.0fs: warming "
                            "it here", what, replica.address, self._wait_bound_s(model))
                return await self._warm_one(replica, key)
            if self.replicas.get(replica.address) is not replica:
                return False  # dropped meanwhile
            await asyncio.sleep(CLAIM_POLL_S)

    def _forget_warmed(self, replica: Endpoint, old: ReplicaState, reason: str) -> None:
        super()._forget_warmed(replica, old, reason)
        if self.claims is not None and replica.state in (ReplicaState.EJECTED,
                                                         ReplicaState.DRAINING):
            self.claims.forget(replica.address)

    async def close(self) -> None:
        await super().close()
        if self._claims is not None:
            self._claims.close()
