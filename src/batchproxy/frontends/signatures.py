"""Model signatures for the REST frontend: JSON numbers are typed by them.

A signature comes from GetModelMetadata on a replica and is cached per (model, version,
label). Entries live `ttl_s`; an expired entry is still served while a background fetch
refreshes it, so callers never wait on a refresh (the refresh loop, `run()`, is a supervised
background task in the proxy). An entry is refreshed sooner when a Predict
answer names a version other than the cached one (a new version was loaded), and dropped when
the model is not found any more. Concurrent misses for one key share one fetch.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from batchproxy.errors import ProxyError
from batchproxy.frontends.predict_service import Forward
from batchproxy.methods import GET_MODEL_METADATA
from batchproxy.protos import get_model_metadata_pb2, model_pb2
from batchproxy.supervisor import cancel_and_wait

if TYPE_CHECKING:
    from batchproxy.supervisor import Supervisor

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"  # what TFS uses for an empty signature_name
DEFAULT_TTL_S = 10.0

# (model name, version or None, version label or None)
ModelKey = tuple[str, int | None, str | None]


@dataclass(frozen=True)
class Signature:
    name: str
    # input alias -> tensorflow.DataType, in the order the replica listed them
    inputs: dict[str, int]
    outputs: dict[str, int]
    method_name: str


@dataclass
class ModelSignatures:
    """What one GetModelMetadata answer said about a model."""

    version: int | None  # the version the replica resolved the request to
    signatures: dict[str, Signature]
    fetched_at: float = 0.0
    stale: bool = field(default=False, compare=False)

    def signature(self, name: str) -> Signature:
        """The signature a REST body names ("" is the default), refused as TFS refuses it."""
        key = name or DEFAULT_SIGNATURE
        found = self.signatures.get(key)
        if found is None:
            raise ProxyError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f'Serving signature name: "{key}" not found in signature def',
            )
        return found


def model_spec(name: str, version: int | None = None, label: str | None = None,
               signature_name: str = "") -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=name, signature_name=signature_name)
    if version is not None:
        spec.version.value = version
    elif label is not None:
        spec.version_label = label
    return spec


def parse_metadata(data: bytes) -> ModelSignatures:
    """A serialized GetModelMetadataResponse -> its signatures."""
    try:
        response = get_model_metadata_pb2.GetModelMetadataResponse.FromString(data)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        packed = response.metadata.get("signature_def")
        if packed is None or not packed.Unpack(signature_map):
            raise ProxyError(grpc.StatusCode.INTERNAL,
                             "GetModelMetadata answered without a signature_def map")
    except DecodeError as err:
        raise ProxyError(grpc.StatusCode.INTERNAL,
                         f"Could not parse GetModelMetadataResponse: {err}") from None
    version = (
        response.model_spec.version.value if response.model_spec.HasField("version") else None
    )
    signatures = {
        name: Signature(
            name=name,
            inputs={alias: info.dtype for alias, info in sig.inputs.items()},
            outputs={alias: info.dtype for alias, info in sig.outputs.items()},
            method_name=sig.method_name,
        )
        for name, sig in signature_map.signature_def.items()
    }
    return ModelSignatures(version, signatures)


class SignatureCache:
    """`forward` sends GetModelMetadata to a replica (the engine's forward in the proxy)."""

    def __init__(self, forward: Forward, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.forward = forward
        self.ttl_s = ttl_s
        self._entries: dict[ModelKey, ModelSignatures] = {}
        self._fetching: dict[ModelKey, asyncio.Future[ModelSignatures]] = {}
        self._stale: asyncio.Queue[ModelKey] = asyncio.Queue()
        self._queued: set[ModelKey] = set()
        self._started = False
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0  # GetModelMetadata calls made (tests and logs read it)

    def start(self, supervisor: Supervisor | None = None) -> None:
        """Run the refresh loop: under `supervisor` when given, else as a task of our own
        (started on the first refresh if nobody started it)."""
        self._started = True
        if supervisor is not None:
            supervisor.spawn("signature_refresh", self.run)
        else:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        """The refresh loop: one fetch per stale key, several keys at once. A refresh that
        fails keeps the old entry; a bug escapes and the loop is restarted."""
        async with asyncio.TaskGroup() as refreshes:
            while True:
                key = await self._stale.get()
                refreshes.create_task(self._refresh(key))

    def cached(self, key: ModelKey) -> ModelSignatures | None:
        """The entry get() would return at once (a stale or expired one is refreshed in
        the background, as there), or None when it would fetch: callers on the hot path
        skip the coroutine get() costs when the entry is there."""
        entry = self._entries.get(key)
        if entry is not None and (
            entry.stale or asyncio.get_running_loop().time() - entry.fetched_at > self.ttl_s
        ) and key not in self._fetching:
            self._refresh_later(key)
        return entry

    async def get(self, key: ModelKey, timeout: float | None = None) -> ModelSignatures:
        entry = self.cached(key)
        if entry is not None:
            return entry
        pending = self._fetching.get(key)
        if pending is None:
            pending = self._start_fetch(key)
        # The fetch is shared: it runs under the replica timeout, each caller waits under
        # its own deadline, and shield() keeps one caller's leaving from cancelling it.
        try:
            return await asyncio.wait_for(asyncio.shield(pending), timeout)
        except TimeoutError:
            raise ProxyError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             "Deadline exceeded while fetching the model's signatures") from None

    def _start_fetch(self, key: ModelKey) -> asyncio.Future[ModelSignatures]:
        future = asyncio.ensure_future(self._fetch(key))
        self._fetching[key] = future
        future.add_done_callback(lambda _: self._fetching.pop(key, None))
        # A fetch whose waiters all left still finishes; its error must not go unretrieved.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    async def _fetch(self, key: ModelKey) -> ModelSignatures:
        name, version, label = key
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=model_spec(name, version, label), metadata_field=["signature_def"]
        )
        self.fetches += 1
        data = await self.forward(GET_MODEL_METADATA, request.SerializeToString(), None,
                                  model=name)
        entry = parse_metadata(data)
        entry.fetched_at = asyncio.get_running_loop().time()
        self._entries[key] = entry
        return entry

    def _refresh_later(self, key: ModelKey) -> None:
        if key in self._queued:
            return
        if not self._started:
            self.start()
        self._queued.add(key)
        self._stale.put_nowait(key)

    async def _refresh(self, key: ModelKey) -> None:
        self._queued.discard(key)
        future = self._fetching.get(key) or self._start_fetch(key)
        try:
            # Shielded: a caller that missed meanwhile may share this fetch; stopping the
            # refresh loop must not cancel it under that caller.
            await asyncio.shield(future)
        except ProxyError as err:
            if err.code == grpc.StatusCode.NOT_FOUND:
                self._entries.pop(key, None)  # the next caller sees NOT_FOUND itself
            else:  # keep serving the old entry; the next call tries again
                log.warning("refreshing the signatures of %s failed: %s", key, err.message)

    def saw_version(self, key: ModelKey, version: int | None) -> None:
        """A Predict for `key` was answered by `version`: refresh if that is news."""
        entry = self._entries.get(key)
        if entry is not None and version is not None and entry.version not in (None, version):
            entry.stale = True

    def forget(self, key: ModelKey) -> None:
        """The model or version is gone (a Predict got NOT_FOUND): fetch afresh next time."""
        self._entries.pop(key, None)

    async def close(self) -> None:
        """Stop our own refresh loop (a supervised one stops with its supervisor) and every
        fetch in flight."""
        tasks: list[asyncio.Future[Any]] = list(self._fetching.values())
        if self._task is not None:
            tasks.append(self._task)
            self._task = None
        await cancel_and_wait(tasks)
