"""Debug endpoints on the REST and monitoring ports: `GET /v1/batchproxy/replicas` shows, per
replica and model, the learned cost (a, b), concurrency, batches in flight and expected free
time: what the adaptive policy plans with. `GET /v1/batchproxy/models` shows, per model,
which replicas hold which versions in which state, the settings in force (labels, latest
policy, weights, shadow) and the version a `latest` call gets now."""

from __future__ import annotations

import orjson
from aiohttp import web

from batchproxy.fleet.slots import ReplicaPool
from batchproxy.fleet.snapshot import fleet_snapshot
from batchproxy.fleet.versions import VersionRouter

REPLICAS_PATH = "/v1/batchproxy/replicas"
MODELS_PATH = "/v1/batchproxy/models"


def debug_routes(pool: ReplicaPool, versions: VersionRouter | None = None) -> list[web.RouteDef]:
    async def replicas(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(fleet_snapshot(pool), option=orjson.OPT_INDENT_2),
                            content_type="application/json")

    router = versions if versions is not None else VersionRouter(pool)

    async def models(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(router.describe(), option=orjson.OPT_INDENT_2),
                            content_type="application/json")

    return [web.get(REPLICAS_PATH, replicas), web.get(MODELS_PATH, models)]
