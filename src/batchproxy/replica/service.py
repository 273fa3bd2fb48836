"""TFS semantics of the reference replica, free of any transport: servable lookup, Predict,
GetModelMetadata and GetModelStatus with TFS's status codes and messages (Classify and
Regress build on it in examples.py). The gRPC server (server.py) and the REST app (rest.py)
both call into it.

Development and test fixture only: not for production traffic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

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
    load_model,
)
from batchproxy.replica.versions import Servable, VersionManager

# ModelVersionStatus states the admin endpoint may set; "UNAVAILABLE" is not a model state
# but a broken server: every RPC then fails with UNAVAILABLE (for retry and ejection tests).
MODEL_STATES = ("START", "LOADING", "AVAILABLE", "UNLOADING", "END")
ADMIN_STATES = (*MODEL_STATES, "UNAVAILABLE")
_States = get_model_status_pb2.ModelVersionStatus.State


class _TensorLike(Protocol):
    @property
    def dtype(self) -> int: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def data(self) -> bytes | list[bytes]: ...


class PredictCallLike(Protocol):
    """What Predict reads of a decoded call: the core's PredictCall, or the REST app's."""

    model_spec: Any
    model_name: str
    version: int | None
    version_label: str | None
    signature_name: str

    @property
    def inputs(self) -> Mapping[str, _TensorLike]: ...
    output_filter: tuple[str, ...]
    rows: int


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


def batch_size_refused(rows: int, sizes: tuple[int, ...]) -> str:
    return (f"Batch size {rows} is not one of the allowed batch sizes "
            f"{', '.join(map(str, sizes))}: this model was compiled for those only")


class ReplicaService:
    """One model name, served either as one fixed version (`model`, `version`) or, given a
    VersionManager, as the versions of a model base path."""

    # Batch sizes a compiled model runs at; () for any (set by `--allowed_batch_sizes`).
    allowed_batch_sizes: tuple[int, ...] = ()

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
        versions: VersionManager | None = None,
    ) -> None:
        self.model_name = model_name
        self.typed = not tensor_content
        self.check_numerics = check_numerics
        self.metrics = metrics or ReplicaMetrics()
        # The admin override (/admin/state): AVAILABLE leaves each version its own state.
        self.state = "AVAILABLE"
        self.versions = versions
        self._static: Servable | None = None
        if versions is None:
            runner = CostModel(model, batch_cost_ms, row_cost_us)
            self._static = Servable(version, model, runner, model_name, state="AVAILABLE")

    @property
    def servables(self) -> dict[int, Servable]:
        if self.versions is not None:
            return self.versions.servables
        assert self._static is not None
        return {self._static.version: self._static}

    @property
    def labels(self) -> dict[str, int]:
        return self.versions.labels if self.versions is not None else {}

    def _default(self) -> Servable | None:
        if self._static is not None:
            return self._static
        assert self.versions is not None
        return self.versions.latest()

    # The fixed version's (or, with versions, the latest's) model, version and cost model:
    # what the start-up line describes.
    @property
    def model(self) -> Model:
        servable = self._default()
        if servable is not None:
            return servable.model
        assert self.versions is not None
        model = self.versions.any_model()
        return model if model is not None else load_model(self.versions.defaults.model_kind)

    @property
    def version(self) -> int:
        servable = self._default()
        return servable.version if servable is not None else 0

    @property
    def runner(self) -> CostModel:
        servable = self._default()
        return servable.runner if servable is not None else CostModel(self.model)

    def response_spec(self, signature: str) -> model_pb2.ModelSpec:
        servable = self._default()
        assert servable is not None
        return servable.response_spec(signature)

    def state_of(self, servable: Servable) -> str:
        return servable.state if self.state == "AVAILABLE" else self.state

    # -- servable lookup ------------------------------------------------------------------

    def check_available(self) -> None:
        if self.state == "UNAVAILABLE":
            raise ReplicaError(
                grpc.StatusCode.UNAVAILABLE, "replica made unavailable through /admin/state"
            )

    def resolve(self, name: str, version: int | None, label: str | None) -> Servable:
        """ServerCore::GetServableHandle: labels first, then the name and version (none:
        the highest AVAILABLE one); a version not AVAILABLE is not served, as in TFS."""
        if label:
            if name != self.model_name or label not in self.labels:
                raise ReplicaError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Unrecognized servable version label: {label}",
                )
            version = self.labels[label]
        servable = None
        if name == self.model_name and self.state == "AVAILABLE":
            servable = self._default() if version is None else self.servables.get(version)
            if servable is not None and servable.state != "AVAILABLE":
                servable = None
        if servable is None:
            what = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
            raise ReplicaError(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {what}"
            )
        return servable

    @staticmethod
    def signature(servable: Servable, name: str) -> str:
        """The signature a call names ("" is serving_default), or FAILED_PRECONDITION."""
        name = name or SERVING_DEFAULT
        if name not in servable.model.signatures:
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
        servable, name, outputs = await self.predict_call(call)
        signature = servable.model.signatures[name]
        encoded = {
            alias: _encode_output(signature.outputs[alias][0], array, self.typed)
            for alias, array in outputs.items()
        }
        return codec.encode_predict_response(encoded, servable.response_specs[name])

    async def predict_call(
        self, call: PredictCallLike
    ) -> tuple[Servable, str, dict[str, np.ndarray]]:
        """Run a decoded call (gRPC's PredictCall, or the REST app's): the version that
        ran it, the signature's name and the outputs asked for, in order."""
        if not call.model_spec:
            raise ReplicaError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        servable = self.resolve(call.model_name, call.version, call.version_label)
        # From here the call belongs to this version: an unload waits for it.
        servable.enter()
        try:
            name, outputs = await self._predict(servable, call)
        finally:
            servable.leave()
        return servable, name, outputs

    async def _predict(
        self, servable: Servable, call: PredictCallLike
    ) -> tuple[str, dict[str, np.ndarray]]:
        model = servable.model
        name = self.signature(servable, call.signature_name)
        signature = model.signatures[name]
        model.validate(name, {alias: (t.dtype, t.shape) for alias, t in call.inputs.items()})
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
        if self.allowed_batch_sizes and rows not in self.allowed_batch_sizes:
            raise ReplicaError(grpc.StatusCode.INVALID_ARGUMENT, batch_size_refused(
                rows, self.allowed_batch_sizes))
        self.metrics.batch_rows.observe(rows)
        self.metrics.predict_started()
        try:
            outputs = await servable.run(name, arrays, rows)
        finally:
            self.metrics.predict_ended()
        return name, {alias: outputs[alias] for alias in aliases}

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
        servable = self.resolve(request.model_spec.name, *self.spec_version(request.model_spec))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = servable.version
        assert servable.signature_map is not None
        response.metadata["signature_def"].Pack(servable.signature_map)
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
        servables = self.servables
        if spec.name != self.model_name or not servables:
            raise ReplicaError(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}"
            )
        version, _ = self.spec_version(spec)
        if version is not None and version not in servables:
            raise ReplicaError(
                grpc.StatusCode.NOT_FOUND,
                f"Could not find version {version} of model {spec.name}",
            )
        response = get_model_status_pb2.GetModelStatusResponse()
        # Newest first, as TFS's ServableStateMonitor orders versions.
        for servable in sorted(servables.values(), key=lambda s: -s.version):
            if version is not None and servable.version != version:
                continue
            response.model_version_status.add(
                version=servable.version,
                state=_States.Value(self.state_of(servable)),
                # error_code 0: OK, as TFS sends; a failed load carries its error.
                status=get_model_status_pb2.StatusProto(
                    error_code=servable.error_code,
                    error_message=servable.error_message,
                ),
            )
        return response
