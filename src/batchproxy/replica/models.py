"""Models the reference replica serves: `identity`, `demo` (a small digit classifier),
`multi` (strings, several outputs and signatures, Classify and Regress; in multi.py),
`sequence` (masked mean of token embeddings, for variable-length batching) and a
cost-model wrapper that makes any of them take time the way a GPU does.

Development and test fixtures only: nothing here is meant for production traffic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import grpc
import numpy as np

from batchproxy.codec import dtypes
from batchproxy.protos import example_pb2

SERVING_DEFAULT = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
HERE = Path(__file__).resolve().parent
DEMO_WEIGHTS = HERE / "demo_weights.npz"
DEMO_SAMPLES = HERE / "demo_samples.npz"

# TensorFlow's DataTypeString names, used verbatim in TF's own error messages.
TF_TYPE_NAMES: dict[int, str] = {
    dtypes.DT_FLOAT: "float",
    dtypes.DT_DOUBLE: "double",
    dtypes.DT_INT32: "int32",
    dtypes.DT_UINT8: "uint8",
    dtypes.DT_INT16: "int16",
    dtypes.DT_INT8: "int8",
    dtypes.DT_STRING: "string",
    dtypes.DT_COMPLEX64: "complex64",
    dtypes.DT_INT64: "int64",
    dtypes.DT_BOOL: "bool",
    dtypes.DT_BFLOAT16: "bfloat16",
    dtypes.DT_UINT16: "uint16",
    dtypes.DT_COMPLEX128: "complex128",
    dtypes.DT_HALF: "half",
    dtypes.DT_UINT32: "uint32",
    dtypes.DT_UINT64: "uint64",
}

# name -> (tensorflow.DataType, shape with -1 for an unknown dimension)
TensorSpec = tuple[int, tuple[int, ...]]


@dataclass(frozen=True)
class Signature:
    """One SignatureDef of a model: input and output aliases with their specs."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    method_name: str = PREDICT_METHOD


class ReplicaError(Exception):
    """A failure the replica answers with a gRPC status, as TFS would."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Model(Protocol):
    name: str
    # Signature name -> signature; SERVING_DEFAULT is always one of them.
    signatures: dict[str, Signature]

    def validate(self, signature: str, inputs: dict[str, TensorSpec]) -> None:
        """Raise ReplicaError when inputs (dtype, concrete shape) do not fit `signature`
        (a key of `signatures`). Takes specs, not arrays, so a request is refused before
        any tensor is converted."""

    def predict(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run `signature` on validated inputs; every output keeps dimension 0 of the inputs.
        DT_STRING tensors are object arrays of bytes, both ways."""


# Classify and Regress are optional, as in TFS: the replica answers UNIMPLEMENTED for a
# model without them (examples.py). `context` is the ExampleListWithContext's context, None
# without one.
@runtime_checkable
class Classifier(Protocol):
    def classify(
        self, examples: list[example_pb2.Example], context: example_pb2.Example | None
    ) -> list[list[tuple[str, float]]]:
        """One list of (label, score) per example."""


@runtime_checkable
class Regressor(Protocol):
    def regress(
        self, examples: list[example_pb2.Example], context: example_pb2.Example | None
    ) -> list[float]:
        """One value per example."""


def _type_name(dtype: int) -> str:
    return TF_TYPE_NAMES.get(dtype, f"type {dtype}")


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def validate_inputs(
    expected: dict[str, TensorSpec], inputs: dict[str, TensorSpec], *, shapes: bool = True
) -> None:
    """TFS's checks and wording: names first (predict_util.cc), then dtype (the TF function
    call: arg[i] counts inputs in sorted alias order), then shape unless `shapes` is False
    (a model of element-wise ops that takes any rank)."""
    if set(inputs) != set(expected):
        got, want = sorted(inputs), sorted(expected)
        if len(got) != len(want):
            extra = sorted(set(got) - set(want))
            missing = sorted(set(want) - set(got))
            raise ReplicaError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature: {len(got)}!={len(want)} "
                f"len({{{','.join(got)}}}) != len({{{','.join(want)}}}). "
                f"Sent extra: {{{','.join(extra)}}}. "
                f"Missing but required: {{{','.join(missing)}}}.",
            )
        alias = next(name for name in got if name not in expected)
        raise ReplicaError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input tensor alias not found in signature: {alias}. "
            f"Inputs expected to be in the set {{{','.join(want)}}}.",
        )
    for index, name in enumerate(sorted(expected)):
        want_dtype, want_shape = expected[name]
        dtype, shape = inputs[name]
        if dtype != want_dtype:
            raise ReplicaError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Expects arg[{index}] to be {_type_name(want_dtype)} but "
                f"{_type_name(dtype)} is provided",
            )
        if shapes and (len(shape) != len(want_shape) or any(
            w not in (-1, d) for w, d in zip(want_shape, shape, strict=True)
        )):
            raise ReplicaError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {name} must have shape {_shape_text(want_shape)} (-1: any size) "
                f"but has shape {_shape_text(shape)}",
            )


class IdentityModel:
    """y = x for float matrices: an echo for isolating the proxy from any model."""

    name = "identity"
    signatures = {
        SERVING_DEFAULT: Signature(
            {"x": (dtypes.DT_FLOAT, (-1, -1))}, {"y": (dtypes.DT_FLOAT, (-1, -1))}
        )
    }

    def validate(self, signature: str, inputs: dict[str, TensorSpec]) -> None:
        validate_inputs(self.signatures[signature].inputs, inputs)

    def predict(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"]}


def upscale_digits(images8: np.ndarray) -> np.ndarray:
    """sklearn's 8x8 digits (values 0..16) to MNIST-like 28x28 float32 in [0, 1]: each pixel
    becomes a 3x3 block (24x24), then a 2-pixel border, as MNIST centres its digits."""
    images8 = np.asarray(images8, dtype=np.float32).reshape(-1, 8, 8)
    big = np.kron(images8, np.ones((1, 3, 3), dtype=np.float32))
    return (np.pad(big, ((0, 0), (2, 2), (2, 2))) / 16.0).astype(np.float32)


def digits_split(n_samples: int, test_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """The fixed train/held-out split shared by the training script and demo_samples(), so
    samples used to check predictions were never trained on."""
    order = np.random.default_rng(0).permutation(n_samples)
    n_test = round(n_samples * test_fraction)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class DemoModel:
    """The classic Keras MNIST shapes (flatten_input [-1,28,28] -> dense_1 [-1,10] softmax)
    with a softmax regression trained on sklearn's digits by scripts/train_demo_model.py."""

    name = "demo"
    signatures = {
        SERVING_DEFAULT: Signature(
            {"flatten_input": (dtypes.DT_FLOAT, (-1, 28, 28))},
            {"dense_1": (dtypes.DT_FLOAT, (-1, 10))},
        )
    }

    def __init__(self, weights: Path = DEMO_WEIGHTS) -> None:
        with np.load(weights) as data:
            self.kernel = np.ascontiguousarray(data["kernel"], dtype=np.float32)  # [784, 10]
            self.bias = np.ascontiguousarray(data["bias"], dtype=np.float32)  # [10]

    def validate(self, signature: str, inputs: dict[str, TensorSpec]) -> None:
        validate_inputs(self.signatures[signature].inputs, inputs)

    def predict(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["flatten_input"].reshape(-1, 28 * 28)
        probs = _softmax(x @ self.kernel + self.bias)
        return {"dense_1": probs.astype(np.float32, copy=False)}


def demo_samples(n: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` held-out images [n,28,28] float32 and their labels [n] int64. From sklearn's
    digits when it is installed (up to 450 distinct), else from the committed
    demo_samples.npz (64 distinct, repeated cyclically past that)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        with np.load(DEMO_SAMPLES) as data:
            images8, labels = data["images8"], data["labels"]
    else:
        digits = load_digits()
        _, test = digits_split(len(digits.target))
        images8, labels = digits.images[test], digits.target[test]
    index = np.arange(n) % len(labels)
    return upscale_digits(images8[index]), labels[index].astype(np.int64)


def _multi_model() -> Model:
    # multi.py builds on this module's types: imported on use, not at the top, to avoid a
    # cycle.
    from batchproxy.replica.multi import MultiModel

    return MultiModel()


class SequenceModel:
    """A small text model that needs variable-length batching done right: int32 token ids
    `[batch, length]`, 0 the pad id. `embedding` `[batch, 8]` is the mean of the embeddings
    of a row's non-pad tokens, so padding with 0 past a row's length changes nothing while
    padding with any other id (TFS pads with the tensor's first element) changes the
    answer; `token_scores` `[batch, length]` scores each token (0 at pad positions), an
    output whose dimension 1 follows the input's length. Its cost grows with batch x length:
    with the cost model, `--row_cost_us` is the cost of one token (a row's position)."""

    name = "sequence"
    VOCAB = 1024
    WIDTH = 8
    signatures = {
        SERVING_DEFAULT: Signature(
            {"tokens": (dtypes.DT_INT32, (-1, -1))},
            {"embedding": (dtypes.DT_FLOAT, (-1, 8)),
             "token_scores": (dtypes.DT_FLOAT, (-1, -1))},
        )
    }

    def __init__(self) -> None:
        ids = np.arange(self.VOCAB, dtype=np.float64)[:, None]
        freqs = np.arange(1, self.WIDTH + 1, dtype=np.float64)[None, :]
        # Any fixed table would do; this one is reproducible without a weights file.
        self.table = np.sin(ids * freqs * 0.37 + freqs).astype(np.float32)

    def validate(self, signature: str, inputs: dict[str, TensorSpec]) -> None:
        validate_inputs(self.signatures[signature].inputs, inputs)

    def cost_units(self, inputs: dict[str, np.ndarray], rows: int) -> int:
        tokens = inputs["tokens"]
        return rows * (tokens.shape[1] if tokens.ndim == 2 else 1)

    def predict(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = inputs["tokens"].astype(np.int64)
        mask = tokens != 0
        vectors = self.table[np.mod(tokens, self.VOCAB)] * mask[..., None]
        counts = np.maximum(mask.sum(axis=1), 1)[:, None]
        embedding = (vectors.sum(axis=1) / counts).astype(np.float32)
        scores = (vectors.sum(axis=2) * mask).astype(np.float32)
        return {"embedding": embedding, "token_scores": scores}


MODELS: dict[str, Callable[[], Model]] = {
    "identity": IdentityModel,
    "demo": DemoModel,
    "multi": _multi_model,
    "sequence": SequenceModel,
}


def load_model(kind: str) -> Model:
    try:
        factory = MODELS[kind]
    except KeyError:
        raise ValueError(f"unknown model {kind!r}; choose from {sorted(MODELS)}") from None
    return factory()


class Device:
    """One simulated GPU: one batch at a time. Several cost models (the versions of a
    model) may share one, as TFS runs every loaded version on the same device."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        # One thread: one simulated device. A call cancelled while "running" keeps it busy
        # until its time is up, as a GPU finishes a batch nobody waits for any more.
        self.sleeper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cost-model")
        # Virtual clock: when the simulated device is next free. A call that queued while
        # the device was busy starts when it frees, not when the event loop got round to
        # it, so wake-up delays never add up into lost throughput.
        self.free_at = 0.0

    def close(self) -> None:
        self.sleeper.shutdown(wait=False)


@dataclass
class CostModel:
    """Makes every Predict take batch_cost_ms + rows x row_cost_us, one at a time, as one
    GPU runs one batch at a time. Waits with asyncio so the server keeps accepting calls
    (which queue on the lock, like a GPU's stream)."""

    model: Model
    batch_cost_ms: float = 0.0
    row_cost_us: float = 0.0
    device: Device | None = None

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = Device()
        self._device: Device = self.device

    def cost_s(self, rows: int) -> float:
        return self.batch_cost_ms / 1e3 + max(rows, 0) * self.row_cost_us / 1e6

    async def run(
        self, signature: str, inputs: dict[str, np.ndarray], rows: int
    ) -> dict[str, np.ndarray]:
        # A model whose cost grows with more than its rows (a sequence model: rows x
        # length) says how many units a call is.
        units = getattr(self.model, "cost_units", None)
        cost = self.cost_s(rows if units is None else units(inputs, rows))
        if cost <= 0:
            return self.model.predict(signature, inputs)
        arrived = time.perf_counter()
        device = self._device
        async with device.lock:
            start = max(arrived, device.free_at)
            end = device.free_at = start + cost
            outputs = self.model.predict(signature, inputs)
            if end > time.perf_counter():
                # Event-loop timers tick in whole milliseconds (uvloop rounds to the nearest
                # one): a sleeping thread keeps sub-millisecond costs exact, without spinning.
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(device.sleeper, _sleep_until, end)
            return outputs


def _sleep_until(deadline: float) -> None:
    # A deadline, not a duration: this sleep may start late, behind the sleep of a call that
    # was cancelled while the simulated device was still busy with it.
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)
