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
from typing import TYPE_CHECKING

import grpc

from batchproxy.config import BatchingConfig
from batchproxy.errors import ProxyError
from batchproxy.priority import Priority
from batchproxy.protos import get_model_status_pb2, model_pb2

if TYPE_CHECKING:
    from batchproxy.fleet.slots import ReplicaPool

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
STATE_NAMES = {value.number: value.name for value in
               get_model_status_pb2.ModelVersionStatus.State.DESCRIPTOR.values}


@dataclass(frozen=True)
class LatestPolicy:
    """Which version a `latest` call gets while replicas disagree:
    `highest`: the highest version AVAILABLE on any healthy replica (TFS's rule per server);
    `share:F`: the newest version once it is AVAILABLE on at least F of the replicas that
    serve the model, else the highest one below it that is;
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

    def pick(self, available: Mapping[int, int], serving: int) -> int | None:
        """The version among `available` (version -> replicas holding it AVAILABLE), with
        `serving` replicas serving the model in all; None when nothing is available."""
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
                 seed: int | None = None) -> None:
        self.pool = pool
        self.listeners: list[Callable[[], None]] = []
        self._settings: Mapping[str, ModelSettings] = dict(settings or {})
        self.random = random.Random(seed)

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

    def available(self, model: str) -> tuple[dict[int, int], int]:
        """version -> healthy replicas where it is AVAILABLE, and how many healthy replicas
        serve the model at all (any version). Asked on every latest call: kept until the
        pool reports a change (ReplicaPool.derived)."""
        key = ("versions", model)
        cached = self.pool.derived.get(key)
        if cached is not None:
            return cached  # type: ignore[return-value]
        result = self._count(model)
        if len(self.pool.derived) < 4 * 256:  # model names come from clients
            self.pool.derived[key] = result
        return result

    def _count(self, model: str) -> tuple[dict[int, int], int]:
        counts: dict[int, int] = {}
        serving = 0
        for replica in self.pool.replicas.values():
            if not replica.serves(model):
                continue
            versions = replica.versions.get(model)
            if not versions:
                continue
            serving += 1
            for version, state in versions.items():
                if state == AVAILABLE:
                    counts[version] = counts.get(version, 0) + 1
        return counts, serving

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
                if draw < percent and version in available:
                    return version
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
