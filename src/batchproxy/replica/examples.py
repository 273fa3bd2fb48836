"""Classify and Regress on the reference replica: tensorflow.Example lists in, one answer per
example out, for models that define them (models.Classifier / models.Regressor; the `multi`
model). Any other model answers UNIMPLEMENTED, as before these existed.

They skip the cost model and the batch-rows metric: those simulate and count batched
Predicts, which these calls are not.

Development and test fixture only: not for production traffic.
"""

from __future__ import annotations

import grpc

from batchproxy.protos import example_pb2, inference_pb2
from batchproxy.replica.models import SERVING_DEFAULT, Classifier, Regressor, ReplicaError
from batchproxy.replica.service import ReplicaService, not_implemented
from batchproxy.replica.versions import Servable

ExampleRequest = inference_pb2.ClassificationRequest | inference_pb2.RegressionRequest
SERVICE = "tensorflow.serving.PredictionService"


def _examples(
    request: ExampleRequest,
) -> tuple[list[example_pb2.Example], example_pb2.Example | None]:
    """The request's examples and its context (None without one)."""
    if request.input.WhichOneof("kind") == "example_list_with_context":
        holder = request.input.example_list_with_context
        examples, context = list(holder.examples), holder.context
    else:
        examples, context = list(request.input.example_list.examples), None
    if not examples:
        # TFS's wording (servables/tensorflow/util.cc), for no input kind as for no examples.
        raise ReplicaError(grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")
    return examples, context


def _lookup(service: ReplicaService, request: ExampleRequest) -> tuple[Servable, str]:
    """Servable, then signature lookup with classifier.cc's and regressor.cc's wording;
    returns the signature name to echo. TFS then also wants the signature's method to be
    classify or regress; this stand-in does not check it: the model's own rule answers, and
    `multi` declares predict signatures only (its metadata is what REST tests type JSON by)."""
    if not request.HasField("model_spec"):
        raise ReplicaError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
    spec = request.model_spec
    servable = service.resolve(spec.name, *service.spec_version(spec))
    name = spec.signature_name or SERVING_DEFAULT
    if name not in servable.model.signatures:
        raise ReplicaError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"No signature was found with the name: {name}")
    return servable, name


def _lookup_with(
    service: ReplicaService, request: ExampleRequest, kind: type, method: str
) -> tuple[Servable, str]:
    """The method's model kind is checked first, then the servable (the version the call
    names; before versions, the one model): UNIMPLEMENTED for a model without it."""
    model = service.model
    if service.versions is None and not isinstance(model, kind):
        raise not_implemented(f"{SERVICE}/{method}", f"its {model.name} model has none")
    servable, name = _lookup(service, request)
    if not isinstance(servable.model, kind):
        raise not_implemented(f"{SERVICE}/{method}", f"its {servable.model.name} model has none")
    return servable, name


def classify(
    service: ReplicaService, request: inference_pb2.ClassificationRequest
) -> inference_pb2.ClassificationResponse:
    service.check_available()
    servable, name = _lookup_with(service, request, Classifier, "Classify")
    model = servable.model
    assert isinstance(model, Classifier)
    response = inference_pb2.ClassificationResponse(model_spec=servable.response_spec(name))
    for classes in model.classify(*_examples(request)):
        result = response.result.classifications.add()
        for label, score in classes:
            result.classes.add(label=label, score=score)
    return response


def regress(
    service: ReplicaService, request: inference_pb2.RegressionRequest
) -> inference_pb2.RegressionResponse:
    service.check_available()
    servable, name = _lookup_with(service, request, Regressor, "Regress")
    model = servable.model
    assert isinstance(model, Regressor)
    response = inference_pb2.RegressionResponse(model_spec=servable.response_spec(name))
    for value in model.regress(*_examples(request)):
        response.result.regressions.add(value=value)
    return response
