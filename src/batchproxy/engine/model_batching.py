"""Each model's batching, as the scheduler uses it: the flags, or the model's own
`[models.NAME.batching]` table from --proxy_config_file (model_config.py), made once into
the objects a batch needs (padding policy, length handling) and kept per model until a
reload replaces the settings.

A queue holds the `ModelBatching` its calls were queued under, so a reload never changes
the batches of calls already waiting: they leave under the old settings, and calls queued
after it wait in a queue of their own (scheduler.py)."""

from __future__ import annotations

from collections.abc import Sequence

from batchproxy.config import BatchingConfig
from batchproxy.engine.lengths import Lengths
from batchproxy.engine.padding import Padding
from batchproxy.fleet.versions import NO_SETTINGS, ModelSettings, VersionRouter
from batchproxy.priority import Priority


class ModelBatching:
    """One model's batching settings and what is derived from them."""

    __slots__ = ("config", "full", "lengths", "padding", "priority", "slo_ms", "timeout_s")

    def __init__(self, config: BatchingConfig, priority: Priority = Priority.CRITICAL,
                 slo_ms: float | None = None) -> None:
        self.config = config
        self.full = config.max_batch_size
        self.timeout_s = config.batch_timeout_s
        self.padding = Padding(config)
        self.lengths = Lengths(config) if config.variable_length_inputs else None
        # The class of the model's calls that name none, and its latency objective (None:
        # the flag's).
        self.priority = priority
        self.slo_ms = slo_ms

    def same(self, config: BatchingConfig, priority: Priority, slo_ms: float | None) -> bool:
        return (config == self.config and priority is self.priority
                and slo_ms == self.slo_ms)

    @property
    def batch_sizes(self) -> Sequence[int]:
        """Every batch size the proxy may send a replica for this model: its allowed sizes
        (batches are padded to one), else any size up to max_batch_size."""
        return self.config.allowed_batch_sizes or range(1, self.full + 1)


class BatchingTable:
    """model -> ModelBatching, derived on a model's first call and kept until the router's
    settings are replaced (it tells the table). What an unchanged model had is kept across
    a reload, so its queues, and the padding policy's state, go on as they were. A call's
    lookup is one dict lookup."""

    def __init__(self, defaults: BatchingConfig, versions: VersionRouter | None) -> None:
        self.defaults = defaults
        self.versions = versions
        self.default = ModelBatching(defaults)
        self._models: dict[str, ModelBatching] = {}
        if versions is not None:
            versions.listeners.append(self._refresh)

    def of(self, model: str) -> ModelBatching:
        found = self._models.get(model)
        if found is None:
            found = self._derive(model)
        return found

    def _derive(self, model: str) -> ModelBatching:
        versions = self.versions
        found = self.default if versions is None else self._make(versions.settings_of(model))
        if len(self._models) < MAX_MODELS:  # model names come from clients
            self._models[model] = found
        return found

    def _make(self, settings: ModelSettings, old: ModelBatching | None = None) -> ModelBatching:
        if settings is NO_SETTINGS:
            return self.default
        config = settings.batching or self.defaults
        priority = settings.priority or Priority.CRITICAL
        for kept in (old, self.default):
            if kept is not None and kept.same(config, priority, settings.latency_slo_ms):
                return kept
        return ModelBatching(config, priority, settings.latency_slo_ms)

    def _refresh(self) -> None:
        versions = self.versions
        assert versions is not None
        self._models = {model: self._make(versions.settings_of(model), old)
                        for model, old in self._models.items()}


# Models whose batching is kept derived at once; past it (a client sending many unknown
# names), unconfigured ones share the defaults' object and others are derived per call.
MAX_MODELS = 1024
