"""The reference replica's HTTP side: Prometheus metrics, TFS's REST model status and
metadata, and a small admin endpoint that changes the replica's state at runtime.

    GET  /monitoring/prometheus/metrics, /metrics   Prometheus text
    GET  /v1/models/<name>[/versions/<n>|/labels/<l>][/metadata]   TFS's JSON
    GET  /admin/state                               {"state": "AVAILABLE"}
    POST /admin/state {"state": S}                  S: START, LOADING, AVAILABLE,
         UNLOADING, END (what GetModelStatus reports; Predict gets NOT_FOUND unless
         AVAILABLE) or UNAVAILABLE (every RPC fails with UNAVAILABLE: a broken replica)

    POST /v1/models/<name>[/versions/<n>|/labels/<l>]:predict   TFS's JSON, row or
         columnar, typed by the signature of the version it resolves to

REST Classify and Regress answer 501: this replica serves them over gRPC only.
Development and test fixture only: not for production traffic.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from aiohttp import web
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST

from batchproxy.codec import dtypes
from batchproxy.errors import ProxyError
from batchproxy.frontends import rest_json
from batchproxy.protos import get_model_metadata_pb2, get_model_status_pb2, model_pb2
from batchproxy.replica.models import ReplicaError
from batchproxy.replica.service import ADMIN_STATES, ReplicaService

METRICS_PATHS = ("/monitoring/prometheus/metrics", "/metrics")
# TFS matches its REST routes case-insensitively.
MODEL_PATH = re.compile(
    r"^/v1/models(?:/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>-?\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?:/(?P<metadata>metadata)|:(?P<verb>predict|classify|regress))?)?/?$",
    re.IGNORECASE,
)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
}


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body, indent=1), status=status,
                        content_type="application/json")


def _error(message: str, status: int) -> web.Response:
    return _json({"error": message}, status)


def _proto_json(message: Any) -> dict[str, Any]:
    # TFS prints with preserve_proto_field_names and always_print_primitive_fields.
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _model_spec(name: str, version: str | None, label: str | None) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=name)
    if version is not None:
        spec.version.value = int(version)
    elif label is not None:
        spec.version_label = label
    return spec


def status_json(response: get_model_status_pb2.GetModelStatusResponse) -> dict[str, Any]:
    """TFS's status JSON: int64 as strings, the error code by name ("OK")."""
    states = get_model_status_pb2.ModelVersionStatus.State
    return {
        "model_version_status": [
            {
                "version": str(s.version),
                "state": states.Name(s.state),
                "status": {
                    "error_code": grpc.StatusCode.OK.name
                    if s.status.error_code == 0
                    else str(s.status.error_code),
                    "error_message": s.status.error_message,
                },
            }
            for s in response.model_version_status
        ]
    }


def metadata_json(response: get_model_metadata_pb2.GetModelMetadataResponse) -> dict[str, Any]:
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    return {
        "model_spec": _proto_json(response.model_spec),
        "metadata": {"signature_def": _proto_json(signature_map)},
    }


@dataclass
class RestCall:
    """A REST predict body as the service's Predict reads a decoded call."""

    model_name: str
    version: int | None
    version_label: str | None
    signature_name: str
    inputs: dict[str, rest_json.JsonTensor]
    output_filter: tuple[str, ...] = ()
    rows: int = -1
    model_spec: bool = True


@dataclass
class _Output:
    """An output as rest_json writes it: the core's normalized tensor form."""

    dtype: int
    shape: tuple[int, ...]
    data: bytes | list[bytes]


def _json_tensor(dtype: int, array: np.ndarray) -> _Output:
    if dtype == dtypes.DT_STRING:
        return _Output(dtype, array.shape, [bytes(v) for v in array.ravel()])
    array = np.ascontiguousarray(array, dtype=dtypes.NUMPY_DTYPES[dtype])
    return _Output(dtype, array.shape, array.tobytes())


def make_app(service: ReplicaService) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=service.metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def admin_state(request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                state = str((await request.json())["state"]).upper()
            except (ValueError, KeyError, TypeError):
                return _error('expected a JSON body {"state": "..."}', 400)
            if state not in ADMIN_STATES:
                return _error(f"state must be one of {', '.join(ADMIN_STATES)}", 400)
            service.state = state
        return _json({"state": service.state})

    async def models(request: web.Request) -> web.Response:
        match = MODEL_PATH.match(request.path)
        if match is None:
            return _error(f"Malformed request: {request.method} {request.path}", 400)
        if match["name"] is None:
            return _error("Missing model name in request.", 400)
        if match["verb"] and match["verb"].lower() == "predict" and request.method == "POST":
            return await rest_predict(request, match)
        if match["verb"]:
            return _error(f"REST :{match['verb'].lower()} is not implemented by the "
                          "batchproxy reference replica; use gRPC", 501)
        if request.method != "GET":
            return _error(f"Malformed request: {request.method} {request.path}", 400)
        spec = _model_spec(match["name"], match["version"], match["label"])
        try:
            if match["metadata"]:
                req = get_model_metadata_pb2.GetModelMetadataRequest(
                    model_spec=spec, metadata_field=["signature_def"])
                return _json(metadata_json(service.metadata(req)))
            status_req = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
            return _json(status_json(service.status(status_req)))
        except ReplicaError as err:
            return _error(err.message, HTTP_STATUS.get(err.code, 500))

    async def rest_predict(request: web.Request, match: re.Match[str]) -> web.Response:
        try:
            service.check_available()
            version = int(match["version"]) if match["version"] is not None else None
            doc = rest_json.loads(await request.read())
            # Typed by the signature of the version it resolves to.
            servable = service.resolve(match["name"], version, match["label"])
            signature = service.signature(servable, rest_json.signature_name(doc))
            inputs = {alias: spec[0]
                      for alias, spec in servable.model.signatures[signature].inputs.items()}
            fmt, tensors = rest_json.parse_predict(doc, inputs, signature)
            call = RestCall(match["name"], version, match["label"], signature, tensors)
            servable, signature, outputs = await service.predict_call(call)
            dtypes_out = servable.model.signatures[signature].outputs
            body = rest_json.predict_response(
                {alias: _json_tensor(dtypes_out[alias][0], array)
                 for alias, array in outputs.items()}, fmt)
        except (ReplicaError, ProxyError) as err:
            service.metrics.count("Predict", err.code)
            return _error(err.message, HTTP_STATUS.get(err.code, 500))
        service.metrics.count("Predict", grpc.StatusCode.OK)
        return web.Response(body=body, content_type="application/json")

    async def fallback(request: web.Request) -> web.Response:
        path = request.path.lower()
        if path in METRICS_PATHS and request.method == "GET":
            return await metrics(request)
        if path == "/admin/state":
            return await admin_state(request)
        if path.startswith("/v1/"):
            return await models(request)
        return _error(f"Not found: {request.method} {request.path}", 404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fallback)
    return app
