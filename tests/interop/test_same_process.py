"""TensorFlow and batchproxy imported into one process, in either order.

TensorFlow registers `tensorflow.Example`, `tensorflow.TensorProto`, ... in protobuf's
default descriptor pool; batchproxy's wire-compatible copies carry the same full names, so
they must live in a pool of their own. Each order runs in a fresh interpreter: once a module
is imported it cannot be imported "first" again."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow_serving.apis")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from procs import child_env, start_replica

# Imports both libraries in the order given by argv[1], then sends one Predict to the
# replica at argv[2] with batchproxy's stub and one with TFS's, and checks that the
# messages of both libraries read each other's bytes.
SCRIPT = r"""
import importlib
import pkgutil
import sys

import numpy as np


def import_tensorflow():
    import tensorflow  # noqa: F401
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: F401


def import_batchproxy():
    import batchproxy

    for info in pkgutil.walk_packages(batchproxy.__path__, "batchproxy."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


first, second = (
    (import_tensorflow, import_batchproxy)
    if sys.argv[1] == "tensorflow-first"
    else (import_batchproxy, import_tensorflow)
)
first()
second()

import grpc
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import predict_pb2 as tf_predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc as tf_services

from batchproxy.frontends import rest_json
from batchproxy.protos import (
    get_model_metadata_pb2,
    predict_pb2,
    services_pb2_grpc,
    ssl_config_pb2,
)

x = np.arange(6, dtype=np.float32).reshape(2, 3)
ours = predict_pb2.PredictRequest()
ours.model_spec.name = "identity"
ours.model_spec.version.value = 1  # a google.protobuf.Int64Value, copied into our pool
ours.inputs["x"].ParseFromString(tf.make_tensor_proto(x).SerializeToString())
theirs = tf_predict_pb2.PredictRequest.FromString(ours.SerializeToString())
assert (theirs.model_spec.name, theirs.model_spec.version.value) == ("identity", 1)
np.testing.assert_array_equal(tf.make_ndarray(theirs.inputs["x"]), x)

with grpc.insecure_channel(sys.argv[2]) as channel:
    answer = services_pb2_grpc.PredictionServiceStub(channel).Predict(ours, timeout=20)
    y = tf_predict_pb2.PredictResponse.FromString(answer.SerializeToString()).outputs["y"]
    np.testing.assert_array_equal(tf.make_ndarray(y), x)
    answer = tf_services.PredictionServiceStub(channel).Predict(theirs, timeout=20)
    np.testing.assert_array_equal(tf.make_ndarray(answer.outputs["y"]), x)

    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "identity"
    request.metadata_field.append("signature_def")
    metadata = services_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
        request, timeout=20
    )
    assert b"serving_default" in rest_json.metadata_response(metadata.SerializeToString())

text_format.Parse('client_verify: true', ssl_config_pb2.SSLConfig())
print("both libraries work")
"""


@pytest.fixture(scope="module")
def replica():
    proc = start_replica("identity")
    yield proc
    proc.stop()


@pytest.mark.parametrize("order", ["tensorflow-first", "batchproxy-first"])
def test_tensorflow_and_batchproxy_in_one_process(replica, order: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, order, replica.address],
        capture_output=True,
        text=True,
        env=child_env({"TF_CPP_MIN_LOG_LEVEL": "3"}),
        timeout=300,
    )
    # Lines cut short: a failed AddSerializedFile prints the whole serialized descriptor.
    tail = "\n".join(line[:300] for line in done.stderr.splitlines()[-20:])
    assert done.returncode == 0, tail
    assert "both libraries work" in done.stdout
