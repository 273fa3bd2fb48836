"""Logs: a start-up banner with the settings in force, one line per replica state change,
and `--log_format json` for structured logs."""

from __future__ import annotations

import json
import logging
import time

from procs import start_replica
from proxy_procs import start_proxy

from batchproxy.logs import JsonFormatter


def test_json_formatter_writes_one_object_per_record():
    record = logging.LogRecord("batchproxy", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "a b" and entry["level"] == "WARNING"
    assert entry["logger"] == "batchproxy"


def test_proxy_logs_banner_and_state_changes_as_json():
    replica = start_replica("identity")
    proxy = start_proxy([replica], log_format="json", health_interval_ms=200)
    try:
        # The first health check may finish after the ports open (a busy machine): let the
        # replica turn healthy before taking it away.
        deadline = time.monotonic() + 10
        while "joining -> healthy" not in proxy.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        replica.stop()
        deadline = time.monotonic() + 10
        while "-> ejected" not in proxy.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        output = proxy.output()
    finally:
        proxy.stop()
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]
    messages = [entry["message"] for entry in entries]
    banner = next(m for m in messages if m.startswith("batchproxy "))
    for setting in ("core=", "grpc_port=", "rest_api_port=", "replicas=[", "max_batch_size=",
                    "batch_timeout_micros="):
        assert setting in banner
    assert any("joining -> healthy" in m for m in messages)
    assert any("healthy -> ejected" in m for m in messages)
