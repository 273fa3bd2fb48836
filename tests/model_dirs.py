"""Model base paths for the reference replica's versions (`--model_base_path`): numbered
version folders with a replica.json, written the way an operator exports a model, so a
replica polling the folder never sees half a version.

    base = tmp_path / "my_mnist_model"
    add_version(base, 1, model="identity", batch_cost_ms=5)
    with start_replica("identity", model_name="my_mnist_model", model_base_path=base,
                       model_version_policy="all") as replica: ...
    add_version(base, 2, output_offset=1.0)    # appears on the next poll
    remove_version(base, 2)                    # roll-back
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


def add_version(base: Path, version: int, folder_name: str | None = None,
                **options: Any) -> Path:
    """Write version `version` (folder `folder_name`, default zero-padded to 4 digits as
    the TFS tutorial's 0002) with a replica.json of `options`; returns the folder. The folder
    is built beside and renamed into place whole."""
    base.mkdir(parents=True, exist_ok=True)
    name = folder_name or f"{version:04d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=base))
    (staging / "replica.json").write_text(json.dumps(options))
    target = base / name
    os.rename(staging, target)
    return target


def remove_version(base: Path, version: int, folder_name: str | None = None) -> None:
    shutil.rmtree(base / (folder_name or f"{version:04d}"))


def set_labels(base: Path, labels: dict[str, int]) -> None:
    """DIR/labels.json, replaced whole."""
    staging = base / ".labels.json.tmp"
    staging.write_text(json.dumps(labels))
    os.replace(staging, base / "labels.json")


def _length_delimited(number: int, data: bytes) -> bytes:
    out, length = bytearray([(number << 3) | 2]), len(data)
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + data


def write_warmup_file(path: Path, requests: list[bytes]) -> None:
    """TFS's warm-up file (assets.extra/tf_serving_warmup_requests): a TFRecord of
    PredictionLog{predict_log: PredictLog{request}}, one record per serialized
    PredictRequest. The record CRCs are left zero: TFS checks them, batchproxy does not."""
    records = bytearray()
    for request in requests:
        log = _length_delimited(6, _length_delimited(1, request))
        records += len(log).to_bytes(8, "little") + bytes(4) + log + bytes(4)
    path.write_bytes(bytes(records))
