"""Per-model configuration, from two files, and its reload.

`--model_config_file` is TFS's own: a text-format ModelServerConfig
(`model_config_list { config { name: "m" version_labels { key: "stable" value: 1 } } }`),
parsed by protobuf's text_format against TFS's message, so a file TFS reads reads here and
a misspelt field is refused naming its line. The proxy takes each model's name and
version_labels from it; base_path, model_platform, model_version_policy, logging_config
are the replicas': each (re)load logs, once, which of them the file sets, as "left to
the replicas", so they are not taken for settings the proxy applies.

`--proxy_config_file` holds what TFS has no field for, in TOML (tomllib, no dependency):

    [models.my_mnist_model]
    latest = "share:0.5"        # highest (default) | share:F | pinned:N
    weights = { "2" = 10 }      # percent of latest calls per version (a canary)
    shadow = { version = 2, sample = 0.1, max_inflight = 2 }
    latency_slo_ms = 50         # this model's latency objective (--latency_slo_ms's role)
    priority = "sheddable"      # the class of its calls that name none (default critical)

    [models.my_mnist_model.batching]   # each key as its flag; the flags are the defaults
    max_batch_size = 64
    batch_timeout_micros = 1000
    allowed_batch_sizes = [8, 16, 32, 64]
    padding_policy = "min_cost"
    variable_length_inputs = { tokens = 0 }
    length_buckets = [32, 64, 128, 256]
    length_following_outputs = { token_scores = "1=tokens" }

Both are read again on SIGHUP, every `--model_config_file_poll_wait_seconds` when the
files changed, and on ModelService/HandleReloadConfigRequest (whose ModelServerConfig takes
the TFS file's place). A file that does not parse, or holds a bad value, is refused with its
line and the settings in force stay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from batchproxy.config import PADDING_POLICIES, BatchingConfig
from batchproxy.fleet.versions import LatestPolicy, ModelSettings, ShadowSettings
from batchproxy.priority import Priority
from batchproxy.protos import model_server_config_pb2

log = logging.getLogger(__name__)

_LOCATION = re.compile(r"^\d+:\d+ : ")
PROXY_KEYS = ("latest", "weights", "shadow", "latency_slo_ms", "priority", "batching")
BATCHING_KEYS = ("max_batch_size", "batch_timeout_micros", "allowed_batch_sizes",
                 "padding_policy", "variable_length_inputs", "length_buckets",
                 "length_following_outputs")
SHADOW_KEYS = ("version", "sample", "max_inflight")


class ConfigError(ValueError):
    """A config file refused: the message names the file and line."""


def read_model_server_config(text: str, source: str) -> model_server_config_pb2.ModelServerConfig:
    message = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as err:
        detail = _LOCATION.sub("", str(err))
        where = f"{source}, line {err.GetLine()}" if err.GetLine() else source
        raise ConfigError(f"{where}: not a valid ModelServerConfig: {detail}") from None
    return message


def labels_of(message: model_server_config_pb2.ModelServerConfig,
              source: str) -> dict[str, dict[str, int]]:
    """model name -> version_labels, from a ModelServerConfig."""
    if message.HasField("custom_model_config"):
        raise ConfigError(f"{source}: custom_model_config is not supported; "
                          "use model_config_list")
    out: dict[str, dict[str, int]] = {}
    for config in message.model_config_list.config:
        if not config.name:
            raise ConfigError(f"{source}: a config without a name")
        if config.name in out:
            raise ConfigError(f"{source}: model '{config.name}' is configured twice")
        out[config.name] = dict(config.version_labels)
    return out


# The ModelConfig fields the proxy acts on; the others (base_path, model_platform,
# model_version_policy, logging_config, ...) are the replicas' business.
ACTED_ON = frozenset(("name", "version_labels"))


def left_to_replicas(message: model_server_config_pb2.ModelServerConfig) -> dict[str, list[str]]:
    """model name -> the fields set in its config that the proxy does not act on: logged at
    each (re)load, so that nobody takes them for settings the proxy applies."""
    out: dict[str, list[str]] = {}
    for config in message.model_config_list.config:
        fields = [descriptor.name for descriptor, _ in config.ListFields()
                  if descriptor.name not in ACTED_ON]
        if fields:
            out[config.name] = fields
    return out


def _line_of(text: str, pattern: str) -> int:
    """The first line matching `pattern` (1-based), 0 when none: a TOML value's line, which
    tomllib does not report past parsing."""
    regex = re.compile(pattern)
    for number, line in enumerate(text.splitlines(), 1):
        if regex.search(line):
            return number
    return 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def batching_overrides(table: Any) -> dict[str, Any]:
    """A `[models.NAME.batching]` table as BatchingConfig fields; ValueError names the key
    (its first word) and what it should be."""
    if not isinstance(table, dict):
        raise ValueError("expected a table [models.NAME.batching] or { KEY = VALUE, ... }")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in BATCHING_KEYS:
            raise ValueError(f"{key}: unknown batching key; known: {', '.join(BATCHING_KEYS)}")
        if key in ("max_batch_size", "batch_timeout_micros"):
            if not _is_int(value):
                raise ValueError(f"{key}: expected an integer, got {value!r}")
            out[key] = value
        elif key in ("allowed_batch_sizes", "length_buckets"):
            if not isinstance(value, list) or not all(_is_int(size) for size in value):
                raise ValueError(f"{key}: expected a list of integers, got {value!r}")
            out[key] = tuple(value)
        elif key == "padding_policy":
            if value not in PADDING_POLICIES:
                raise ValueError(f"{key}: {value!r} is not one of "
                                 f"{', '.join(PADDING_POLICIES)}")
            out[key] = value
        elif key == "variable_length_inputs":
            if not isinstance(value, dict) or not all(
                    isinstance(pad, (int, float, str)) and not isinstance(pad, bool)
                    for pad in value.values()):
                raise ValueError(f"{key}: expected {{ INPUT = PAD_VALUE, ... }}, a number or "
                                 f"a string each, got {value!r}")
            out[key] = tuple((name, pad if isinstance(pad, str) else float(pad))
                             for name, pad in value.items())
        else:  # length_following_outputs: { OUTPUT = "AXIS=INPUT" }
            if not isinstance(value, dict):
                raise ValueError(f"{key}: expected {{ OUTPUT = \"AXIS=INPUT\", ... }}")
            following = []
            for output, spec in value.items():
                axis, eq, name = str(spec).partition("=")
                if not eq:
                    axis, name = "1", str(spec)
                if not name or not axis.strip().isdigit():
                    raise ValueError(f"{key}: {output} = {spec!r} is not \"AXIS=INPUT\" "
                                     "(or \"INPUT\", axis 1)")
                following.append((output, int(axis), name.strip()))
            out[key] = tuple(following)
    if "allowed_batch_sizes" in out and out["allowed_batch_sizes"] \
            and "max_batch_size" not in out:
        # TFS's rule: the last allowed size is the largest batch.
        out["max_batch_size"] = out["allowed_batch_sizes"][-1]
    return out


def parse_proxy_config(text: str, source: str,
                       defaults: BatchingConfig | None = None) -> dict[str, dict[str, Any]]:
    """model name -> {latest: LatestPolicy, weights: {version: percent},
    shadow: ShadowSettings | None, latency_slo_ms, priority, batching: BatchingConfig |
    None}. `defaults`: the batching flags, which a model's batching table amends."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from None

    def refuse(model: str, key: str, why: str) -> ConfigError:
        header = _line_of(text, rf"^\s*\[\s*models\.\"?{re.escape(model)}\"?\s*\]")
        line = 0
        if header:
            after = _line_of("\n".join(text.splitlines()[header:]),
                             rf"^\s*{re.escape(key)}\s*=") if key else 0
            line = header + after if after else header
        where = f"{source}, line {line}" if line else source
        return ConfigError(f"{where}: model '{model}': {why}")

    def refuse_batching(model: str, key: str, why: str) -> ConfigError:
        """The key's line under [models.NAME.batching]; else an inline `batching = {...}`."""
        name = rf"\"?{re.escape(model)}\"?"
        header = _line_of(text, rf"^\s*\[\s*models\.{name}\.batching\s*\]")
        if not header:
            return refuse(model, "batching", f"batching: {why}")
        after = _line_of("\n".join(text.splitlines()[header:]), rf"^\s*{re.escape(key)}\s*=")
        line = header + after if key and after else header
        return ConfigError(f"{source}, line {line}: model '{model}': batching: {why}")

    unknown = set(data) - {"models"}
    if unknown:
        first = sorted(unknown)[0]
        line = _line_of(text, rf"^\s*(\[\s*)?{re.escape(first)}\b")
        raise ConfigError(f"{source}, line {line}: unknown table or key '{first}'; "
                          "settings go under [models.NAME]")
    out: dict[str, dict[str, Any]] = {}
    for model, table in data.get("models", {}).items():
        if not isinstance(table, dict):
            raise refuse(model, "", "expected a table [models.NAME]")
        for key in table:
            if key not in PROXY_KEYS:
                raise refuse(model, key, f"unknown key '{key}'; known: {', '.join(PROXY_KEYS)}")
        settings: dict[str, Any] = {}
        try:
            settings["latest"] = LatestPolicy.parse(str(table.get("latest", "highest")))
        except ValueError as err:
            raise refuse(model, "latest", str(err)) from None
        weights: dict[int, float] = {}
        for version, percent in dict(table.get("weights", {})).items():
            try:
                number, share = int(version), float(percent)
            except (TypeError, ValueError):
                raise refuse(model, "weights", f"weight {version!r} = {percent!r}: expected "
                             "\"VERSION\" = PERCENT") from None
            if number < 0 or not 0 <= share <= 100:
                raise refuse(model, "weights", f"weight for version {version}: a percent "
                             "between 0 and 100 for a version >= 0")
            weights[number] = share
        if sum(weights.values()) > 100:
            raise refuse(model, "weights", "weights add up to more than 100 percent")
        settings["weights"] = weights
        shadow = table.get("shadow")
        settings["shadow"] = None
        if shadow is not None:
            if not isinstance(shadow, dict) or "version" not in shadow \
                    or set(shadow) - set(SHADOW_KEYS):
                raise refuse(model, "shadow", "expected { version = N, sample = F, "
                             "max_inflight = N }")
            try:
                settings["shadow"] = ShadowSettings(
                    int(shadow["version"]), float(shadow.get("sample", 0.1)),
                    int(shadow.get("max_inflight", 2)))
            except (TypeError, ValueError):
                raise refuse(model, "shadow", "version and max_inflight are integers, "
                             "sample a number") from None
            s = settings["shadow"]
            if not 0 <= s.sample <= 1 or s.max_inflight < 1:
                raise refuse(model, "shadow", "sample is between 0 and 1, max_inflight at "
                             "least 1")
        slo = table.get("latency_slo_ms")
        if slo is not None and (isinstance(slo, bool) or not isinstance(slo, (int, float))
                                or slo < 0):
            raise refuse(model, "latency_slo_ms", "a number of milliseconds >= 0")
        settings["latency_slo_ms"] = None if slo is None else float(slo)
        priority = table.get("priority")
        settings["priority"] = None
        if priority is not None:
            try:
                settings["priority"] = Priority(priority)
            except ValueError:
                raise refuse(model, "priority", f"priority {priority!r}: expected "
                             "'critical' or 'sheddable'") from None
        settings["batching"] = None
        if "batching" in table:
            try:
                overrides = batching_overrides(table["batching"])
                settings["batching"] = replace(defaults or BatchingConfig(), **overrides)
            except ValueError as err:
                message = str(err)
                # Each message starts with the key it is about.
                key = message.split(":", 1)[0].split()[0] if message else ""
                if key == "max_enqueued_rows":
                    key = "max_batch_size"
                raise refuse_batching(model, key, message) from None
        out[model] = settings
    return out


def combine(labels: Mapping[str, Mapping[str, int]],
            ours: Mapping[str, Mapping[str, Any]]) -> dict[str, ModelSettings]:
    settings: dict[str, ModelSettings] = {}
    for model in set(labels) | set(ours):
        extra = ours.get(model, {})
        settings[model] = ModelSettings(
            labels=dict(labels.get(model, {})),
            latest=extra.get("latest", LatestPolicy()),
            weights=dict(extra.get("weights", {})),
            shadow=extra.get("shadow"),
            latency_slo_ms=extra.get("latency_slo_ms"),
            batching=extra.get("batching"),
            priority=extra.get("priority"))
    return settings


@dataclass
class ConfigFiles:
    """The two files, read into settings. `override`: a ModelServerConfig given by
    HandleReloadConfigRequest, which stands for the TFS file. `batching`: the batching
    flags, the defaults each model's batching table amends."""

    model_config_file: str | None = None
    proxy_config_file: str | None = None
    override: model_server_config_pb2.ModelServerConfig | None = None
    batching: BatchingConfig | None = None
    # Set by load(): per model, the fields of the TFS file the proxy does not act on.
    left: dict[str, list[str]] = field(default_factory=dict, compare=False)

    def load(self) -> dict[str, ModelSettings]:
        labels: dict[str, dict[str, int]] = {}
        self.left = {}
        if self.override is not None:
            labels = labels_of(self.override, "HandleReloadConfigRequest")
            self.left = left_to_replicas(self.override)
        elif self.model_config_file:
            text = _read(self.model_config_file)
            message = read_model_server_config(text, self.model_config_file)
            labels = labels_of(message, self.model_config_file)
            self.left = left_to_replicas(message)
        ours: dict[str, dict[str, Any]] = {}
        if self.proxy_config_file:
            ours = parse_proxy_config(_read(self.proxy_config_file), self.proxy_config_file,
                                      self.batching)
        return combine(labels, ours)

    def stamp(self) -> tuple[tuple[float, int] | None, ...]:
        """What the poll compares: each file's mtime and size."""
        return tuple(_stamp(path) for path in (self.model_config_file, self.proxy_config_file))


def _log_left(files: ConfigFiles) -> None:
    left = files.left
    if left:
        log.info("model config: fields left to the replicas (the proxy does not act on "
                 "them): %s", "; ".join(f"{model}: {', '.join(fields)}"
                                        for model, fields in sorted(left.items())))


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read: {err.strerror}") from None


def _stamp(path: str | None) -> tuple[float, int] | None:
    if not path:
        return None
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_mtime, stat.st_size


Apply = Callable[[dict[str, ModelSettings]], None]


class ConfigReloader:
    """Reads the files at start (a bad file stops start-up), then again on reload() (SIGHUP,
    HandleReloadConfigRequest) and when the poll sees them change. A bad file is logged and
    refused; the settings in force stay."""

    def __init__(self, files: ConfigFiles, apply: Apply, poll_s: float = 0.0) -> None:
        self.files = files
        self.apply = apply
        self.poll_s = poll_s
        self._stamp = files.stamp()
        self.reloads = 0
        apply(files.load())
        _log_left(files)

    def reload(self, override: model_server_config_pb2.ModelServerConfig | None = None) -> None:
        """Read and apply; ConfigError (and nothing changed) when a file is refused.
        `override`: HandleReloadConfigRequest's ModelServerConfig, which stands for the TFS
        file until the next reload without one (SIGHUP, the poll seeing a change, an empty
        request), as TFS's own poll overwrites what the RPC set."""
        files = self.files
        candidate = ConfigFiles(files.model_config_file, files.proxy_config_file, override,
                                files.batching)
        stamp = files.stamp()
        try:
            settings = candidate.load()
        except ConfigError as err:
            log.error("model config reload refused, the old config stays: %s", err)
            raise
        self.files = candidate
        self._stamp = stamp
        self.apply(settings)
        self.reloads += 1
        log.info("model config reloaded: %s", ", ".join(sorted(settings)) or "no models")
        _log_left(candidate)

    def reload_logged(self) -> None:
        with contextlib.suppress(ConfigError):
            self.reload()

    async def run(self) -> None:
        """The poll: every poll_s, reload when a file's mtime or size changed."""
        while True:
            await asyncio.sleep(self.poll_s)
            if self.files.stamp() != self._stamp:
                self._stamp = self.files.stamp()
                self.reload_logged()
