"""TFS semantics of the reference replica, free of any transport: servable lookup, Predict,
GetModelMetadata and GetModelStatus with TFS's status codes and messages (Classify and
Regress build on it in examples.py). The gRPC server (server.py) and the REST app (rest.py)
both call into it.

Development and test fixture only: not for production traffic.
"""

from __future__ import annotations

import grpc
import numpy as np

from batchproxy import codec
from batchproxy.codec import dtypes
from batchproxy.protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    signature_pb2,
)
from batchproxy.replica.metrics import ReplicaMetrics
from batchproxy.replica.models import (
    SERVING_DEFAULT,
    CostModel,
    Model,
    ReplicaError,
    Signature,
)

# ModelVersionStatus states the admin endpoint may set; "UNAVAILABLE" is not a model state
# but a broken server: every RPC then fails with UNAVAILABLE (for retry and ejection tests).
MODEL_STATES = ("START", "LOADING", "AVAILABLE", "UNLOADING", "END")
ADMIN_STATES = (*MODEL_STATES, "UNAVAILABLE")
_States = get_model_status_pb2.ModelVersionStatus.State


def not_implemented(method: str, why: str) -> ReplicaError:
    """UNIMPLEMENTED for `method` ("tensorflow.serving.PredictionService/Classify"), in the
    words REST and gRPC tests look for."""
    return ReplicaError(
        grpc.StatusCode.UNIMPLEMENTED,
        f"{method} is not implemented by the batchproxy reference replica ({why})",
    )


def _tensor_info(name: str, spec: tuple[int, tuple[int, ...]]) -> signature_pb2.TensorInfo:
    # The stub wants the enum type; a DataType value is that int at run time.
    info = signature_pb2.TensorInfo(name=name, dtype=spec[0])  # type: ignore[arg-type]
    for size in spec[1]:
        info.tensor_shape.dim.add(size=size)
    return info


def signature_def(name: str, signature: Signature, call: str) -> signature_pb2.SignatureDef:
    """A signature as a Keras SavedModel exports it (TFS shows these tensor names): inputs
    NAME_ALIAS:0, outputs CALL:i with CALL the signature's call op."""
    sig = signature_pb2.SignatureDef(method_name=signature.method_name)
    for alias, spec in signature.inputs.items():
        sig.inputs[alias].CopyFrom(_tensor_info(f"{name}_{alias}:0", spec))
    for index, (alias, spec) in enumerate(sorted(signature.outputs.items())):
        sig.outputs[alias].CopyFrom(_tensor_info(f"{call}:{index}", spec))
    return sig


def signature_map(model: Model) -> get_model_metadata_pb2.SignatureDefMap:
    """Every signature of `model`. Call ops are StatefulPartitionedCall, then _1, _2, ...:
    serving_default first, so it keeps the plain name whatever the model's dict order."""
    result = get_model_metadata_pb2.SignatureDefMap()
    names = sorted(model.signatures, key=lambda name: name != SERVING_DEFAULT)
    for index, name in enumerate(names):
        call = "StatefulPartitionedCall" + (f"_{index}" if index else "")
        result.signature_def[name].CopyFrom(signature_def(name, model.signatures[name], call))
    return result


def _as_bytes(array: np.ndarray) -> bytes:
    """Element bytes of `array`, without a copy when it is a whole request buffer (the
    identity model hands its input straight back)."""
    base = array.base
    while isinstance(base, np.ndarray):  # reshape views point at the frombuffer array
        base = base.base
    if isinstance(base, bytes) and array.flags.c_contiguous and array.nbytes == len(base):
        return base
    return array.tobytes()


def _encode_output(dtype: int, array: np.ndarray, typed: bool) -> bytes:
    if dtype == dtypes.DT_STRING:
        # An object array of bytes; the core writes string_val whatever `typed` says.
        return codec.encode_tensor(dtype, array.shape, array.ravel().tolist(), typed)
    array = np.ascontiguousarray(array, dtype=dtypes.NUMPY_DTYPES[dtype])
    return codec.encode_tensor(dtype, array.shape, _as_bytes(array), typed)


class ReplicaService:
    def __init__(
        self,
        model: Model,
        model_name: str,
        version: int = 1,
        *,
        tensor_content: bool = False,
        check_numerics: bool = False,
        batch_cost_ms: float = 0.0,
        row_cost_us: float = 0.0,
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        self.model = model
        self.model_name = model_name
        self.version = version
        self.typed = not tensor_content
        self.check_numerics = check_numerics
        self.runner = CostModel(model, batch_cost_ms, row_cost_us)
        self.metrics = metrics or ReplicaMetrics()
        self.state = "AVAILABLE"
        # An answer echoes name, version and the signature used: each serialized once.
        self.response_specs = {
            name: self.response_spec(name).SerializeToString() for name in model.signatures
        }
        self.signature_map = signature_map(model)

    def response_spec(self, signature: str) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self.model_name, signature_name=signature)
        spec.version.value = self.version
        return spec

    # -- servable lookup ------------------------------------------------------------------

    def check_available(self) -> None:
        if self.state == "UNAVAILABLE":
            raise ReplicaError(
                grpc.StatusCode.UNAVAILABLE, "replica made unavailable through /admin/state"
            )

    def resolve(self, name: str, version: int | None, label: str | None) -> None:
        """ServerCore::GetServableHandle: labels first (this replica has none), then the
        name and version; a version not AVAILABLE is not served, as in TFS."""
        if label:
            raise ReplicaError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}"
            )
        if (
            name != self.model_name
            or (version is not None and version != self.version)
            or self.state != "AVAILABLE"
        ):
            what = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
            raise ReplicaError(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {what}"
            )

    def signature(self, name: str) -> str:
        """The signature a call names ("" is serving_default), or FAILED_PRECONDITION."""
        name = name or SERVING_DEFAULT
        if name not in self.model.signatures:
            raise ReplicaError(
                grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.'
            )
        return name

    # -- Predict --------------------------------------------------------------------------

    @staticmethod
    def _output_aliases(signature: Signature, output_filter: tuple[str, ...]) -> list[str]:
        known = sorted(signature.outputs)
        seen: set[str] = set()
        for alias in output_filter:
            if alias not in signature.outputs:
                raise ReplicaError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} "
                    f"Outputs expected to be in the set {{{','.join(known)}}}.",
                )
            if alias in seen:
                raise ReplicaError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}"
                )
            seen.add(alias)
        return list(output_filter) or known

    async def predict(self, data: bytes) -> bytes:
        """A serialized PredictRequest in, a serialized PredictResponse out."""
        self.check_available()
        call = codec.decode_predict_request(data)
        if not call.model_spec:
            raise ReplicaError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        self.resolve(call.model_name, call.version, call.version_label)
        name = self.signature(call.signature_name)
        signature = self.model.signatures[name]
        self.model.validate(name, {alias: (t.dtype, t.shape) for alias, t in call.inputs.items()})
        aliases = self._output_aliases(signature, call.output_filter)
        arrays = {
            alias: dtypes.to_numpy(t.dtype, t.shape, t.data) for alias, t in call.inputs.items()
        }
        if self.check_numerics:
            for alias, array in arrays.items():
                if array.dtype.kind == "f" and not np.isfinite(array).all():
                    kind = "NaN" if np.isnan(array).any() else "Inf"
                    raise ReplicaError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"input {alias}: Tensor had {kind} values")
        # rows is -1 for a call the proxy could not batch; once the signature accepted its
        # inputs they have a dimension 0, which is what the model runs on. Only a model that
        # checks no shapes takes a scalar: it runs as one row.
        rows = call.rows if call.rows >= 0 else max(
            (a.shape[0] if a.ndim else 1 for a in arrays.values()), default=0
        )
        self.metrics.batch_rows.observe(rows)
        self.metrics.predict_started()
        try:
            outputs = await self.runner.run(name, arrays, rows)
        finally:
            self.metrics.predict_ended()
        encoded = {
            alias: _encode_output(signature.outputs[alias][0], outputs[alias], self.typed)
            for alias in aliases
        }
        return codec.encode_predict_response(encoded, self.response_specs[name])

    # -- metadata and status -------------------------------------------------------------

    @staticmethod
    def spec_version(spec: model_pb2.ModelSpec) -> tuple[int | None, str | None]:
        choice = spec.WhichOneof("version_choice")
        if choice == "version":
            return spec.version.value, None
        if choice == "version_label":
            return None, spec.version_label
        return None, None

    def metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        self.check_available()
        # get_model_metadata_impl.cc: the request is validated before the servable lookup.
        if not request.HasField("model_spec"):
            raise ReplicaError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        if not request.metadata_field:
            raise ReplicaError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "GetModelMetadataRequest must specify at least one metadata_field",
            )
        for field in request.metadata_field:
            if field != "signature_def":
                raise ReplicaError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported"
                )
        self.resolve(request.model_spec.name, *self.spec_version(request.model_spec))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = self.version
        response.metadata["signature_def"].Pack(self.signature_map)
        return response

    def status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """get_model_status_impl.cc: a label is ignored (all versions); NOT_FOUND wording
        differs from Predict's."""
        self.check_available()
        if not request.HasField("model_spec"):
            raise ReplicaError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        spec = request.model_spec
        if spec.name != self.model_name:
            raise ReplicaError(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}"
            )
        version, _ = self.spec_version(spec)
        if version is not None and version != self.version:
            raise ReplicaError(
                grpc.StatusCode.NOT_FOUND,
                f"Could not find version {version} of model {spec.name}",
            )
        response = get_model_status_pb2.GetModelStatusResponse()
        response.model_version_status.add(
            version=self.version,
            state=_States.Value(self.state),
            status=get_model_status_pb2.StatusProto(),  # error_code 0: OK, as TFS sends
        )
        return response
