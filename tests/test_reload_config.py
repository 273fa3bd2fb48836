"""The proxy's model config and its reload, as real processes: HandleReloadConfigRequest
is answered by the proxy itself (its ModelServerConfig's version_labels apply fleet-wide),
SIGHUP and the poll re-read the files, and a bad file or config is refused with its line
while the old config stays. TFS has no REST form of the RPC, so gRPC is the only way in."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from grpc_client import float_tensor, status_request
from model_dirs import add_version
from procs import Process, start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy

from batchproxy.protos import (
    get_model_metadata_pb2,
    model_server_config_pb2,
    predict_pb2,
    services_pb2,
    services_pb2_grpc,
)

NAME = "my_mnist_model"
WAIT_S = 20.0


def labels_file(path: Path, labels: dict[str, int]) -> None:
    entries = "".join(f'    version_labels {{ key: "{k}" value: {v} }}\n'
                      for k, v in labels.items())
    path.write_text("model_config_list {\n  config {\n"
                    f'    name: "{NAME}"\n    base_path: "/models/{NAME}"\n'
                    f'    model_platform: "tensorflow"\n{entries}  }}\n}}\n')


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reload")
    base = root / NAME
    add_version(base, 1)
    add_version(base, 2, output_offset=1.0)
    labels_file(root / "models.config", {"stable": 1})
    (root / "proxy.toml").write_text(f"[models.{NAME}]\nlatest = \"pinned:1\"\n")
    return {"base": base, "models": root / "models.config", "proxy": root / "proxy.toml"}


@pytest.fixture(scope="module")
def proxy(files: dict[str, Path]) -> Iterator[Process]:
    flags = dict(model_name=NAME, model_base_path=files["base"], model_version_policy="all",
                 file_system_poll_wait_seconds=0.2)
    with start_replica("identity", **flags) as a, start_replica("identity", **flags) as b, \
            start_proxy([a, b], model_config_file=files["models"],
                        proxy_config_file=files["proxy"], health_interval_ms=200,
                        model_config_file_poll_wait_seconds=0.2) as proxy:
        yield proxy


def predict_version(proxy: Process, label: str | None = None) -> int:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = NAME
    if label is not None:
        request.model_spec.version_label = label
    request.inputs["x"].CopyFrom(float_tensor(np.ones((1, 3), dtype=np.float32)))
    with grpc.insecure_channel(proxy.address) as channel:
        response = services_pb2_grpc.PredictionServiceStub(channel).Predict(request,
                                                                            timeout=30)
    return response.model_spec.version.value


def eventually(check, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def reload(proxy: Process, config: model_server_config_pb2.ModelServerConfig | None):  # type: ignore[no-untyped-def]
    request = services_pb2.ReloadConfigRequest()
    if config is not None:
        request.config.CopyFrom(config)
    with grpc.insecure_channel(proxy.address) as channel:
        return services_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
            request, timeout=30)


def reload_codes(proxy: Process) -> dict[str, float]:
    text = requests.get(f"{proxy.rest_url}/metrics", timeout=10).text
    return {sample.labels["code"]: sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == "batchproxy_requests_total"
            and sample.labels["method"] == "HandleReloadConfigRequest"}


def config_with(labels: dict[str, int]) -> model_server_config_pb2.ModelServerConfig:
    config = model_server_config_pb2.ModelServerConfig()
    entry = config.model_config_list.config.add(name=NAME, base_path=f"/models/{NAME}")
    for key, value in labels.items():
        entry.version_labels[key] = value
    return config


def test_the_proxy_answers_reload_config_itself_and_labels_move(proxy: Process) -> None:
    eventually(lambda: predict_version(proxy, "stable") == 1, "stable is version 1")
    assert predict_version(proxy) == 1  # pinned:1 from the proxy's own file
    response = reload(proxy, config_with({"stable": 2}))
    assert response.status.error_code == 0
    assert predict_version(proxy, "stable") == 2  # at once: the next call
    with pytest.raises(grpc.RpcError) as raised:
        predict_version(proxy, "canary")
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "Unrecognized servable version label: canary"
    bad = model_server_config_pb2.ModelServerConfig()
    bad.custom_model_config.type_url = "x"
    with pytest.raises(grpc.RpcError) as refused:
        reload(proxy, bad)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "custom_model_config" in (refused.value.details() or "")
    assert predict_version(proxy, "stable") == 2  # the old config stays
    eventually(lambda: reload_codes(proxy) == {"OK": 1.0, "INVALID_ARGUMENT": 1.0},
               "reloads counted")


def test_sighup_and_the_poll_reread_the_files_and_a_bad_file_keeps_the_old(
        proxy: Process, files: dict[str, Path]) -> None:
    import signal
    reload(proxy, None)  # back to the files (a reload with no config re-reads them)
    assert predict_version(proxy, "stable") == 1
    files["proxy"].write_text(f"[models.{NAME}]\nlatest = \"pinned:2\"\n")
    eventually(lambda: predict_version(proxy) == 2, "the poll picked up pinned:2")
    files["proxy"].write_text(f"[models.{NAME}]\nlatest = \"pinned:1\"\nbogus = 3\n")
    proxy.signal(signal.SIGHUP)
    eventually(lambda: "line 3" in proxy.output() and "bogus" in proxy.output(),
               "the refusal names the line")
    assert predict_version(proxy) == 2  # the old config stays
    labels_file(files["models"], {"stable": 2})
    files["proxy"].write_text(f"[models.{NAME}]\nlatest = \"pinned:1\"\n")
    proxy.signal(signal.SIGHUP)
    eventually(lambda: predict_version(proxy, "stable") == 2 and predict_version(proxy) == 1,
               "SIGHUP reloaded both files")


def test_a_label_means_one_version_over_rest_and_in_forwarded_calls(
        proxy: Process) -> None:
    """The replicas know no labels (no labels.json): the proxy resolves them for REST
    predict calls, whose signature fetch (GetModelMetadata) names the label too."""
    reload(proxy, config_with({"stable": 1, "canary": 2}))
    for label, offset in (("stable", 0.0), ("canary", 1.0)):
        reply = requests.post(f"{proxy.rest_url}/v1/models/{NAME}/labels/{label}:predict",
                              json={"instances": [[1.0, 2.0, 3.0]]}, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["predictions"] == [[1.0 + offset, 2.0 + offset, 3.0 + offset]]
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = NAME
    request.model_spec.version_label = "canary"
    with grpc.insecure_channel(proxy.address) as channel:
        answer = services_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
            request, timeout=30)
    assert answer.model_spec.version.value == 2
    reply = requests.post(f"{proxy.rest_url}/v1/models/{NAME}/labels/nope:predict",
                          json={"instances": [[1.0, 2.0, 3.0]]}, timeout=30)
    assert reply.status_code == 400
    assert reply.json() == {"error": "Unrecognized servable version label: nope"}
    reload(proxy, None)


def test_the_other_model_service_method_is_still_forwarded(proxy: Process) -> None:
    with grpc.insecure_channel(proxy.address) as channel:
        status = services_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            status_request(NAME), timeout=30)
    assert {s.version for s in status.model_version_status} == {1, 2}
