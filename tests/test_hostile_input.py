"""Hostile input: every malformed request the wire decoder must refuse, in one table.

Each case is checked (a) directly against both cores (fixture `core`), and (b) end to end:
a real proxy process in front of a real identity replica, over gRPC, with the bad request
sent among good ones that would share its batch. The bad one must get INVALID_ARGUMENT with
a message naming the input, the good ones their own answers, and the replica must never see
the bad rows (its own count of Predict calls and rows says so). Replica responses are
hostile input too (split/concat must refuse them with a CodecError, never crash), and so is
JSON on the REST port (the REST frontend builds tensors itself, so only JSON-level rows).

Requests are built by hand with the wire helpers below (or our pb2 classes), never with the
codec under test.
"""

from __future__ import annotations

import asyncio
import gzip
import random
import struct
import time
from dataclasses import dataclass
from types import ModuleType

import grpc
import numpy as np
import pytest
import requests
from grpc_client import batch_rows_histogram, predict_request, to_array
from procs import start_replica
from prometheus_client.parser import text_string_to_metric_families
from proxy_procs import start_proxy
from wire import ld, tag, varint

from batchproxy.protos import predict_pb2, tensor_pb2

FLOAT, DOUBLE, INT32, STRING, COMPLEX64, INT64 = 1, 2, 3, 7, 8, 9
PREDICT = "/tensorflow.serving.PredictionService/Predict"
MAX_ELEMENTS = 2**31 - 1
TOO_LARGE = f"is too large (the product of its non-zero dimensions exceeds {MAX_ELEMENTS})"

# --- hand-written wire format -----------------------------------------------------------


def shape(dims: tuple[int, ...], unknown_rank: bool = False) -> bytes:
    body = b"".join(ld(2, tag(1, 0) + varint(d)) for d in dims)
    if unknown_rank:
        body += tag(3, 0) + varint(1)
    return ld(2, body)


def tensor(dtype: int, dims: tuple[int, ...], payload: bytes = b"", **kw) -> bytes:
    """A serialized TensorProto: dtype, shape, then `payload` (raw fields)."""
    return tag(1, 0) + varint(dtype) + shape(dims, **kw) + payload


def floats(*values: float) -> bytes:
    return ld(5, struct.pack(f"<{len(values)}f", *values))


def content(n: int) -> bytes:
    return ld(4, bytes(n))


SPEC = ld(1, b"identity") + ld(3, b"serving_default")


def request(*entries: tuple[str, bytes]) -> bytes:
    """A PredictRequest for the identity model with these (name, TensorProto) entries, in
    this order on the wire (duplicates allowed)."""
    return ld(1, SPEC) + b"".join(ld(2, ld(1, k.encode()) + ld(2, v)) for k, v in entries)


def good_x(rows: int = 2) -> bytes:
    return tensor(FLOAT, (rows, 3), ld(4, np.arange(rows * 3, dtype="<f4").tobytes()))


GOOD = request(("x", good_x()))

# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    data: bytes
    # The exact message (both cores agree), or, for wire-level damage, its prefix.
    message: str
    exact: bool = True


PARSE = "Could not parse PredictRequest"


def parsing_error(name: str, detail: str) -> str:
    return f"tensor parsing error: {name}: {detail}"


def _random_garbage(seed: int, n: int) -> bytes:
    # Random bytes that are not a PredictRequest (checked against both cores below).
    return random.Random(seed).randbytes(n)


CASES: dict[str, Case] = {
    # --- shapes: a concrete tensor has a known rank and no dimension below 0 ---------------
    "negative_dim": Case(
        request(("x", tensor(FLOAT, (2, -5), floats(1)))),
        parsing_error("x", "negative dimension -5 at index 1"),
    ),
    "unknown_dim_minus_one": Case(
        request(("x", tensor(FLOAT, (-1, 3), content(12)))),
        parsing_error("x", "negative dimension -1 at index 0"),
    ),
    "dim_int64_min": Case(
        request(("x", tensor(FLOAT, (-(2**63), 3)))),
        parsing_error("x", f"negative dimension {-(2**63)} at index 0"),
    ),
    "dim_uint64_max_varint": Case(  # 2**64 - 1 on the wire is int64 -1
        request(("x", tag(1, 0) + varint(FLOAT) + ld(2, ld(2, tag(1, 0) + b"\xff" * 9 + b"\x01")))),
        parsing_error("x", "negative dimension -1 at index 0"),
    ),
    "unknown_rank": Case(
        request(("x", tensor(FLOAT, (2, 3), content(24), unknown_rank=True))),
        parsing_error("x", "unknown rank"),
    ),
    "unknown_rank_no_dims": Case(
        request(("x", tensor(FLOAT, (), floats(1), unknown_rank=True))),
        parsing_error("x", "unknown rank"),
    ),
    "product_overflows_int64": Case(
        request(("x", tensor(FLOAT, (2**62, 2**62, 4)))),
        parsing_error("x", f"shape [4611686018427387904,4611686018427387904,4] {TOO_LARGE}"),
    ),
    "product_overflows_before_a_zero": Case(
        request(("x", tensor(FLOAT, (2**62, 2**62, 0)))),
        parsing_error("x", f"shape [4611686018427387904,4611686018427387904,0] {TOO_LARGE}"),
    ),
    "past_the_element_bound": Case(
        request(("x", tensor(FLOAT, (2**16, 2**15), floats(1)))),  # the fill form
        parsing_error("x", f"shape [65536,32768] {TOO_LARGE}"),
    ),
    "string_fill_past_the_bound": Case(
        request(("x", tensor(STRING, (2**40,), ld(8, b"a")))),
        parsing_error("x", f"shape [1099511627776] {TOO_LARGE}"),
    ),
    "huge_shape_with_content": Case(  # the shape is checked before the payload
        request(("x", tensor(FLOAT, (2**40, 3), content(12)))),
        parsing_error("x", f"shape [1099511627776,3] {TOO_LARGE}"),
    ),
    "rank_255": Case(
        request(("x", tensor(FLOAT, (1,) * 255, floats(1)))),
        parsing_error("x", "more than 254 dimensions"),
    ),
    "rank_5000_of_negative_dims": Case(  # rank is checked first
        request(("x", tensor(FLOAT, (-1,) * 5000))),
        parsing_error("x", "more than 254 dimensions"),
    ),
    # --- payload against shape --------------------------------------------------------------
    "content_too_short": Case(
        request(("x", tensor(FLOAT, (2, 3), content(20)))),
        parsing_error("x", "tensor_content of 20 bytes for 6 elements"),
    ),
    "content_too_long": Case(
        request(("x", tensor(FLOAT, (2, 3), content(28)))),
        parsing_error("x", "tensor_content of 28 bytes for 6 elements"),
    ),
    "content_not_a_multiple": Case(
        request(("x", tensor(INT64, (1,), content(7)))),
        parsing_error("x", "tensor_content of 7 bytes for 1 elements"),
    ),
    "too_many_float_val": Case(
        request(("x", tensor(FLOAT, (2, 3), floats(*range(7))))),
        parsing_error("x", "7 values for 6 elements"),
    ),
    "too_many_int_val_unpacked": Case(
        request(("x", tensor(INT32, (2,), b"".join(tag(7, 0) + varint(v) for v in (1, -2, 3))))),
        parsing_error("x", "3 values for 2 elements"),
    ),
    "too_many_string_val": Case(
        request(("x", tensor(STRING, (2,), ld(8, b"a") + ld(8, b"b") + ld(8, b"c")))),
        parsing_error("x", "3 values for 2 elements"),
    ),
    "values_for_an_empty_shape": Case(
        request(("x", tensor(FLOAT, (0, 3), floats(1)))),
        parsing_error("x", "1 values for 0 elements"),
    ),
    "odd_complex_components": Case(
        request(("x", tensor(COMPLEX64, (1,), ld(9, struct.pack("<3f", 1, 2, 3))))),
        parsing_error("x", "odd number of complex components"),
    ),
    "bad_string_content": Case(  # a length of 5 for 1 byte
        request(("x", tensor(STRING, (2,), ld(4, b"\x05a")))),
        parsing_error("x", "bad string tensor_content"),
    ),
    # --- dtypes: a tensorflow.DataType value (1..33, +100 refs) -------------------------------
    **{
        f"dtype_{name}": Case(
            request(("x", tensor(value, (2, 3), content(24)))),
            parsing_error("x", f"invalid dtype {shown}"),
        )
        for name, value, shown in [
            ("invalid_0", 0, 0),
            ("34", 34, 34),
            ("100", 100, 100),
            ("134", 134, 134),
            ("negative", -1, -1),
            ("int32_min", 2**31, -(2**31)),  # an enum is an int32 on the wire
        ]
    },
    "no_value_in_the_entry": Case(  # an empty TensorProto: DT_INVALID
        ld(1, SPEC) + ld(2, ld(1, b"x")),
        parsing_error("x", "invalid dtype 0"),
    ),
    # --- the inputs map -----------------------------------------------------------------
    "duplicate_key": Case(
        request(("x", good_x()), ("x", good_x())),
        parsing_error("x", "the inputs map holds this key more than once"),
    ),
    "duplicate_key_different_values": Case(
        request(("x", good_x(1)), ("aux", good_x(1)), ("x", good_x(2))),
        parsing_error("x", "the inputs map holds this key more than once"),
    ),
    "second_input_bad": Case(  # the message names the bad input, not the first
        request(("x", good_x()), ("mask", tensor(FLOAT, (2, -3)))),
        parsing_error("mask", "negative dimension -3 at index 1"),
    ),
    # --- wire-level damage (the compiled core names the input when it knows it) ----------
    "random_bytes": Case(_random_garbage(1, 64), PARSE, exact=False),
    "random_bytes_after_a_good_prefix": Case(GOOD[:12] + _random_garbage(2, 40), PARSE,
                                             exact=False),
    "truncated": Case(GOOD[:-5], PARSE, exact=False),
    "truncated_in_the_shape": Case(request(("x", good_x()[:5])), PARSE, exact=False),
    "varint_overflow": Case(b"\x08" + b"\x80" * 10 + b"\x01", PARSE, exact=False),
    "varint_overflow_in_a_dim": Case(
        request(("x", tag(1, 0) + varint(FLOAT) + ld(2, ld(2, tag(1, 0) + b"\xff" * 10 + b"\1")))),
        PARSE,
        exact=False,
    ),
    "length_past_the_end": Case(ld(1, SPEC) + b"\x12\x40" + b"\x00" * 8, PARSE, exact=False),
    "length_2_64_minus_1": Case(b"\x12" + b"\xff" * 9 + b"\x01", PARSE, exact=False),
    "content_length_past_the_end": Case(
        request(("x", tensor(FLOAT, (2, 3)) + tag(4, 2) + varint(2**40) + b"abc")),
        PARSE,
        exact=False,
    ),
    "packed_float_of_3_bytes": Case(
        request(("x", tensor(FLOAT, (1,), ld(5, b"\x00\x00\x00")))), PARSE, exact=False
    ),
    "packed_varint_cut_short": Case(
        request(("x", tensor(INT32, (1,), ld(7, b"\x80")))), PARSE, exact=False
    ),
    "wire_type_7": Case(ld(1, SPEC) + b"\x0f", PARSE, exact=False),
    "group_never_closed": Case(ld(1, SPEC) + tag(99, 3) + tag(1, 0) + b"\x01", PARSE,
                               exact=False),
    "groups_nested_too_deeply": Case(tag(99, 3) * 200 + tag(99, 4) * 200, PARSE, exact=False),
    "input_name_not_utf8": Case(ld(1, SPEC) + ld(2, ld(1, b"\xc3") + ld(2, good_x())), PARSE,
                                exact=False),
    "model_name_not_utf8": Case(ld(1, ld(1, b"\xff\xfe")) + ld(2, ld(1, b"x") + ld(2, good_x())),
                                PARSE, exact=False),
}

# Which input the compiled core's wire-level message names (the pure-Python twin relays
# protobuf's message, naming the input only where it can tell).
NAMED_WIRE_CASES = {
    "truncated_in_the_shape": "input x: ",
    "varint_overflow_in_a_dim": "input x: ",
    "content_length_past_the_end": "input x: ",
    "packed_float_of_3_bytes": "input x: ",
    "packed_varint_cut_short": "input x: ",
}


def check_refusal(code: str, message: str, case: Case) -> None:
    assert code == "INVALID_ARGUMENT", (code, message)
    if case.exact:
        assert message == case.message
    else:
        assert message.startswith(case.message), message
    assert len(message) <= 1024


# --- (a) both cores, directly ---------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_core_refuses(core: ModuleType, name: str) -> None:
    case = CASES[name]
    with pytest.raises(core.CodecError) as err:
        core.decode_predict_request(case.data)
    check_refusal(err.value.code, err.value.message, case)
    if name in NAMED_WIRE_CASES and core.__name__.endswith("._core"):
        assert err.value.message.startswith(f"{PARSE}: {NAMED_WIRE_CASES[name]}")
    # The core keeps working.
    assert core.decode_predict_request(GOOD).rows == 2


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.exact])
def test_cores_agree_on_the_message(both_cores, name: str) -> None:
    messages = []
    for core in both_cores:
        with pytest.raises(core.CodecError) as err:
            core.decode_predict_request(CASES[name].data)
        messages.append(err.value.message)
    assert messages[0] == messages[1]


def test_refused_tensors_are_refused_by_decode_tensor_too(core: ModuleType) -> None:
    for dims, payload in [((2, -1), b""), ((2**40, 2**40), floats(1)), ((1,) * 255, b"")]:
        with pytest.raises(core.CodecError) as err:
            core.decode_tensor(tensor(FLOAT, dims, payload))
        assert err.value.code == "INVALID_ARGUMENT"
        assert err.value.message.startswith("tensor parsing error: ")
    with pytest.raises(core.CodecError):
        core.decode_tensor(tensor(77, (1,)))


VALID_BUT_UNBATCHABLE = {
    "no_inputs": request(),
    "scalar": request(("x", tensor(FLOAT, (), floats(1)))),
    "dim0_disagrees": request(("x", good_x(2)), ("y", good_x(3))),
    "resource": request(("x", tensor(20, (1,), ld(14, b"\x0a\x01h")))),
    "variant": request(("x", tensor(21, (1,), ld(15, b"\x0a\x01v")))),
    "float8": request(("x", tensor(24, (1,), ld(18, b"\x01")))),
    "int2_33": request(("x", tensor(33, (2,)))),
    "float_ref": request(("x", tensor(101, (1,), floats(1)))),
    "last_ref": request(("x", tensor(133, (1,)))),
    "fill_past_the_budget": request(("x", tensor(FLOAT, (1, (1 << 26) + 1), floats(1)))),
}


@pytest.mark.parametrize("name", list(VALID_BUT_UNBATCHABLE))
def test_valid_but_unbatchable_requests_are_not_refused(core: ModuleType, name: str) -> None:
    call = core.decode_predict_request(VALID_BUT_UNBATCHABLE[name])
    assert call.rows == -1


# --- replica responses ------------------------------------------------------------------


def response(*entries: tuple[str, bytes]) -> bytes:
    return b"".join(ld(1, ld(1, k.encode()) + ld(2, v)) for k, v in entries) + ld(
        2, ld(1, b"identity")
    )


RESPONSE_CASES = {
    # name: (response bytes, rows, code)
    "negative_dim": (response(("y", tensor(FLOAT, (2, -1)))), [1, 1], "FAILED_PRECONDITION"),
    "unknown_rank": (
        response(("y", tensor(FLOAT, (2,), unknown_rank=True))),
        [1, 1],
        "FAILED_PRECONDITION",
    ),
    "scalar": (response(("y", tensor(FLOAT, (), floats(1)))), [1], "FAILED_PRECONDITION"),
    "dim0_mismatch": (response(("y", tensor(FLOAT, (3,), floats(1)))), [1, 1],
                      "FAILED_PRECONDITION"),
    "unknown_dtype": (response(("y", tensor(77, (2,)))), [1, 1], "FAILED_PRECONDITION"),
    "huge_inner_shape": (
        response(("y", tensor(FLOAT, (2, 2**40, 2**40), floats(1)))),
        [1, 1],
        "INTERNAL",
    ),
    "inner_product_overflows": (
        response(("y", tensor(FLOAT, (2, 2**62, 2**62, 0)))),
        [1, 1],
        "INTERNAL",
    ),
    "rank_255": (response(("y", tensor(FLOAT, (2,) + (1,) * 254))), [1, 1], "INTERNAL"),
    "content_mismatch": (response(("y", tensor(FLOAT, (2,), content(7)))), [1, 1], "INTERNAL"),
    "too_many_values": (response(("y", tensor(FLOAT, (2,), floats(1, 2, 3)))), [1, 1],
                        "INTERNAL"),
    "odd_complex": (response(("y", tensor(COMPLEX64, (2,), ld(9, bytes(12))))), [1, 1],
                    "INTERNAL"),
    "bad_string_content": (response(("y", tensor(STRING, (2,), ld(4, b"\x09a")))), [1, 1],
                           "INTERNAL"),
    "partial_fill_too_large": (
        response(("y", tensor(DOUBLE, (2, 2**25), ld(6, bytes(16))))),
        [1, 1],
        "INTERNAL",
    ),
    "truncated": (response(("y", tensor(FLOAT, (2,), floats(1, 2))))[:-4], [1, 1], "INTERNAL"),
    "random_bytes": (_random_garbage(3, 64), [1, 1], "INTERNAL"),
    "length_past_the_end": (b"\x0a\x7f" + bytes(10), [1], "INTERNAL"),
    "bad_model_spec": (ld(2, ld(1, b"\xff")), [1], "INTERNAL"),
}


@pytest.mark.parametrize("name", list(RESPONSE_CASES))
def test_split_and_concat_refuse_hostile_responses(core: ModuleType, name: str) -> None:
    data, rows, code = RESPONSE_CASES[name]
    with pytest.raises(core.CodecError) as err:
        core.split_predict_response(data, rows)
    assert err.value.code == code, err.value.message
    if name == "dim0_mismatch":
        return  # only wrong for the rows asked: joining such parts is fine
    with pytest.raises(core.CodecError) as err:
        core.concat_predict_responses([data, data])
    assert err.value.code in ("FAILED_PRECONDITION", "INTERNAL")
    good = response(("y", tensor(FLOAT, (1,), floats(1))))
    with pytest.raises(core.CodecError):
        core.concat_predict_responses([good, data])


def test_concat_refuses_parts_that_disagree(core: ModuleType) -> None:
    a = response(("y", tensor(FLOAT, (1, 2), floats(1, 2))))
    b = response(("y", tensor(FLOAT, (1, 3), floats(1, 2, 3))))
    c = response(("z", tensor(FLOAT, (1, 2), floats(1, 2))))
    d = response(("y", tensor(INT32, (1, 2), ld(7, b"\x01\x02"))))
    for parts in ([a, b], [a, c], [a, d]):
        with pytest.raises(core.CodecError) as err:
            core.concat_predict_responses(parts)
        assert err.value.code in ("FAILED_PRECONDITION", "INTERNAL")


def test_split_row_counts_from_the_proxy_are_checked(core: ModuleType) -> None:
    data = response(("y", tensor(FLOAT, (2,), floats(1, 2))))
    with pytest.raises(core.CodecError) as err:
        core.split_predict_response(data, [3, -1])
    assert err.value.code == "INTERNAL"


# --- (b) end to end over gRPC, on both cores ----------------------------------------------

CORE_ENVS = {"cython": {}, "python": {"BATCHPROXY_NO_EXTENSIONS": "1"}}


@pytest.fixture(scope="module", params=list(CORE_ENVS))
def fleet(request):
    """An identity replica and a proxy in front (once per core implementation)."""
    replica = start_replica("identity", env=CORE_ENVS[request.param])
    proxy = start_proxy(
        [replica],
        env=CORE_ENVS[request.param],
        max_batch_size=64,
        batch_timeout_micros=50000,
        rest_max_body_bytes=1 << 16,
    )
    assert f"core={request.param}" in proxy.output()
    deadline = time.monotonic() + 15
    while True:  # a replica just started may not be healthy yet
        try:
            with grpc.insecure_channel(proxy.address) as channel:
                channel.unary_unary(PREDICT)(GOOD, timeout=5)
            break
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield request.param, proxy, replica
    proxy.stop()
    replica.stop()


def replica_predicts(rest_url: str) -> dict[str, float]:
    """The replica's own count of Predict calls, by status code."""
    text = requests.get(f"{rest_url}/monitoring/prometheus/metrics", timeout=5).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "batchproxy_replica_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("method") == "Predict":
                out[sample.labels["code"]] = sample.value
    return out


GOOD_ROWS = [1, 2, 3, 4, 5]


def good_inputs(salt: int) -> list[np.ndarray]:
    return [
        (salt * 1000 + i * 100 + np.arange(r * 3).reshape(r, 3)).astype(np.float32)
        for i, r in enumerate(GOOD_ROWS)
    ]


async def send_among_good_ones(address: str, bad: bytes, salt: int):
    """Send `bad` concurrently with good requests (so they would share a batch); check the
    good answers and return the bad call's (code name, details)."""
    arrays = good_inputs(salt)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(PREDICT)

        async def good(i: int) -> bytes:
            req = predict_request("identity", {"x": arrays[i]}, typed=i % 2 == 0)
            return await call(req.SerializeToString(), timeout=30)

        async def refused() -> tuple[str, str]:
            try:
                await call(bad, timeout=30)
            except grpc.aio.AioRpcError as err:
                return err.code().name, err.details()
            return "OK", ""

        results = await asyncio.gather(
            good(0), good(1), refused(), good(2), good(3), good(4)
        )
    answers = [results[i] for i in (0, 1, 3, 4, 5)]
    for arr, raw in zip(arrays, answers, strict=True):
        out = predict_pb2.PredictResponse.FromString(raw)
        np.testing.assert_array_equal(to_array(out.outputs["y"]), arr)
    return results[2]


@pytest.mark.parametrize("name", list(CASES))
async def test_proxy_refuses_and_serves_the_others(fleet, name: str) -> None:
    kind, proxy, replica = fleet
    case = CASES[name]
    before_rows = batch_rows_histogram(replica.rest_url)
    before_calls = replica_predicts(replica.rest_url)
    code, details = await send_among_good_ones(proxy.address, case.data, len(name))
    check_refusal(code, details, case)
    if name in NAMED_WIRE_CASES and kind == "cython":
        assert details.startswith(f"{PARSE}: {NAMED_WIRE_CASES[name]}")
    after_rows = batch_rows_histogram(replica.rest_url)
    after_calls = replica_predicts(replica.rest_url)
    # The replica saw exactly the good rows, and no Predict it had to refuse: the bad
    # request was never forwarded, batched or alone.
    assert after_rows["sum"] - before_rows.get("sum", 0) == sum(GOOD_ROWS)
    refused = {c: n - before_calls.get(c, 0) for c, n in after_calls.items() if c != "OK"}
    assert not any(refused.values()), refused
    assert after_calls["OK"] - before_calls.get("OK", 0) == after_rows["count"] - before_rows.get(
        "count", 0
    )


async def test_everything_at_once_then_still_serving(fleet) -> None:
    """Every bad case in one burst among good callers; the proxy answers afterwards."""
    _, proxy, replica = fleet
    before = batch_rows_histogram(replica.rest_url)
    arrays = good_inputs(7)
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        call = channel.unary_unary(PREDICT)

        async def bad(case: Case) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(case.data, timeout=30)
            check_refusal(err.value.code().name, err.value.details(), case)

        async def good(arr: np.ndarray) -> None:
            raw = await call(predict_request("identity", {"x": arr}).SerializeToString(),
                             timeout=30)
            out = predict_pb2.PredictResponse.FromString(raw)
            np.testing.assert_array_equal(to_array(out.outputs["y"]), arr)

        await asyncio.gather(*(bad(c) for c in CASES.values()), *(good(a) for a in arrays * 4))
        await good(arrays[0])  # and afterwards
    after = batch_rows_histogram(replica.rest_url)
    assert after["sum"] - before["sum"] == 4 * sum(GOOD_ROWS) + GOOD_ROWS[0]


# --- REST: JSON-level hostile input ---------------------------------------------------------

DEEP = 20_000  # 40 KB of brackets: within the fleet's 64 KiB body limit
REST_CASES: dict[str, tuple[bytes, dict[str, str], int | tuple[int, ...], str]] = {
    # name: (body, headers, HTTP status(es), text the {"error": ...} message holds)
    "malformed_json": (b'{"instances": [[1, 2]', {}, 400, "JSON Parse error"),
    "not_utf8": (b'{"instances": [["\xff\xfe"]]}', {}, 400, "JSON Parse error"),
    "nul_bytes": (b"\x00" * 32, {}, 400, "JSON Parse error"),
    "deep_list_nesting": (b'{"instances": ' + b"[" * DEEP + b"]" * DEEP + b"}", {}, 400, ""),
    "deep_object_nesting": (b'{"a":' * (DEEP // 3) + b"1" + b"}" * (DEEP // 3), {}, 400, ""),
    "ragged_instances": (b'{"instances": [[1, 2], [3]]}', {}, 400, "Expecting tensor size"),
    "ragged_columnar": (b'{"inputs": {"x": [[1, 2], [3]]}}', {}, 400, ""),
    "ragged_depth": (b'{"instances": [[1, 2], [[3, 4]]]}', {}, 400, ""),
    "string_for_float": (b'{"instances": [["a", 1]]}', {}, 400, "is not of expected type"),
    "bool_for_float": (b'{"instances": [[true, 1]]}', {}, 400, ""),
    "null_for_float": (b'{"instances": [[null, 1]]}', {}, 400, ""),
    "object_for_float": (b'{"instances": [[{"a": 1}, 1]]}', {}, 400, ""),
    "b64_for_float": (b'{"instances": [[{"b64": "!!!garbage***"}]]}', {}, 400, ""),
    "instances_not_a_list": (b'{"instances": 5}', {}, 400, ""),
    "empty_instances": (b'{"instances": []}', {}, 400, ""),
    # Out of double range: refused, as TFS's JSON parser does (only the literal is infinite).
    "huge_number": (b'{"instances": [[1e999999, 1]]}', {}, 400,
                    "Number too big to be stored in double"),
    "huge_integer": (b'{"instances": [[' + b"9" * 5000 + b", 1]]}", {}, 400, ""),
    "body_too_large": (b'{"instances": [[' + b"1," * 40_000 + b"1]]}", {}, 413,
                       "exceeds the limit"),
    "gzip_bomb": (gzip.compress(b'{"instances": [[1]]' + b" " * 4_000_000 + b"}"),
                  {"Content-Encoding": "gzip"}, 413, "after gzip decompression"),
    "gzip_garbage": (b"\x1f\x8b\x08\x00garbage", {"Content-Encoding": "gzip"}, 400,
                     "Could not decompress"),
}


def rest_predict(proxy, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(f"{proxy.rest_url}/v1/models/identity:predict", data=body,
                         headers=headers, timeout=60)


@pytest.mark.parametrize("name", list(REST_CASES))
def test_rest_refuses_hostile_json(fleet, name: str) -> None:
    _, proxy, replica = fleet
    body, headers, status, text = REST_CASES[name]
    statuses = status if isinstance(status, tuple) else (status,)
    before = batch_rows_histogram(replica.rest_url)
    response = rest_predict(proxy, body, headers)
    assert response.status_code in statuses, response.text[:500]
    assert response.headers["Content-Type"] == "application/json"
    doc = response.json()
    if response.status_code != 200:
        assert set(doc) == {"error"} and text in doc["error"], doc
        assert batch_rows_histogram(replica.rest_url)["sum"] == before["sum"]
    # Still serving, over both transports.
    ok = rest_predict(proxy, b'{"instances": [[1.5, 2]]}', {})
    assert ok.status_code == 200 and ok.json() == {"predictions": [[1.5, 2.0]]}
    with grpc.insecure_channel(proxy.address) as channel:
        channel.unary_unary(PREDICT)(GOOD, timeout=10)


# Typed inputs other than float: the replica's `multi` model (strings; bool, int32, uint64
# and double in its `types` signature).
MULTI_CASES: dict[str, tuple[str, int | tuple[int, ...], str]] = {
    "b64_garbage": ('{"signature_name": "lengths", "instances": [{"b64": "!!!not-base64***"}]}',
                    400, "Unable to base64 decode"),
    "b64_not_a_string": ('{"signature_name": "lengths", "instances": [{"b64": 5}]}', 400, ""),
    "b64_with_extra_keys": ('{"signature_name": "lengths", "instances": [{"b64": "YQ==", "x": 1}]}',
                            400, ""),
    "number_for_string": ('{"signature_name": "lengths", "instances": [1]}', 400,
                          "is not of expected type: string"),
    "lone_surrogate": ('{"signature_name": "lengths", "instances": ["\\ud800"]}', (200, 400), ""),
    "int32_overflow": ('{"signature_name": "types", "instances": '
                       '[{"b": true, "i": 99999999999, "u": 1, "d": 1}]}', 400, "int32"),
    "float_for_int": ('{"signature_name": "types", "instances": '
                      '[{"b": true, "i": 1.5, "u": 1, "d": 1}]}', 400, "int32"),
    "uint64_overflow": ('{"signature_name": "types", "instances": '
                        '[{"b": true, "i": 1, "u": 18446744073709551616, "d": 1}]}', 400, ""),
    "negative_uint64": ('{"signature_name": "types", "instances": '
                        '[{"b": true, "i": 1, "u": -1, "d": 1}]}', 400, ""),
    "number_for_bool": ('{"signature_name": "types", "instances": '
                        '[{"b": 2, "i": 1, "u": 1, "d": 1}]}', 400, "bool"),
}


@pytest.fixture(scope="module")
def multi_proxy():
    replica = start_replica("multi", model_name="multi", model_version=3)
    proxy = start_proxy([replica])
    good = '{"signature_name": "lengths", "instances": ["abc"]}'
    deadline = time.monotonic() + 15
    while rest_model_predict(proxy, "multi", good).status_code != 200:
        assert time.monotonic() < deadline, "the multi model never answered"
        time.sleep(0.1)
    yield proxy
    proxy.stop()
    replica.stop()


def rest_model_predict(proxy, model: str, body: str) -> requests.Response:
    return requests.post(f"{proxy.rest_url}/v1/models/{model}:predict", data=body, timeout=30)


@pytest.mark.parametrize("name", list(MULTI_CASES))
def test_rest_refuses_hostile_typed_json(multi_proxy, name: str) -> None:
    body, status, text = MULTI_CASES[name]
    statuses = status if isinstance(status, tuple) else (status,)
    response = rest_model_predict(multi_proxy, "multi", body)
    assert response.status_code in statuses, response.text[:500]
    if response.status_code != 200:
        assert set(response.json()) == {"error"} and text in response.json()["error"]
    good = '{"signature_name": "lengths", "instances": ["ab"]}'
    ok = rest_model_predict(multi_proxy, "multi", good)
    assert ok.status_code == 200 and ok.json() == {"predictions": [2]}


def test_proxy_processes_survived(fleet) -> None:
    _, proxy, replica = fleet
    assert proxy.popen.poll() is None and replica.popen.poll() is None
    assert "Traceback" not in proxy.output()


def test_the_table_is_complete() -> None:
    # Every class of the issue has a row (a guard against a table edited into gaps).
    kinds = {
        "random": "random_bytes",
        "truncated": "truncated",
        "varint overflow": "varint_overflow",
        "length past the end": "length_past_the_end",
        "negative dimension": "negative_dim",
        "huge dimension": "past_the_element_bound",
        "int64 overflow": "product_overflows_int64",
        "content length": "content_too_short",
        "typed value count": "too_many_float_val",
        "unknown dtype": "dtype_34",
        "duplicated key": "duplicate_key",
        "rank": "rank_255",
        "unknown rank": "unknown_rank",
    }
    assert set(kinds.values()) <= set(CASES)
    # The semantic cases are wire-valid: protobuf itself takes them.
    for name in ("negative_dim", "dtype_34", "duplicate_key", "rank_255", "unknown_rank"):
        req = predict_pb2.PredictRequest.FromString(CASES[name].data)
        assert isinstance(req.inputs["x"], tensor_pb2.TensorProto)
