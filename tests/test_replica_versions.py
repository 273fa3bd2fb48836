"""The reference replica's versions from a model base path, as a real process: TFS's
roll-over (LOADING, AVAILABLE, UNLOADING, END), `latest` as the highest AVAILABLE version,
pending calls finishing on their version, roll-back, version policies, labels, REST status
and predict, failed loads, and the slow first call at each new batch size.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from grpc_client import float_tensor, to_array
from model_dirs import add_version, remove_version, set_labels
from procs import Process, start_replica

from batchproxy.protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
    services_pb2_grpc,
)

NAME = "my_mnist_model"
STATES = get_model_status_pb2.ModelVersionStatus.State
WAIT_S = 20.0  # bound on any wait for a poll to take effect, on a busy machine


def replica(base: Path, **flags: object) -> Process:
    flags.setdefault("file_system_poll_wait_seconds", 0.1)
    return start_replica("identity", model_name=NAME, model_base_path=base, **flags)


def predict(proc: Process, rows: int = 2, **spec: object) -> predict_pb2.PredictResponse:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = NAME
    if "version" in spec:
        req.model_spec.version.value = int(spec.pop("version"))  # type: ignore[call-overload]
    if "label" in spec:
        req.model_spec.version_label = str(spec.pop("label"))
    assert not spec
    req.inputs["x"].CopyFrom(float_tensor(np.ones((rows, 3), dtype=np.float32)))
    channel = grpc.insecure_channel(proc.address)
    try:
        return services_pb2_grpc.PredictionServiceStub(channel).Predict(req, timeout=30)
    finally:
        channel.close()


def predict_error(proc: Process, **spec: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        predict(proc, **spec)
    return info.value


def states(proc: Process) -> dict[int, str]:
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = NAME
    channel = grpc.insecure_channel(proc.address)
    try:
        resp = services_pb2_grpc.ModelServiceStub(channel).GetModelStatus(req, timeout=10)
    finally:
        channel.close()
    return {s.version: STATES.Name(s.state) for s in resp.model_version_status}


def wait_for(what: Callable[[], bool], message: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not what():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S}s: {message}")
        time.sleep(0.05)


def test_roll_over_and_roll_back_as_tfs_does(tmp_path: Path) -> None:
    base = tmp_path / NAME
    add_version(base, 1)
    with replica(base) as proc:
        assert states(proc) == {1: "AVAILABLE"}
        resp = predict(proc)
        assert resp.model_spec.version.value == 1
        np.testing.assert_array_equal(to_array(resp.outputs["y"]), np.ones((2, 3)))

        # 0002 appears: it loads (LOADING for load_ms), then serves `latest`; 1 unloads.
        add_version(base, 2, load_ms=1500, output_offset=1.0)
        wait_for(lambda: states(proc).get(2) == "LOADING", "version 2 LOADING")
        assert states(proc)[1] == "AVAILABLE"  # still serving while 2 loads
        assert predict(proc).model_spec.version.value == 1
        wait_for(lambda: states(proc) == {2: "AVAILABLE", 1: "END"}, "2 AVAILABLE, 1 END")
        resp = predict(proc)
        assert resp.model_spec.version.value == 2
        np.testing.assert_array_equal(to_array(resp.outputs["y"]), np.full((2, 3), 2.0))
        err = predict_error(proc, version=1)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == f"Servable not found for request: Specific({NAME}, 1)"

        # Roll-back: removing 0002 brings 1 back, then 2 ends.
        remove_version(base, 2)
        wait_for(lambda: states(proc) == {2: "END", 1: "AVAILABLE"}, "1 back, 2 END")
        assert predict(proc).model_spec.version.value == 1


def test_status_lists_every_version_newest_first(tmp_path: Path) -> None:
    base = tmp_path / NAME
    add_version(base, 1)
    add_version(base, 3, folder_name="3")
    with replica(base, model_version_policy="all") as proc:
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = NAME
        stub = services_pb2_grpc.ModelServiceStub(grpc.insecure_channel(proc.address))
        resp = stub.GetModelStatus(req, timeout=10)
        assert [s.version for s in resp.model_version_status] == [3, 1]
        req.model_spec.version.value = 1
        assert [s.version for s in stub.GetModelStatus(req).model_version_status] == [1]
        req.model_spec.version.value = 2
        with pytest.raises(grpc.RpcError) as info:
            stub.GetModelStatus(req)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == f"Could not find version 2 of model {NAME}"

        body = requests.get(f"{proc.rest_url}/v1/models/{NAME}", timeout=10).json()
        assert [(v["version"], v["state"]) for v in body["model_version_status"]] == [
            ("3", "AVAILABLE"), ("1", "AVAILABLE")]
        body = requests.get(f"{proc.rest_url}/v1/models/{NAME}/versions/3", timeout=10).json()
        assert body["model_version_status"][0]["status"]["error_code"] == "OK"
        assert requests.get(f"{proc.rest_url}/v1/models/{NAME}/versions/2",
                            timeout=10).status_code == 404


def test_pending_call_finishes_on_the_version_it_started_on(tmp_path: Path) -> None:
    base = tmp_path / NAME
    add_version(base, 1, batch_cost_ms=3000)
    with replica(base) as proc:
        answers: list[predict_pb2.PredictResponse] = []
        pending = threading.Thread(target=lambda: answers.append(predict(proc)))
        pending.start()
        try:
            time.sleep(0.3)  # the call is on the device; version 2 arrives meanwhile
            add_version(base, 2)
            wait_for(lambda: states(proc).get(1) == "UNLOADING" or not pending.is_alive(),
                     "version 1 UNLOADING while its call is pending")
            # New calls go to 2 (it runs on the same simulated device, so after the
            # pending call: not asserted on time).
            assert states(proc)[2] == "AVAILABLE"
        finally:
            pending.join(60)
        assert answers and answers[0].model_spec.version.value == 1
        wait_for(lambda: states(proc)[1] == "END", "version 1 END once its call answered")
        assert predict(proc).model_spec.version.value == 2


def test_specific_versions_and_labels(tmp_path: Path) -> None:
    base = tmp_path / NAME
    add_version(base, 1)
    add_version(base, 2, output_offset=1.0)
    set_labels(base, {"stable": 1, "canary": 2})
    with replica(base, model_version_policy="all") as proc:
        assert states(proc) == {2: "AVAILABLE", 1: "AVAILABLE"}
        assert predict(proc).model_spec.version.value == 2  # latest: the highest
        assert predict(proc, version=1).model_spec.version.value == 1
        assert predict(proc, label="stable").model_spec.version.value == 1
        resp = predict(proc, label="canary")
        assert resp.model_spec.version.value == 2
        np.testing.assert_array_equal(to_array(resp.outputs["y"]), np.full((2, 3), 2.0))
        err = predict_error(proc, label="nightly")
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == "Unrecognized servable version label: nightly"
        err = predict_error(proc, version=7)
        assert err.code() == grpc.StatusCode.NOT_FOUND

        # labels.json is re-read on every poll.
        set_labels(base, {"stable": 2})
        wait_for(lambda: predict(proc, label="stable").model_spec.version.value == 2,
                 "label moved to 2")

        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name = NAME
        req.model_spec.version.value = 1
        stub = services_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(proc.address))
        assert stub.GetModelMetadata(req, timeout=10).model_spec.version.value == 1

        # REST predict resolves versions and labels the same way.
        url = f"{proc.rest_url}/v1/models/{NAME}"
        body = {"instances": [[1.0, 1.0]]}
        resp = requests.post(f"{url}:predict", json=body, timeout=10)
        assert resp.status_code == 200 and resp.json() == {"predictions": [[2.0, 2.0]]}
        resp = requests.post(f"{url}/versions/1:predict", json=body, timeout=10)
        assert resp.json() == {"predictions": [[1.0, 1.0]]}
        resp = requests.post(f"{url}/labels/stable:predict",
                             json={"inputs": {"x": [[0.5]]}}, timeout=10)
        assert resp.json() == {"outputs": [[1.5]]}
        resp = requests.post(f"{url}/labels/nightly:predict", json=body, timeout=10)
        assert resp.status_code == 400
        assert resp.json() == {"error": "Unrecognized servable version label: nightly"}
        resp = requests.post(f"{url}/versions/7:predict", json=body, timeout=10)
        assert resp.status_code == 404
        assert resp.json() == {"error": f"Servable not found for request: Specific({NAME}, 7)"}
        resp = requests.post(f"{url}:predict", json={"instances": [["a"]]}, timeout=10)
        assert resp.status_code == 400

        # A specific-version policy keeps only what it names.
    with replica(base, model_version_policy="specific:1") as proc:
        assert states(proc) == {1: "AVAILABLE"}
        assert predict(proc).model_spec.version.value == 1


def test_bad_version_fails_its_load_alone(tmp_path: Path) -> None:
    base = tmp_path / NAME
    add_version(base, 1)
    with replica(base, model_version_policy="all") as proc:
        add_version(base, 2, model="no-such-model")
        wait_for(lambda: states(proc).get(2) == "END", "version 2 END after a failed load")
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = NAME
        req.model_spec.version.value = 2
        stub = services_pb2_grpc.ModelServiceStub(grpc.insecure_channel(proc.address))
        status = stub.GetModelStatus(req, timeout=10).model_version_status[0].status
        assert status.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "no-such-model" in status.error_message
        assert predict(proc).model_spec.version.value == 1


def test_empty_base_path_serves_nothing_until_a_version_appears(tmp_path: Path) -> None:
    base = tmp_path / NAME
    base.mkdir()
    with replica(base) as proc:
        err = predict_error(proc)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.details() == f"Servable not found for request: Latest({NAME})"
        add_version(base, 1)
        wait_for(lambda: states_or_none(proc) == {1: "AVAILABLE"}, "version 1 AVAILABLE")
        assert predict(proc).model_spec.version.value == 1


def states_or_none(proc: Process) -> dict[int, str] | None:
    try:
        return states(proc)
    except grpc.RpcError:
        return None


def test_first_call_at_each_new_batch_size_is_slow(tmp_path: Path) -> None:
    delay_s = 1.0
    base = tmp_path / NAME
    add_version(base, 1, first_call_at_new_batch_size_ms=delay_s * 1e3)
    with replica(base) as proc:

        def timed(rows: int) -> float:
            start = time.perf_counter()
            predict(proc, rows=rows)
            return time.perf_counter() - start

        assert timed(3) >= delay_s
        assert timed(3) < delay_s  # traced once: a plain identity call now
        assert timed(5) >= delay_s  # a new batch size traces again


def test_version_folders_policies_and_options(tmp_path: Path) -> None:
    from batchproxy.replica.models import ReplicaError
    from batchproxy.replica.versions import VersionPolicy, read_options, version_folders

    base = tmp_path / NAME
    add_version(base, 1)
    add_version(base, 12, folder_name="12")
    (base / "3").mkdir()  # no replica.json yet: not a version
    (base / "²").mkdir()  # a digit, but not an ASCII one
    (base / "²" / "replica.json").write_text("{}")
    (base / "notes").mkdir()
    assert sorted(version_folders(base)) == [1, 12]

    assert VersionPolicy.parse("latest").aspired([1, 12, 5]) == {12}
    assert VersionPolicy.parse("latest:2").aspired([1, 12, 5]) == {12, 5}
    assert VersionPolicy.parse("all").aspired([1, 12]) == {1, 12}
    assert VersionPolicy.parse("specific:1,7").aspired([1, 12]) == {1}
    for bad in ("latest:0", "newest", "specific:", "all:2", "specific:a"):
        with pytest.raises(ValueError, match="model version policy"):
            VersionPolicy.parse(bad)

    folder = add_version(base, 4, batch_cost_ms=-1)
    with pytest.raises(ReplicaError, match="batch_cost_ms must be a number >= 0"):
        read_options(folder)
    folder = add_version(base, 5, colour="blue")
    with pytest.raises(ReplicaError, match="unknown keys"):
        read_options(folder)
    (folder / "replica.json").write_text("{not json")
    with pytest.raises(ReplicaError, match=r"replica\.json"):
        read_options(folder)
