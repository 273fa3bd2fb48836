"""The REST face of the proxy: TensorFlow Serving's HTTP/JSON API (port 8501) on aiohttp.

A predict body is typed by the model's signature (signatures.SignatureCache), becomes a
codec.PredictCall and goes to the same predict service as gRPC calls: a REST caller and a
gRPC caller of one model can travel in one batch. Status, metadata, classify and regress are
forwarded to a replica unbatched and their answers written as TFS writes them. Errors are
{"error": message} under TFS's HTTP status for the gRPC code.

    POST /v1/models/{name}[/versions/{n}|/labels/{l}]:(predict|classify|regress)
    GET  /v1/models/{name}[/versions/{n}|/labels/{l}][/metadata]

Request headers: `Content-Encoding: gzip` is accepted; `X-Request-Timeout-Ms: <ms>` is the
call's deadline, as a gRPC deadline is (an expired call leaves the batch queue and gets 504);
`X-Batchproxy-Priority: critical|sheddable` is a predict call's priority, as the gRPC
metadata key of the same name is.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import ssl
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from batchproxy import codec
from batchproxy.auth import UNAUTHENTICATED_MESSAGE, TokenAuth
from batchproxy.errors import INTERNAL_ERROR_MESSAGE, ProxyError
from batchproxy.frontends import rest_json
from batchproxy.frontends.predict_service import CallRecord, PredictService
from batchproxy.frontends.signatures import ModelKey, SignatureCache, model_spec
from batchproxy.methods import CLASSIFY, GET_MODEL_METADATA, GET_MODEL_STATUS, REGRESS
from batchproxy.priority import HEADER as PRIORITY_HEADER
from batchproxy.priority import parse_priority
from batchproxy.protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
)

log = logging.getLogger(__name__)

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
DEFAULT_MAX_BODY_BYTES = 64 << 20
MAX_CACHED_SPECS = 1024
MAX_CACHED_ROUTES = 1024

# TFS's own route patterns (http_rest_api_util.cc), matched whole and case-insensitively.
PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:/versions/(\d+)|/labels/([^/:]+))?:(classify|regress|predict)",
    re.IGNORECASE,
)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:/versions/(\d+)|/labels/([^/:]+))?(?:/(metadata))?",
    re.IGNORECASE,
)

# gRPC status -> HTTP status, as TFS maps them (API.md).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_REASONS = {499: "Client Closed Request"}  # not in http.HTTPStatus

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


class HttpError(Exception):
    """A refusal that has an HTTP status but no gRPC code (413, 404 outside /v1/)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, reason=_REASONS.get(status),
                        content_type="application/json")


def error_response(status: int, message: str) -> web.Response:
    return json_response(rest_json.error_body(message), status)


def _invalid(message: str) -> ProxyError:
    return ProxyError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _version(text: str | None) -> int | None:
    if text is None:
        return None
    version = int(text)  # the pattern only lets digits through
    if version > 2**63 - 1:
        raise _invalid(f"Failed to convert version: {text} to numeric.")
    return version


class _Deadline:
    """The caller's X-Request-Timeout-Ms, counted from the request's arrival."""

    __slots__ = ("at", "loop")

    def __init__(self, headers: Mapping[str, str]) -> None:
        self.loop = asyncio.get_running_loop()
        self.at: float | None = None
        raw = headers.get(TIMEOUT_HEADER)
        if raw is None:
            return
        try:
            ms = float(raw)
        except ValueError:
            ms = math.nan
        if not math.isfinite(ms) or ms < 0:
            raise _invalid(
                f"Invalid {TIMEOUT_HEADER} header: {raw!r} (expected a non-negative number "
                "of milliseconds)"
            )
        self.at = self.loop.time() + ms / 1000.0

    def remaining(self) -> float | None:
        """Seconds left (None: no deadline); DEADLINE_EXCEEDED once there are none."""
        if self.at is None:
            return None
        left = self.at - self.loop.time()
        if left <= 0:
            raise ProxyError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        return left


def _response_outputs(data: bytes) -> tuple[dict[str, codec.Tensor], int | None]:
    """(outputs by name, the version that answered) of a serialized PredictResponse, read by
    the codec without building protobuf messages. A malformed answer is INTERNAL: the
    replica broke the contract, not the caller."""
    try:
        return codec.decode_predict_response(data)
    except codec.CodecError as err:
        raise ProxyError(grpc.StatusCode.INTERNAL,
                         f"Could not read the replica's PredictResponse: {err.message}") from None


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` gets its interim answer before the body is read (curl sends it
    for bodies over 1 KiB and otherwise waits a second); any other expectation is refused
    with 417, as aiohttp's router does. HTTP/1.0 has no Expect: the header is ignored there."""
    if request.version != HttpVersion11:
        return None
    expect = request.headers.get("Expect", "")
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own body is yet to come
        await request.writer.drain()
        return None
    return error_response(417, f"Unknown Expect: {expect}")


class RestFrontend:
    """HTTP transport only: routes, bodies, JSON and HTTP codes; calls go to the predict
    service."""

    def __init__(self, service: PredictService, signatures: SignatureCache,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, *,
                 auth: TokenAuth | None = None, body_timeout_s: float = 30.0) -> None:
        self.service = service
        self.signatures = signatures
        self.max_body_bytes = max_body_bytes
        self.auth = auth
        self.body_timeout_s = body_timeout_s
        # Serialized ModelSpecs by (model key, signature): the same few on every call.
        self._specs: dict[tuple[ModelKey, str], bytes] = {}
        self._post_routes: dict[str, tuple[str, str | None, str | None, str, str]] = {}
        self._extras: dict[tuple[str, str], Handler] = {}

    def _spec(self, key: ModelKey, signature_name: str) -> bytes:
        spec = self._specs.get((key, signature_name))
        if spec is None:
            if len(self._specs) >= MAX_CACHED_SPECS:  # model names come from clients
                self._specs.clear()
            spec = model_spec(*key, signature_name).SerializeToString()
            self._specs[(key, signature_name)] = spec
        return spec

    def make_server(self, extra_routes: Iterable[web.RouteDef] = (),
                    **handler_args: Any) -> web.Server:
        """aiohttp's low-level server, dispatching to this frontend itself. An Application
        would add its router, match info, middleware chain and response signal to every
        call (a sixth of a bare handler's CPU), and the proxy needs none of them: one
        catch-all handler does its own routing, since TFS matches its paths
        case-insensitively and aiohttp's router does not. `extra_routes` (metrics,
        readiness, debug) are plain GETs on exact paths. Needs a running loop."""
        extras: dict[tuple[str, str], Handler] = {}
        for route in extra_routes:
            extras[route.method, route.path] = route.handler
            if route.method == "GET" and route.kwargs.get("allow_head", True):
                extras["HEAD", route.path] = route.handler
        self._extras = extras
        loop = asyncio.get_running_loop()
        max_body = self.max_body_bytes

        def make_request(message: RawRequestMessage, payload: StreamReader,
                         protocol: RequestHandler, writer: AbstractStreamWriter,
                         task: asyncio.Task[None]) -> web.Request:
            # The body limit is enforced in _body() (after gunzip too); aiohttp's own check
            # guards the raw read with the same bound.
            return web.Request(message, payload, protocol, writer, task, loop,
                               client_max_size=max_body)

        # make_request gives every handler a web.Request; aiohttp types it as BaseRequest.
        return web.Server(self.serve, request_factory=make_request,  # type: ignore[arg-type]
                          loop=loop, **handler_args)

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """Every HTTP request: `Expect` answered as an Application would, then an extra
        route if one is on the exact method and path, else the TFS API."""
        if request.headers.get("Expect"):
            refusal = await _expect(request)
            if refusal is not None:
                return refusal
        extra = self._extras.get((request.method, request.path))
        if extra is not None:
            return await extra(request)
        return await self.handle(request)

    async def handle(self, request: web.Request) -> web.Response:
        with self.service.observe("rest", "unknown") as call:
            try:
                if self.auth is not None and not self.auth.accepts(
                        request.headers.get("Authorization")):
                    self.service.metrics.reject("unauthenticated")
                    raise ProxyError(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
                return json_response(await self._route(request, call))
            except ProxyError as err:
                call.code = err.code.name
                return error_response(http_status(err.code), err.message)
            except HttpError as err:
                call.code = f"HTTP_{err.status}"
                response = error_response(err.status, err.message)
                if err.status == 408:
                    # The unread rest of the body would be taken for the next request.
                    response.force_close()
                return response
            except Exception:  # a bug: answer in TFS's shape rather than drop the call
                call.code = "INTERNAL"
                log.exception("REST %s %s failed", request.method, request.path)
                # The details stay in the log: an exception's text is no client's business.
                return error_response(500, INTERNAL_ERROR_MESSAGE)

    def _post_route(self, path: str) -> tuple[str, str | None, str | None, str, str] | None:
        """(name, version text, label, verb, method name) of a POST path PREDICT_PATH
        matches, or None. Remembered by path: the same few paths come on every call, and
        the match costs more than the lookup (bounded: paths come from clients)."""
        route = self._post_routes.get(path)
        if route is None and (match := PREDICT_PATH.fullmatch(path)):
            name, version, label, verb = match.groups()
            verb = verb.lower()
            route = (name, version, label, verb, verb.capitalize())
            if len(self._post_routes) >= MAX_CACHED_ROUTES:
                self._post_routes.clear()
            self._post_routes[path] = route
        return route

    async def _route(self, request: web.Request, call: CallRecord) -> bytes:
        deadline = _Deadline(request.headers)
        method, path = request.method, request.path
        # A path PREDICT_PATH matches starts with /v1/ (in any case).
        route = self._post_route(path) if method == "POST" else None
        if route is None and not path.lower().startswith("/v1/"):
            raise HttpError(404, f"Not found: {method} {path}")
        if route is not None:
            name, version, label, verb, call.method = route
            call.model = name
            key = (name, _version(version), label)
            if verb == "predict":
                return await self._predict(request, key, deadline)
            return await self._classify_regress(request, verb, key, deadline)
        if method == "GET" and (match := STATUS_PATH.fullmatch(path)):
            name, version, label, metadata = match.groups()
            call.method = "GetModelMetadata" if metadata else "GetModelStatus"
            if not name:
                raise _invalid("Missing model name in request.")
            call.model = name
            key = (name, _version(version), label)
            return await self._status(key, bool(metadata), deadline)
        raise _invalid(f"Malformed request: {method} {path}")

    # -- the body ----------------------------------------------------------------------------

    def _too_large(self, what: str) -> HttpError:
        return HttpError(413, f"The request body{what} exceeds the limit of "
                              f"{self.max_body_bytes} bytes")

    async def _body(self, request: web.Request) -> bytes:
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise self._too_large(f" of {length} bytes")
        try:
            content = request.content
            if content.is_eof():
                # The whole body came with the headers (any small call): taken as it lies
                # in the buffer, with no timer to arm and cancel and no copy (read() joins
                # the chunks into a bytearray, then copies that to bytes).
                raw = content.read_nowait()
                if len(raw) > self.max_body_bytes:  # chunked: no length to check first
                    raise self._too_large("")
            else:
                # A slow sender must not hold a connection and its buffer forever.
                async with asyncio.timeout(self.body_timeout_s):
                    raw = await request.read()
        except TimeoutError:
            raise HttpError(408, f"The request body was not received within "
                                 f"{self.body_timeout_s:g} s") from None
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large("") from None
        except (HttpProcessingError, ConnectionError) as err:  # e.g. the client hung up
            raise HttpError(400, f"Could not read the request body: {err}") from None
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("", "identity"):
            return raw
        if encoding in ("gzip", "x-gzip"):
            return self._gunzip(raw)
        raise _invalid(f"Unsupported Content-Encoding: {encoding} (only gzip is accepted)")

    def _gunzip(self, raw: bytes) -> bytes:
        """Inflate a gzip body, stopping at the size limit (a small body may inflate to
        gigabytes). Concatenated gzip members are read one after another, as gunzip does."""
        parts: list[bytes] = []
        size = 0
        data = raw
        try:
            while data:
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                part = inflater.decompress(data, self.max_body_bytes - size + 1)
                size += len(part)
                if size > self.max_body_bytes or inflater.unconsumed_tail:
                    raise self._too_large(" after gzip decompression")
                if not inflater.eof:
                    raise _invalid("Could not decompress the gzip request body: it is truncated")
                parts.append(part)
                data = inflater.unused_data
        except zlib.error as err:
            raise _invalid(f"Could not decompress the gzip request body: {err}") from None
        return b"".join(parts)

    # -- predict -----------------------------------------------------------------------------

    async def _predict(self, request: web.Request, key: ModelKey, deadline: _Deadline) -> bytes:
        with self.service.validating():
            priority = parse_priority(request.headers.get(PRIORITY_HEADER), None)
            doc = rest_json.loads(await self._body(request))
            signature_name = rest_json.signature_name(doc)
        remaining = deadline.remaining()  # an expired call is refused here, cached or not
        models = self.signatures.cached(key)
        if models is None:  # not yet fetched: the coroutine only then
            models = await self.signatures.get(key, remaining)
        signature = models.signature(signature_name)
        with self.service.validating():
            fmt, tensors = rest_json.parse_predict(doc, signature.inputs, signature_name)
        name, version, label = key
        # The resolved signature name ("serving_default" for ""): the batch key then matches
        # gRPC callers that name it.
        spec = self._spec(key, signature.name)
        inputs = {n: codec.Tensor(t.dtype, t.shape, t.data) for n, t in tensors.items()}
        call = codec.PredictCall(
            model_name=name, version=version, version_label=label,
            signature_name=signature.name, output_filter=(), model_spec=spec, inputs=inputs,
        )
        try:
            answer = await self.service.predict(call, deadline.remaining(), None, priority)
        except ProxyError as err:
            if err.code == grpc.StatusCode.NOT_FOUND:
                self.signatures.forget(key)  # unloaded: the next call asks afresh
            raise
        outputs, served_version = _response_outputs(answer)
        self.signatures.saw_version(key, served_version)
        return rest_json.predict_response(outputs, fmt)

    # -- forwarded calls ---------------------------------------------------------------------

    async def _classify_regress(self, request: web.Request, verb: str, key: ModelKey,
                                deadline: _Deadline) -> bytes:
        message: inference_pb2.ClassificationRequest | inference_pb2.RegressionRequest
        if verb == "classify":
            message, path = inference_pb2.ClassificationRequest(), CLASSIFY
        else:
            message, path = inference_pb2.RegressionRequest(), REGRESS
        # A body refused for its content is counted as `invalid`, as a predict body is.
        with self.service.validating():
            doc = rest_json.loads(await self._body(request))
            signature_name = rest_json.signature_name(doc)
            message.model_spec.CopyFrom(model_spec(*key, signature_name))
            rest_json.fill_inference_request(doc, message)
        answer = await self.service.forward(path, message.SerializeToString(),
                                            deadline.remaining(), model=key[0])
        if verb == "classify":
            return rest_json.classification_response(answer)
        return rest_json.regression_response(answer)

    async def _status(self, key: ModelKey, metadata: bool, deadline: _Deadline) -> bytes:
        spec = model_spec(*key)
        if metadata:
            request = get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=spec, metadata_field=["signature_def"]
            )
            answer = await self.service.forward(
                GET_MODEL_METADATA, request.SerializeToString(), deadline.remaining(),
                model=key[0])
            return rest_json.metadata_response(answer)
        status = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
        answer = await self.service.forward(
            GET_MODEL_STATUS, status.SerializeToString(), deadline.remaining(), model=key[0])
        return rest_json.status_response(answer)


class RestServer:
    """The REST frontend's listening socket and lifecycle, for server.Proxy."""

    def __init__(self, service: PredictService, host: str, port: int, *,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 extra_routes: Iterable[web.RouteDef] = (),
                 reuse_port: bool = False,
                 shutdown_timeout_s: float = 5.0,
                 auth: TokenAuth | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 header_timeout_s: float = 30.0,
                 body_timeout_s: float = 30.0) -> None:
        # Metadata fetches are forwarded calls like any other: same admission, same retries.
        self.signatures = SignatureCache(service.forward)
        self.frontend = RestFrontend(service, self.signatures, max_body_bytes, auth=auth,
                                     body_timeout_s=body_timeout_s)
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.reuse_port = reuse_port  # forked workers share the port
        self.extra_routes = list(extra_routes)
        self.shutdown_timeout_s = shutdown_timeout_s
        self.handler_args: dict[str, Any] = dict(
            access_log=None,  # per-request logging would cost more than the JSON work
            handler_cancellation=True,  # a client that hangs up leaves the batch queue
            auto_decompress=False,  # _body() inflates gzip itself, under the size limit
            # aiohttp arms this timer when a connection opens and closes it if no whole
            # request has arrived by then: the bound on a slow sender's headers (and on idle
            # keep-alive connections).
            keepalive_timeout=header_timeout_s,
            # After an answer that did not read the whole body (408, 413), aiohttp drains
            # the rest before closing: not for long.
            lingering_time=1.0,
        )
        self.runner: web.ServerRunner | None = None  # made by start(), in the loop

    async def start(self) -> None:
        server = self.frontend.make_server(self.extra_routes, **self.handler_args)
        self.runner = web.ServerRunner(server, shutdown_timeout=self.shutdown_timeout_s)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, backlog=1024,
                           reuse_port=self.reuse_port or None, ssl_context=self.ssl_context)
        await site.start()
        if self.port == 0:
            self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening, let calls in flight finish (up to the shutdown timeout)."""
        try:
            if self.runner is not None:
                await self.runner.cleanup()
        finally:
            await self.signatures.close()
