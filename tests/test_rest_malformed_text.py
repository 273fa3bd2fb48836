"""REST bodies that are not text: a lone surrogate ("\\ud800") as a signature name, an
instance or input key, a feature name or a value, and raw bytes that are not UTF-8. Each is
a 400 with TFS's {"error": ...}, on predict, classify and regress alike; no answer is a 500,
and no 500 carries an exception's repr."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import aiohttp
import pytest
import requests
from procs import Process, start_replica
from proxy_procs import start_proxy

from batchproxy.errors import INTERNAL_ERROR_MESSAGE
from batchproxy.frontends import json_text, rest_json
from batchproxy.frontends.predict_service import PredictService
from batchproxy.frontends.rest import RestServer

GOOD_PREDICT = '{"instances": [{"text": "ab", "x": [1, 2]}]}'
# (verb, body). orjson refuses a lone surrogate, and NaN; either sends a body to Python's
# parser, which takes lone surrogates unless told not to. Every case is tried with NaN and
# without.
CASES: dict[str, tuple[str, bytes]] = {
    "signature_name": ("predict", rb'{"signature_name": "\ud800", "instances": '
                                  rb'[{"text": "a", "x": [1, NaN]}]}'),
    "instance_key": ("predict", rb'{"instances": [{"\ud800": 1, "text": "a", "x": [1, NaN]}]}'),
    "only_key": ("predict", rb'{"instances": [{"\udc00": [1, NaN]}]}'),
    "input_key": ("predict", rb'{"inputs": {"\ud800": [1], "x": [[1, NaN]]}}'),
    "top_level_key": ("predict", rb'{"\ud800": NaN, "instances": [{"text": "a", "x": [1, 2]}]}'),
    "string_value": ("predict", rb'{"instances": [{"text": "\ud800", "x": [1, NaN]}]}'),
    "float_value": ("predict", rb'{"instances": [{"text": "a", "x": ["\ud800", NaN]}]}'),
    "b64_value": ("predict", rb'{"instances": [{"text": {"b64": "\ud800"}, "x": [1, NaN]}]}'),
    "raw_surrogate_bytes": ("predict",
                            b'{"instances": [{"text": "\xed\xa0\x80", "x": [1, NaN]}]}'),
    "classify_feature_name": ("classify", rb'{"examples": [{"\ud800": NaN}]}'),
    "classify_signature_name": ("classify",
                                rb'{"signature_name": "\ud800", "examples": [{"p": NaN}]}'),
    "classify_value": ("classify", rb'{"examples": [{"p": NaN, "s": "\udfff"}]}'),
    "classify_context": ("classify",
                         rb'{"context": {"\ud800": 1}, "examples": [{"p": NaN}]}'),
    "regress_feature_name": ("regress", rb'{"examples": [{"\ud800": NaN}]}'),
    "regress_value": ("regress", rb'{"examples": [{"x": NaN, "s": ["a", "\ud800"]}]}'),
}


@pytest.fixture(scope="module")
def proxy() -> Iterator[Process]:
    with start_replica("multi", model_name="m") as replica, start_proxy([replica]) as proxy:
        deadline = time.monotonic() + 30
        while post(proxy, "predict", GOOD_PREDICT.encode()).status_code != 200:
            assert time.monotonic() < deadline, "the model never answered"
            time.sleep(0.1)
        yield proxy


def post(proxy: Process, verb: str, body: bytes) -> requests.Response:
    return requests.post(f"{proxy.rest_url}/v1/models/m:{verb}", data=body, timeout=30)


def assert_tfs_error(response: requests.Response, status: int = 400) -> str:
    assert response.status_code == status, response.text[:500]
    assert response.headers["Content-Type"].startswith("application/json")
    doc = response.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str), doc
    return doc["error"]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("nan", [True, False], ids=["with_nan", "without_nan"])
def test_text_that_is_not_text_is_a_400(proxy: Process, name: str, nan: bool) -> None:
    verb, body = CASES[name]
    if not nan:
        body = body.replace(b"NaN", b"1.5")
    message = assert_tfs_error(post(proxy, verb, body))
    assert message.startswith("JSON Parse error"), message
    # Still serving.
    assert post(proxy, "predict", GOOD_PREDICT.encode()).status_code == 200


def test_a_surrogate_pair_is_text(proxy: Process) -> None:
    # U+1F600 as an escaped UTF-16 pair, through Python's parser (NaN) and orjson alike.
    for x in ("NaN", "2"):
        body = f'{{"instances": [{{"text": "\\ud83d\\ude00", "x": [1, {x}]}}]}}'.encode()
        response = post(proxy, "predict", body)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["upper"] == "\U0001f600"


def test_the_proxy_logged_no_traceback(proxy: Process) -> None:
    assert "Traceback" not in proxy.output()


# --- the text check itself ------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    r'"\ud800"', r'"\uDBFF x"', r'"\udc00"', r'"\ud800\ud800"', r'"\ude00\ud83d"',
    r'"\\\ud800"',  # an escaped backslash, then a lone escape
])
def test_lone_surrogate_escapes_are_refused(text: str) -> None:
    with pytest.raises(json_text.InvalidText, match="surrogate pair"):
        json_text.body_text(text.encode())


@pytest.mark.parametrize("text", [
    r'"\ud83d\ude00"', r'"\\ud800"', r'"\\\\ud800"', r'"\u00e9\n\"\\"', '"é"', "[NaN]",
])
def test_other_text_passes(text: str) -> None:
    assert json_text.body_text(text.encode()) == text


def test_bytes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(json_text.InvalidText, match="Invalid encoding in string at offset 1"):
        json_text.body_text(b'"\xed\xa0\x80"')


def test_an_error_body_is_json_whatever_the_message() -> None:
    body = rest_json.error_body("no such input: \ud800")
    assert json.loads(body) == {"error": "no such input: \ud800"}
    assert rest_json.error_body("plain") == b'{"error":"plain"}'


# --- a bug's answer ----------------------------------------------------------------------------


class BrokenEngine:
    """Every call fails the way a bug would."""

    async def submit(self, call, timeout=None, priority=None) -> bytes:
        raise RuntimeError("secret internals")

    async def forward(self, path, request, timeout, model="") -> bytes:
        raise RuntimeError("secret internals")


async def test_an_internal_error_is_a_500_without_the_exception() -> None:
    service = PredictService(BrokenEngine())
    server = RestServer(service, "127.0.0.1", 0)
    await server.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as client:
            for path, body in [("/v1/models/m:classify", b'{"examples": [{"p": 1}]}'),
                               ("/v1/models/m:regress", b'{"examples": [{"x": 1}]}')]:
                response = await client.post(path, data=body)
                assert response.status == 500
                assert await response.json() == {"error": INTERNAL_ERROR_MESSAGE}
    finally:
        await server.stop()
    # Counted as a failure, not as OK.
    codes = {key[3] for key in service.metrics._request_children}
    assert codes == {"INTERNAL"}
