"""Model versions in the reference replica, managed from a model base path as TFS's
FileSystemStoragePathSource and AspiredVersionsManager manage them.

DIR (`--model_base_path`) holds numbered version folders (`1/`, `0002/`: the folder name
parsed as an integer is the version), each with a `replica.json` that names the built-in
model and its options:

    {"model": "identity", "batch_cost_ms": 5, "row_cost_us": 20, "load_ms": 200,
     "first_call_at_new_batch_size_ms": 300, "output_offset": 0.5}

Every key is optional; `model`, `batch_cost_ms` and `row_cost_us` default to the replica's
flags. `load_ms` is how long the version stays LOADING; `first_call_at_new_batch_size_ms`
makes the first Predict at each batch size that much slower (as graph tracing or TensorRT
profiles are), which warm-up hides; `output_offset` is added to every float output, so two
versions of one model answer differently (shadow and canary tests can tell them apart).

DIR is polled every `--file_system_poll_wait_seconds`. The version policy (TFS's
model_version_policy) picks the aspired versions among the folders: `latest` (TFS's default:
the highest one), `latest:N`, `all`, or `specific:1,2`. A new aspired version goes LOADING
then AVAILABLE; one no longer aspired goes UNLOADING, stays so while calls it started are
pending, then END, and only once every newly aspired version has finished loading, so a
roll-over never leaves a moment with nothing to serve (TFS's availability-preserving
policy). GetModelStatus lists every version seen, END ones included, newest first.

A folder without replica.json yet is not a version yet (write replica.json last, or move the
folder into place whole); a replica.json that does not parse or names an unknown model fails
that version's load: END with the error in its status, as TFS reports a failed load.

Labels: TFS sets version labels in its model config file; here an optional DIR/labels.json
(`{"stable": 1, "canary": 2}`), re-read on every poll, maps labels to versions. Without it
the replica knows no labels and a proxy in front resolves them to versions itself.

Development and test fixture only: not for production traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from batchproxy.protos import get_model_metadata_pb2, model_pb2
from batchproxy.replica.models import CostModel, Device, Model, ReplicaError, load_model

log = logging.getLogger(__name__)

VERSION_FILE = "replica.json"
LABELS_FILE = "labels.json"
OPTION_KEYS = frozenset({
    "model", "batch_cost_ms", "row_cost_us", "load_ms", "first_call_at_new_batch_size_ms",
    "output_offset",
})


@dataclass(frozen=True)
class VersionPolicy:
    """TFS's ServableVersionPolicy: latest {num_versions}, all {}, specific {versions}."""

    kind: str = "latest"
    num_versions: int = 1
    versions: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "latest":
                num = int(arg) if arg else 1
                if num < 1:
                    raise ValueError
                return cls("latest", num_versions=num)
            if kind == "all" and not arg:
                return cls("all")
            if kind == "specific" and arg:
                return cls("specific", versions=frozenset(int(v) for v in arg.split(",")))
        except ValueError:
            pass
        raise ValueError(
            f"model version policy {text!r}: expected latest, latest:N (N >= 1), all or "
            "specific:V1,V2,..."
        )

    def aspired(self, present: Iterable[int]) -> set[int]:
        ordered = sorted(set(present), reverse=True)
        if self.kind == "latest":
            return set(ordered[: self.num_versions])
        if self.kind == "specific":
            return set(self.versions & set(ordered))
        return set(ordered)


@dataclass
class Servable:
    """One version of the model: its model, cost model, state and pending calls."""

    version: int
    model: Model
    runner: CostModel
    model_name: str
    state: str = "LOADING"
    error_code: int = 0
    error_message: str = ""
    first_call_s: float = 0.0
    output_offset: float = 0.0
    pending: int = 0
    response_specs: dict[str, bytes] = field(default_factory=dict)
    signature_map: get_model_metadata_pb2.SignatureDefMap | None = None
    _traces: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    _drained: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        # Imported here: service.py builds on this module.
        from batchproxy.replica.service import signature_map

        self.response_specs = {
            name: self.response_spec(name).SerializeToString() for name in self.model.signatures
        }
        self.signature_map = signature_map(self.model)
        self._drained.set()

    def response_spec(self, signature: str) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self.model_name, signature_name=signature)
        spec.version.value = self.version
        return spec

    # -- pending calls: an UNLOADING version ends once the calls it started are answered --

    def enter(self) -> None:
        self.pending += 1
        self._drained.clear()

    def leave(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self._drained.set()

    async def drained(self) -> None:
        await self._drained.wait()

    async def run(
        self, signature: str, inputs: dict[str, np.ndarray], rows: int
    ) -> dict[str, np.ndarray]:
        if self.first_call_s > 0:
            # The first call at a batch size traces the graph; calls at that size that come
            # meanwhile wait for the same trace. It is CPU work: the device stays free.
            trace = self._traces.get(rows)
            if trace is None:
                trace = self._traces[rows] = asyncio.ensure_future(
                    asyncio.sleep(self.first_call_s)
                )
            if not trace.done():
                await asyncio.shield(trace)
        outputs = await self.runner.run(signature, inputs, rows)
        if self.output_offset:
            outputs = {
                alias: array + np.asarray(self.output_offset, dtype=array.dtype)
                if array.dtype.kind == "f" else array
                for alias, array in outputs.items()
            }
        return outputs


@dataclass
class VersionDefaults:
    """What a replica.json leaves out: the replica's own flags."""

    model_kind: str = "identity"
    batch_cost_ms: float = 0.0
    row_cost_us: float = 0.0


def version_folders(base: Path) -> dict[int, Path]:
    """Numbered folders of `base` ("0002" is version 2), as TFS parses them; anything else,
    and a folder whose replica.json is not written yet, is not a version."""
    found: dict[int, Path] = {}
    try:
        entries = list(base.iterdir())
    except OSError as err:
        log.warning("model base path %s: %s", base, err)
        return found
    for entry in entries:
        numbered = entry.name.isascii() and entry.name.isdigit()
        if numbered and entry.is_dir() and (entry / VERSION_FILE).is_file():
            found[int(entry.name)] = entry
    return found


def _mtime(folder: Path) -> float:
    try:
        return (folder / VERSION_FILE).stat().st_mtime
    except OSError:
        return -1.0


def read_options(folder: Path) -> dict[str, Any]:
    """The version's replica.json, or ReplicaError(INVALID_ARGUMENT) saying what is wrong."""
    path = folder / VERSION_FILE
    try:
        options = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ReplicaError(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: {err}") from None
    if not isinstance(options, dict):
        raise ReplicaError(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: expected a JSON object")
    unknown = sorted(set(options) - OPTION_KEYS)
    if unknown:
        raise ReplicaError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{path}: unknown keys {unknown}; known: {sorted(OPTION_KEYS)}",
        )
    for key, value in options.items():
        if key != "model" and (not isinstance(value, (int, float)) or isinstance(value, bool)
                               or (key != "output_offset" and value < 0)):
            raise ReplicaError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{path}: {key} must be a number" + ("" if key == "output_offset" else " >= 0"),
            )
    return options


def read_labels(base: Path) -> dict[str, int]:
    """DIR/labels.json ({"stable": 1}); none (or a bad one, logged) is no labels."""
    path = base / LABELS_FILE
    if not path.exists():
        return {}
    try:
        labels = json.loads(path.read_text())
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in labels.items()
        ):
            raise ValueError('expected {"label": version, ...}')
    except (OSError, ValueError) as err:
        log.warning("%s ignored: %s", path, err)
        return {}
    return labels


class VersionManager:
    """Keeps the servables of one model in step with its base path (see the module doc).

    `servables` holds every version seen (END ones too: GetModelStatus lists them);
    `latest()` is the highest AVAILABLE one."""

    def __init__(
        self,
        base_path: str | Path,
        model_name: str,
        *,
        policy: VersionPolicy | None = None,
        poll_s: float = 1.0,
        defaults: VersionDefaults | None = None,
        device: Device | None = None,
    ) -> None:
        self.base = Path(base_path)
        self.model_name = model_name
        self.policy = policy or VersionPolicy()
        self.poll_s = poll_s
        self.defaults = defaults or VersionDefaults()
        # One simulated GPU for every version, as TFS runs all versions on one device.
        self.device = device or Device()
        self.servables: dict[int, Servable] = {}
        self.labels: dict[str, int] = {}
        # A version whose load failed is tried again only once its replica.json changes.
        self._failed_mtimes: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._unloads: set[asyncio.Task[None]] = set()

    def latest(self) -> Servable | None:
        available = [s for s in self.servables.values() if s.state == "AVAILABLE"]
        return max(available, key=lambda s: s.version, default=None)

    def any_model(self) -> Model | None:
        """A model to describe the replica by in its start-up line."""
        servable = self.latest() or next(iter(self.servables.values()), None)
        return servable.model if servable else None

    async def start(self) -> None:
        """Load what the base path holds now (TFS waits for its first versions before it
        serves), then poll it in the background unless the poll period is 0."""
        if not self.base.is_dir():
            log.warning("model base path %s is not a folder (yet): no versions to serve",
                        self.base)
        await self.poll()
        if not self.servables:
            log.warning("no versions of model %s found under %s", self.model_name, self.base)
        if self.poll_s > 0:
            self._task = asyncio.ensure_future(self._poll_forever())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._unloads) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.device.close()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except Exception:  # a bad poll must not end polling
                log.exception("polling %s failed", self.base)

    async def poll(self) -> None:
        """One reconciliation: load new aspired versions, then unload the others."""
        self.labels = read_labels(self.base)
        folders = version_folders(self.base)
        aspired = self.policy.aspired(folders)
        live = {"LOADING", "AVAILABLE"}
        loads = [
            self._load(version, folders[version])
            for version in sorted(aspired)
            if ((s := self.servables.get(version)) is None or s.state not in live)
            and self._failed_mtimes.get(version) != _mtime(folders[version])
        ]
        if loads:
            await asyncio.gather(*loads)
        for servable in list(self.servables.values()):
            if servable.version not in aspired and servable.state in live:
                self._unload(servable)

    async def _load(self, version: int, folder: Path) -> None:
        try:
            servable, load_ms = self._build(version, folder)
        except ReplicaError as err:
            log.error("version %d of model %s failed to load: %s",
                      version, self.model_name, err.message)
            self.servables[version] = self._failed(version, err)
            self._failed_mtimes[version] = _mtime(folder)
            return
        self._failed_mtimes.pop(version, None)
        self.servables[version] = servable
        log.info("loading version %d of model %s (%s)", version, self.model_name,
                 servable.model.name)
        if load_ms > 0:
            await asyncio.sleep(load_ms / 1e3)
        servable.state = "AVAILABLE"
        log.info("version %d of model %s is AVAILABLE", version, self.model_name)

    def _build(self, version: int, folder: Path) -> tuple[Servable, float]:
        """The version's servable, not yet AVAILABLE, and how long it takes to load (ms)."""
        options = read_options(folder)
        kind = str(options.get("model", self.defaults.model_kind))
        try:
            model = load_model(kind)
        except ValueError as err:
            raise ReplicaError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{folder / VERSION_FILE}: {err}"
            ) from None
        runner = CostModel(
            model,
            float(options.get("batch_cost_ms", self.defaults.batch_cost_ms)),
            float(options.get("row_cost_us", self.defaults.row_cost_us)),
            device=self.device,
        )
        servable = Servable(
            version,
            model,
            runner,
            self.model_name,
            first_call_s=float(options.get("first_call_at_new_batch_size_ms", 0)) / 1e3,
            output_offset=float(options.get("output_offset", 0)),
        )
        return servable, float(options.get("load_ms", 0))

    def _failed(self, version: int, err: ReplicaError) -> Servable:
        # A placeholder that GetModelStatus shows as END with the load error.
        model = load_model(self.defaults.model_kind)
        servable = Servable(version, model, CostModel(model, device=self.device),
                            self.model_name, state="END")
        servable.error_code = err.code.value[0]
        servable.error_message = err.message
        return servable

    def _unload(self, servable: Servable) -> None:
        servable.state = "UNLOADING"
        log.info("unloading version %d of model %s (%d calls pending)",
                 servable.version, self.model_name, servable.pending)
        task = asyncio.ensure_future(self._finish_unload(servable))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _finish_unload(self, servable: Servable) -> None:
        await servable.drained()
        servable.state = "END"
        log.info("version %d of model %s unloaded (END)", servable.version, self.model_name)
