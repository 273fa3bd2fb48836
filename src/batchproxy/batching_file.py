"""TFS's --batching_parameters_file: a text-format BatchingParameters message.

Parsed by protobuf's text_format against TFS's own message, so comments are comments, a
field given twice or a misspelt one is an error naming its line, and every field TFS
accepts is accepted. Fields that only steer TFS's own threads or padding are logged as
ignored rather than refused, so one file can serve TFS and the proxy alike."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from batchproxy.config import BatchingConfig
from batchproxy.protos import batching_parameters_pb2

log = logging.getLogger(__name__)

# Why each field the proxy reads but does not apply is set aside.
IGNORED = {
    "num_batch_threads": "batches run on the replicas; see --max_inflight_per_replica",
    "thread_pool_name": "the proxy has no batch thread pool",
    "enable_large_batch_splitting": "the proxy always cuts a call across batches",
    "max_execution_batch_size": "batches hold max_batch_size rows at most",
    "pad_variable_length_inputs": "see --variable_length_inputs: the proxy pads with a "
                                  "value set per input, never the first element",
}

# text_format's errors start with "LINE:COLUMN : "; the line is reported on its own.
_LOCATION = re.compile(r"^\d+:\d+ : ")


def read_batching_parameters(path: str | Path) -> batching_parameters_pb2.BatchingParameters:
    """The file as a message; ValueError naming the file and line of the first error."""
    message = batching_parameters_pb2.BatchingParameters()
    try:
        text_format.Parse(Path(path).read_text(), message)
    except text_format.ParseError as err:
        detail = _LOCATION.sub("", str(err))
        where = f"{path}, line {err.GetLine()}" if err.GetLine() else str(path)
        raise ValueError(f"{where}: not a valid BatchingParameters: {detail}") from None
    return message


def parse_batching_parameters(path: str | Path) -> dict[str, int]:
    """BatchingConfig's settings from the file: max_batch_size, batch_timeout_micros,
    allowed_batch_sizes, and max_enqueued_batches as a row bound (batches x
    max_batch_size)."""
    message = read_batching_parameters(path)
    present = {field.name for field, _ in message.ListFields()}
    for name in sorted(present & IGNORED.keys()):
        log.info("%s: %s ignored: %s", path, name, IGNORED[name])
    result: dict[str, Any] = {}
    if "max_batch_size" in present:
        result["max_batch_size"] = message.max_batch_size.value
    if "batch_timeout_micros" in present:
        result["batch_timeout_micros"] = message.batch_timeout_micros.value
    if message.allowed_batch_sizes:
        # Checked against max_batch_size once flags are applied (BatchingConfig).
        result["allowed_batch_sizes"] = tuple(message.allowed_batch_sizes)
    if "max_enqueued_batches" in present:
        batch = result.get("max_batch_size", BatchingConfig.max_batch_size)
        result["max_enqueued_rows"] = message.max_enqueued_batches.value * batch
    return result
