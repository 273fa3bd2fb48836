"""Settings of a proxy process, from flags or a TFS batching_parameters file
(batching_file.py)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

# Hedges as a share of batches sent, where hedging is on by default (engine/hedging.py).
DEFAULT_HEDGE_PERCENT = 5.0


PADDING_POLICIES = ("pad_up", "batch_down", "min_cost")


def check_allowed_batch_sizes(sizes: tuple[int, ...], max_batch_size: int) -> None:
    """TFS's rule for allowed_batch_sizes, with its reason when it is broken."""
    if not sizes:
        return
    if any(size < 1 for size in sizes):
        raise ValueError(f"allowed_batch_sizes {list(sizes)}: every size must be positive")
    if any(b <= a for a, b in itertools.pairwise(sizes)):
        raise ValueError(f"allowed_batch_sizes {list(sizes)} must be strictly increasing")
    if sizes[-1] != max_batch_size:
        raise ValueError(f"allowed_batch_sizes {list(sizes)}: the last entry must equal "
                         f"max_batch_size ({max_batch_size})")


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 32
    batch_timeout_micros: int = 2000
    # Bound on rows waiting in all queues together; beyond it callers get UNAVAILABLE at once.
    max_enqueued_rows: int = 3200
    # Bound on the bytes those rows hold (one row may be 256 MiB); the first call always fits.
    max_enqueued_bytes: int = 1 << 30
    # Bound on unbatched calls (metadata, status, classify, ...) in flight at once.
    max_forwarded_calls: int = 1024
    # The flush policy (engine/policy.py): "adaptive" plans with learned costs; "fixed" is
    # TFS's rule.
    policy: str = "adaptive"
    # Hedges (engine/hedging.py) as a percentage of batches sent; 0 turns hedging off. None:
    # on (5 %) with the adaptive policy, off with "fixed", which keeps TFS's behaviour.
    hedge_budget_percent: float | None = None
    # A latency objective for every call (0: none): admission refuses at once a call the
    # queue ahead would keep past it, as it does one past its own deadline.
    latency_slo_ms: float = 0.0
    # TFS's allowed_batch_sizes: a batch is padded up to the next of these (strictly
    # increasing, the last equal to max_batch_size); empty: any size up to max_batch_size.
    allowed_batch_sizes: tuple[int, ...] = ()
    # What a batch between two allowed sizes does (engine/padding.py): "pad_up" (TFS),
    # "batch_down" or "min_cost". These are the flags' values; a model's batching table in
    # the proxy config file gives it its own (model_config.py, engine/model_batching.py).
    padding_policy: str = "pad_up"
    # Variable-length batching (engine/lengths.py), opt-in per input: (input name, pad
    # value) pairs whose dimension 1 may differ between calls that share a batch, the
    # length buckets that bound which lengths share one, and (output, axis, input) triples:
    # that output's dimension `axis` follows the input's length and is cut back per caller.
    variable_length_inputs: tuple[tuple[str, float | str], ...] = ()
    length_buckets: tuple[int, ...] = ()
    length_following_outputs: tuple[tuple[str, int, str], ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.batch_timeout_micros < 0:
            raise ValueError("batch_timeout_micros must not be negative")
        if self.max_enqueued_rows < self.max_batch_size:
            raise ValueError("max_enqueued_rows must be at least max_batch_size")
        if self.max_enqueued_bytes < 1 or self.max_forwarded_calls < 1:
            raise ValueError("max_enqueued_bytes and max_forwarded_calls must be positive")
        if self.hedge_budget_percent is not None and not 0 <= self.hedge_budget_percent <= 100:
            raise ValueError("hedge_budget_percent must be between 0 and 100")
        if self.latency_slo_ms < 0:
            raise ValueError("latency_slo_ms must not be negative")
        check_allowed_batch_sizes(self.allowed_batch_sizes, self.max_batch_size)
        if any(b <= a for a, b in itertools.pairwise(self.length_buckets)) or any(
                size < 1 for size in self.length_buckets):
            raise ValueError(f"length_buckets {list(self.length_buckets)} must be positive "
                             "and strictly increasing")
        variable = {name for name, _ in self.variable_length_inputs}
        for output, axis, name in self.length_following_outputs:
            if name not in variable or axis < 1:
                raise ValueError(f"length_following_outputs {output}:{axis}={name}: the input "
                                 "must be one of --variable_length_inputs and the axis at "
                                 "least 1")
        if self.padding_policy not in PADDING_POLICIES:
            raise ValueError(f"padding_policy must be one of {', '.join(PADDING_POLICIES)}")

    @property
    def batch_timeout_s(self) -> float:
        return self.batch_timeout_micros / 1e6

    @property
    def hedge_percent(self) -> float:
        if self.hedge_budget_percent is not None:
            return self.hedge_budget_percent
        return DEFAULT_HEDGE_PERCENT if self.policy == "adaptive" else 0.0


@dataclass(frozen=True)
class ProxyConfig:
    port: int = 8500
    rest_api_port: int = 8501
    host: str = "0.0.0.0"
    replicas: tuple[str, ...] = ()
    local_replicas: int = 2
    local_replica_model: str = "demo"
    model_name: str = "default"
    max_inflight_per_replica: int = 2
    # Upper bound for a replica call when the caller set no deadline.
    replica_timeout_s: float = 30.0
    # Largest REST request body, after gzip decompression too; beyond it callers get 413.
    rest_max_body_bytes: int = 64 << 20
    replicas_dns: tuple[str, ...] = ()  # NAME:PORT, every address of NAME is a replica
    dns_refresh_s: float = 5.0
    dns_server: str | None = None  # HOST:PORT; default: the system resolver
    health_interval_ms: int = 1000
    eject_after_failures: int = 2
    # Models to health-check from the start; models seen in traffic are added.
    health_check_models: tuple[str, ...] = ()
    drain_timeout_s: float = 20.0
    monitoring_port: int = 0  # 0: metrics only on the REST port
    monitoring_host: str = "0.0.0.0"
    workers: int = 1
    # Limits on what one client may send.
    max_message_bytes: int = 256 << 20
    max_rows_per_request: int = 1 << 16
    max_rank: int = 32
    # TLS: TFS's SSLConfig text file for the serving ports; CA/cert/key towards replicas.
    ssl_config_file: str | None = None
    replica_ca: str | None = None
    replica_cert: str | None = None
    replica_key: str | None = None
    auth_token_file: str | None = None
    # A slow REST sender cannot hold a connection forever.
    rest_header_timeout_s: float = 30.0
    rest_body_timeout_s: float = 30.0
    # Warm-up (fleet/warmup.py): replicas and new versions get one batch at each batch
    # size before real calls; from TFS warm-up records when a file is given.
    warmup: bool = True
    warmup_requests_file: str | None = None
    # Per-model config (model_config.py): TFS's ModelServerConfig text file, the proxy's
    # own TOML settings, and how often to look for changes (0: only SIGHUP and the RPC).
    model_config_file: str | None = None
    proxy_config_file: str | None = None
    model_config_file_poll_wait_seconds: float = 0.0
    batching: BatchingConfig = field(default_factory=BatchingConfig)

