"""RestFrontend._post_route: POST paths parsed once and remembered, within a bound."""

from __future__ import annotations

from batchproxy.frontends import rest
from batchproxy.frontends.predict_service import PredictService
from batchproxy.frontends.rest import RestFrontend
from batchproxy.frontends.signatures import SignatureCache


class NoEngine:
    async def forward(self, path, request, timeout, model="") -> bytes:
        raise AssertionError("not called")


def frontend() -> RestFrontend:
    service = PredictService(NoEngine())
    return RestFrontend(service, SignatureCache(service.forward))


def test_a_post_path_is_parsed_as_the_pattern_says_and_remembered():
    front = frontend()
    route = front._post_route("/V1/Models/M/versions/3:PREDICT")
    assert route == ("M", "3", None, "predict", "Predict")
    assert front._post_route("/V1/Models/M/versions/3:PREDICT") is route
    assert front._post_route("/v1/models/m/labels/canary:classify") == (
        "m", None, "canary", "classify", "Classify")
    assert front._post_route("/v1/models/m:explain") is None
    assert front._post_route("/v2/models/m:predict") is None
    assert set(front._post_routes) == {"/V1/Models/M/versions/3:PREDICT",
                                       "/v1/models/m/labels/canary:classify"}


def test_remembered_paths_are_bounded():
    front = frontend()
    for index in range(rest.MAX_CACHED_ROUTES + 10):
        assert front._post_route(f"/v1/models/m{index}:predict") is not None
    assert 0 < len(front._post_routes) <= rest.MAX_CACHED_ROUTES
