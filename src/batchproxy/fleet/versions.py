"""Model versions across the fleet: which replicas hold which version in which state (from
the health checks' GetModelStatus answers), and which version a call gets.

A call naming a version gets that version; one naming a label gets the version the model
config maps it to (the same on every replica, since the proxy resolves it); a `latest` call
gets the version the model's policy picks from what the fleet holds now, or another one
if a canary weight draws it. Every call leaves the proxy naming one specific version, so a
batch (whose key holds the resolved version) never mixes two."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import grpc

from batchproxy.config import BatchingConfig
from batchproxy.errors import ProxyError
from batchproxy.fleet.slots import Route, loop_time
from batchproxy.priority import Priority
from batchproxy.protos import get_model_status_pb2, model_pb2

if TYPE_CHECKING:
    from batchproxy.fleet.slots import Endpoint, ReplicaPool

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
# States of a version on its way to AVAILABLE: calls for it wait (within their deadline).
COMING = frozenset((get_model_status_pb2.ModelVersionStatus.START,
                    get_model_status_pb2.ModelVersionStatus.LOADING))
# How long the capacity behind each version is kept before it is counted again: the
# learned speeds move with every batch, not only when a health check changes something.
CAPACITY_TTL_S = 1.0
# A replica's learned speed counts for its capacity only while batches keep timing it. The
# adaptive policy sends a light load to the replicas expected to finish first only, so one
# it stopped using keeps the cost of its last batches (a slow spell at start-up, a version
# loading beside them) however long ago that was: past this, it counts as one not learned.
SPEED_STALE_S = 2.0
STATE_NAMES = {value.number: value.name for value in
               get_model_status_pb2.ModelVersionStatus.State.DESCRIPTOR.values}


@dataclass(frozen=True)
class LatestPolicy:
    """Which version a `latest` call gets while replicas disagree:
    `highest`: the highest version AVAILABLE on any healthy replica (TFS's rule per server);
    `share:F`: the newest version once it is AVAILABLE on at least F of the capacity that
    serves the model, else the highest one below it that is. A replica's capacity is its
    slots (--max_inflight_per_replica) times its speed, learned per model (fleet/costs.py):
    one that answers a batch twice as fast counts twice. Until a replica's cost is learned,
    and while no batch timed it in the last SPEED_STALE_S, it counts as fast as the mean of
    those learned (all alike when none is);
    `pinned:N`: version N, whatever else the fleet holds."""

    kind: str = "highest"
    value: float = 0.0

    @classmethod
    def parse(cls, text: str) -> LatestPolicy:
        name, _, arg = text.strip().partition(":")
        try:
            if name == "highest" and not arg:
                return cls()
            if name == "share":
                share = float(arg)
                if 0.0 < share <= 1.0:
                    return cls("share", share)
            if name == "pinned" and int(arg) >= 0:
                return cls("pinned", int(arg))
        except ValueError:
            pass
        raise ValueError(f"latest policy {text!r}: expected 'highest', 'share:F' with "
                         f"0 < F <= 1, or 'pinned:N'")

    def __str__(self) -> str:
        if self.kind == "highest":
            return "highest"
        if self.kind == "pinned":
            return f"pinned:{int(self.value)}"
        return f"share:{self.value:g}"

    def pick(self, available: Mapping[int, float], serving: float) -> int | None:
        """The version among `available` (version -> capacity holding it AVAILABLE), with
        `serving` the capacity serving the model in all; None when nothing is available."""
        if self.kind == "pinned":
            return int(self.value)
        if not available:
            return None
        newest = max(available)
        if self.kind == "share" and serving and available[newest] / serving < self.value:
            older = [version for version in available if version < newest]
            if older:
                return max(older)
        return newest


@dataclass(frozen=True)
class ShadowSettings:
    """A version that gets a sampled copy of batches; its answers are compared with the
    primary's and never reach a caller. `sample`: share of batches copied;
    `max_inflight`: shadow batches in flight at once (beyond it, a sampled batch is not
    copied): together they bound the extra load."""

    version: int
    sample: float = 0.1
    max_inflight: int = 2


@dataclass(frozen=True)
class ModelSettings:
    """What the proxy knows of one model from its config files."""

    labels: Mapping[str, int] = field(default_factory=dict)
    latest: LatestPolicy = LatestPolicy()
    # version -> percent of `latest` calls sent to it; the rest go to the policy's version.
    weights: Mapping[int, float] = field(default_factory=dict)
    shadow: ShadowSettings | None = None
    # The model's latency objective for admission (None: --latency_slo_ms; 0: none).
    latency_slo_ms: float | None = None
    # The model's batching: the flags with its `[models.NAME.batching]` table applied
    # (None: the flags as they are).
    batching: BatchingConfig | None = None
    # The priority of its calls that name none (None: critical); a call's own wins.
    priority: Priority | None = None


NO_SETTINGS = ModelSettings()


_OVERRIDES: dict[int, bytes] = {}
_SPECS: dict[int, bytes] = {}


def version_spec(version: int) -> bytes:
    """A serialized ModelSpec naming only `version`. Appended to a call's own serialized
    ModelSpec it sets the version and drops a label (protobuf merges a message's fields, and
    the last member of a oneof wins), keeping the caller's name and signature_name."""
    spec = _SPECS.get(version)
    if spec is None:
        message = model_pb2.ModelSpec()
        message.version.value = version
        spec = message.SerializeToString()
        if len(_SPECS) < 4096:
            _SPECS[version] = spec
    return spec


def version_override(version: int) -> bytes:
    """PredictRequest field 1 (model_spec) holding only `version`. Appended to a serialized
    request it sets the request's version and drops a label (protobuf merges a message field
    that appears twice, and the last member of a oneof wins), keeping the callers' name and
    signature_name: the merged request is not re-encoded."""
    override = _OVERRIDES.get(version)
    if override is None:
        body = version_spec(version)
        override = b"\x0a" + _varint(len(body)) + body
        if len(_OVERRIDES) < 4096:
            _OVERRIDES[version] = override
    return override


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def batching_view(config: BatchingConfig) -> dict[str, object]:
    """A model's own batching as the debug endpoint shows it (None there: the flags)."""
    return {"max_batch_size": config.max_batch_size,
            "batch_timeout_micros": config.batch_timeout_micros,
            "allowed_batch_sizes": list(config.allowed_batch_sizes),
            "padding_policy": config.padding_policy,
            "variable_length_inputs": {name: pad for name, pad in config.variable_length_inputs},
            "length_buckets": list(config.length_buckets),
            "length_following_outputs": {out: f"{axis}={name}" for out, axis, name
                                         in config.length_following_outputs}}


class VersionRouter:
    """Resolves the version of each call from the fleet's view and the model settings.
    `settings` is replaced whole on a reload, so a call sees one config or the other;
    `listeners` hear of each replacement, so what is derived from them (the scheduler's
    per-model batching) is derived again."""

    def __init__(self, pool: ReplicaPool, settings: Mapping[str, ModelSettings] | None = None,
                 seed: int | None = None, batch_rows: int = 1) -> None:
        self.pool = pool
        self.listeners: list[Callable[[], None]] = []
        self._settings: Mapping[str, ModelSettings] = dict(settings or {})
        self.random = random.Random(seed)
        # The batch size a replica's speed is judged at (the engine's max_batch_size).
        self.batch_rows = max(1, batch_rows)

    @property
    def settings(self) -> Mapping[str, ModelSettings]:
        return self._settings

    @settings.setter
    def settings(self, settings: Mapping[str, ModelSettings]) -> None:
        self._settings = settings
        for listener in self.listeners:
            listener()

    def settings_of(self, model: str) -> ModelSettings:
        return self._settings.get(model, NO_SETTINGS)

    def available(self, model: str) -> tuple[dict[int, float], float]:
        """version -> capacity of the healthy replicas where it is AVAILABLE, and the
        capacity of those serving the model at all (any version). Asked on every latest
        call: kept until the pool reports a change (ReplicaPool.derived), or CAPACITY_TTL_S
        at most, so that speeds learned since count."""
        key = ("versions", model)
        cached = cast("tuple[tuple[dict[int, float], float], float] | None",
                      self.pool.derived.get(key))
        now = loop_time()
        if cached is not None and now - cached[1] < CAPACITY_TTL_S:
            return cached[0]
        result = self._count(model)
        if len(self.pool.derived) < 4 * 256:  # model names come from clients
            self.pool.derived[key] = (result, now)
        return result

    def _count(self, model: str) -> tuple[dict[int, float], float]:
        holders = [replica for replica in self.pool.replicas.values()
                   if replica.serves(model) and replica.versions.get(model)]
        speeds = self._speeds(model, holders)
        slots = self.pool.max_inflight
        counts: dict[int, float] = {}
        serving = 0.0
        for replica, speed in zip(holders, speeds, strict=True):
            capacity = slots * speed
            serving += capacity
            for version, state in replica.versions[model].items():
                if state == AVAILABLE:
                    counts[version] = counts.get(version, 0.0) + capacity
        return counts, serving

    def _speeds(self, model: str, replicas: list[Endpoint]) -> list[float]:
        """Each replica's speed for `model`, relative to the others: batches per second at
        `batch_rows` rows where its cost is learned and was timed in the last SPEED_STALE_S,
        the mean of those where not, 1 for all when none is."""
        learned: list[float | None] = []
        now = loop_time()
        for replica in replicas:
            cost = replica.costs.get(model)
            current = (cost is not None and cost.warm
                       and now - cost.timed_at <= SPEED_STALE_S)
            seconds = cost.predict(self.batch_rows) if cost is not None and current else 0.0
            learned.append(1.0 / seconds if seconds > 0 else None)
        known = [speed for speed in learned if speed is not None]
        if not known:
            return [1.0] * len(replicas)
        mean = sum(known) / len(known)
        return [mean if speed is None else speed for speed in learned]

    def holds(self, model: str, version: int) -> str:
        """Whether the fleet holds `version` of `model`: "available" somewhere (or some
        replica serving the model has not listed its versions, so it may), "coming" (only
        START or LOADING somewhere: calls for it wait), "absent" (listed nowhere in those
        states), or "unknown" (no replica serving the model has been checked yet). Asked
        on every call for a specific version: kept until the pool reports a change."""
        key = ("holds", model, version)
        cached = self.pool.derived.get(key)
        if cached is not None:
            return cast(str, cached)
        held = self._holds(model, version)
        if len(self.pool.derived) < 4 * 256:  # versions come from clients
            self.pool.derived[key] = held
        return held

    def _holds(self, model: str, version: int) -> str:
        if self.pool.route(model) is not Route.SERVED:
            return "unknown"
        listed = coming = False
        for replica in self.pool.replicas.values():
            if not replica.serves(model):
                continue
            versions = replica.versions.get(model)
            if versions is None:
                return "available"
            listed = True
            state = versions.get(version)
            if state == AVAILABLE:
                return "available"
            coming = coming or state in COMING
        if coming:
            return "coming"
        return "absent" if listed else "unknown"

    def refuse_absent(self, model: str, version: int, named: bool,
                      label: str | None = None) -> None:
        """Refuse at once a call for a version no replica holds or is loading, rather than
        let it wait for its deadline. A version the caller named gets TFS's own answer
        (NOT_FOUND); one the proxy chose for it (a label's, a pinned latest) is the fleet's
        failing: UNAVAILABLE, naming the version."""
        if self.holds(model, version) != "absent":
            return
        if named:
            raise ProxyError(grpc.StatusCode.NOT_FOUND,
                             f"Servable not found for request: Specific({model}, {version})")
        why = f"label '{label}'" if label is not None else "its pinned latest version"
        raise ProxyError(grpc.StatusCode.UNAVAILABLE,
                         f"Version {version} of model '{model}' ({why}) is not available "
                         f"on any replica")

    def resolve_label(self, model: str, label: str) -> int | None:
        """The version a label names; None when the proxy has no labels for the model (the
        replica then answers for it, as before any config)."""
        labels = self.settings_of(model).labels
        if not labels:
            return None
        version = labels.get(label)
        if version is None:
            raise ProxyError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"Unrecognized servable version label: {label}")
        return version

    def resolve_latest(self, model: str) -> int | None:
        """The version for a `latest` call, drawn per call when weights are set; None while
        no replica has reported versions of the model (the call stays `latest`)."""
        settings = self.settings_of(model)
        available, serving = self.available(model)
        if not available and settings.latest.kind != "pinned":
            return None
        if settings.weights:
            draw = self.random.random() * 100.0
            for version, percent in sorted(settings.weights.items()):
                if draw < percent:
                    if version in available:
                        return version
                    break  # a weight on a version no replica holds: the policy's share
                draw -= percent
        return settings.latest.pick(available, serving)

    def fleet_view(self, model: str) -> dict[str, dict[str, list[str]]]:
        """version -> state name -> replica addresses, for the debug endpoint."""
        view: dict[str, dict[str, list[str]]] = {}
        for replica in self.pool.replicas.values():
            for version, state in replica.versions.get(model, {}).items():
                view.setdefault(str(version), {}).setdefault(
                    STATE_NAMES.get(state, str(state)), []).append(replica.address)
        return view

    def describe(self) -> dict[str, object]:
        """Per model: settings in force, the version a latest call gets now, and who holds
        which version (GET /v1/batchproxy/models)."""
        models = sorted(set(self.pool.known_models) | set(self.settings))
        out: dict[str, object] = {}
        for model in models:
            settings = self.settings_of(model)
            available, serving = self.available(model)
            out[model] = {
                "latest_policy": str(settings.latest),
                "latest_version": settings.latest.pick(available, serving),
                "version_labels": dict(settings.labels),
                "weights": {str(v): p for v, p in settings.weights.items()},
                "shadow": None if settings.shadow is None else {
                    "version": settings.shadow.version, "sample": settings.shadow.sample,
                    "max_inflight": settings.shadow.max_inflight},
                "priority": None if settings.priority is None else settings.priority.value,
                "batching": None if settings.batching is None else batching_view(
                    settings.batching),
                "versions": self.fleet_view(model),
            }
        return out

    def state_counts(self) -> dict[tuple[str, str, str], int]:
        """(model, version, state) -> replicas: the gauge's samples."""
        counts: dict[tuple[str, str, str], int] = {}
        for replica in self.pool.replicas.values():
            for model, versions in replica.versions.items():
                for version, state in versions.items():
                    key = (model, str(version), STATE_NAMES.get(state, str(state)))
                    counts[key] = counts.get(key, 0) + 1
        return counts
