"""The reference replica's `multi` model: what TFS serves and the identity and demo models do
not, for REST and gRPC tests of strings, several outputs, several signatures, other dtypes,
Classify and Regress.

    serving_default: text DT_STRING [-1], x DT_FLOAT [-1,2]
                     -> text_bytes (text as is), upper (text upper-cased), x2 (x * 2),
                        count (len(text), DT_INT64)
    lengths:         text DT_STRING [-1] -> count DT_INT64 [-1]
    types:           b DT_BOOL, i DT_INT32, u DT_UINT64, d DT_DOUBLE (all [-1]) -> the same
    Classify:        one class list per example, [("ex<i>", p)], p its float feature "p"
    Regress:         per example, its float feature "x" plus the context's "bias" (0 if absent)

Development and test fixture only: not for production traffic.
"""

from __future__ import annotations

import numpy as np

from batchproxy.codec import dtypes
from batchproxy.protos import example_pb2
from batchproxy.replica.models import (
    SERVING_DEFAULT,
    Signature,
    TensorSpec,
    validate_inputs,
)

_TYPES: dict[str, TensorSpec] = {
    name: (dtype, (-1,))
    for name, dtype in (
        ("b", dtypes.DT_BOOL),
        ("i", dtypes.DT_INT32),
        ("u", dtypes.DT_UINT64),
        ("d", dtypes.DT_DOUBLE),
    )
}
_TEXT: TensorSpec = (dtypes.DT_STRING, (-1,))
_COUNT: TensorSpec = (dtypes.DT_INT64, (-1,))


def _float_feature(example: example_pb2.Example, name: str) -> float:
    """The first float of feature `name`; 0 when it is absent or holds no floats."""
    feature = example.features.feature.get(name)
    if feature is None or not feature.float_list.value:
        return 0.0
    return float(feature.float_list.value[0])


class MultiModel:
    name = "multi"
    signatures = {
        SERVING_DEFAULT: Signature(
            {"text": _TEXT, "x": (dtypes.DT_FLOAT, (-1, 2))},
            {"text_bytes": _TEXT, "upper": _TEXT, "x2": (dtypes.DT_FLOAT, (-1, 2)),
             "count": _COUNT},
        ),
        "lengths": Signature({"text": _TEXT}, {"count": _COUNT}),
        "types": Signature(dict(_TYPES), dict(_TYPES)),
    }

    def validate(self, signature: str, inputs: dict[str, TensorSpec]) -> None:
        # Names and dtypes only: every op here is element-wise, so any rank works, and a
        # scalar `text` counts as one string (REST's columnar `"inputs": "abcd"` sends one).
        validate_inputs(self.signatures[signature].inputs, inputs, shapes=False)

    def predict(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if signature == "types":
            return dict(inputs)
        # Flattened: a scalar text gives outputs of one row.
        text = inputs["text"].ravel()
        outputs: dict[str, np.ndarray] = {
            "count": np.array([len(s) for s in text], dtype=np.int64)}
        if signature == SERVING_DEFAULT:
            outputs["text_bytes"] = text
            outputs["upper"] = np.array([s.upper() for s in text], dtype=object)
            outputs["x2"] = inputs["x"] * np.float32(2)
        return outputs

    def classify(
        self, examples: list[example_pb2.Example], context: example_pb2.Example | None
    ) -> list[list[tuple[str, float]]]:
        return [[(f"ex{index}", _float_feature(ex, "p"))] for index, ex in enumerate(examples)]

    def regress(
        self, examples: list[example_pb2.Example], context: example_pb2.Example | None
    ) -> list[float]:
        bias = _float_feature(context, "bias") if context is not None else 0.0
        return [_float_feature(ex, "x") + bias for ex in examples]
